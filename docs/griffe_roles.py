"""A griffe extension for the fnlm site: fnlm's docstrings cite other names with Sphinx roles
(``:func:`fnlm.nn.linear```, ``:data:`COMPILE_OPTIONS```); on the site these become links to the
API entry when it exists, plain code otherwise (so a role never breaks the strict build)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hooks import api_names  # noqa: E402

ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc):`~?([^`]+)`")


class RolesExtension(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is None:
            return
        names = api_names()

        def repl(m: re.Match) -> str:
            name = m.group(1).strip()
            target = names.get(name)
            if target is None and not name.startswith("fnlm."):
                target = names.get(f"{obj.package.path}.{name}") or names.get(f"fnlm.{name}")
            return f"[`{name}`][{target}]" if target else f"`{name}`"

        doc.value = ROLE.sub(repl, doc.value)
