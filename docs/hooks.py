"""mkdocs hooks for the fnlm site (mkdocs.yml `hooks:`).

* The home, weights, changelog, security and license pages are the repository's own files
  (README.md, weights/README.md, CHANGELOG.md, SECURITY.md, LICENSE), read at build time with their
  links rewritten for the site, so that there is one copy of each.
* Every backticked public name (`fnlm.nn.multi_head_attention`, `fnlm.load_bert`) outside code
  blocks becomes a link to its API entry (which shows the docstring and the source lines), so the
  Markdown sources stay plain and readable on GitHub while the site links everything.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# site page -> the repository file it shows
GENERATED = {
    "index.md": "README.md",
    "weights.md": "weights/README.md",
    "changelog.md": "CHANGELOG.md",
    "security.md": "SECURITY.md",
    "license.md": "LICENSE",
}
# links in those files -> site pages
LINKS = {
    "weights/README.md": "weights.md",
    "LICENSE": "license.md",
    "CHANGELOG.md": "changelog.md",
    "SECURITY.md": "security.md",
    "README.md": "index.md",
}

SUBPACKAGES = ("nn", "models", "optim", "train", "data", "io", "config", "metrics")
PLAIN_MODULES = ("random", "tree", "train.distributed")  # no __all__: their public functions and classes


def public_names_of(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n
        for n, o in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(o) or inspect.isclass(o))
        and getattr(o, "__module__", "") == module.__name__
    ]


@lru_cache(maxsize=1)
def api_names() -> dict[str, str]:
    """Every public name that the API reference documents -> its identifier there."""
    fnlm = importlib.import_module("fnlm")
    out: dict[str, str] = {}
    owner: dict[int, str] = {}
    for sub in SUBPACKAGES + PLAIN_MODULES:
        mod = importlib.import_module(f"fnlm.{sub}")
        for name in public_names_of(mod):
            if inspect.ismodule(getattr(mod, name)):
                continue  # fnlm.train.distributed: documented through the names it exports
            ident = f"fnlm.{sub}.{name}"
            out[ident] = ident
            owner.setdefault(id(getattr(mod, name)), ident)
    if hasattr(fnlm, "distributed"):  # fnlm.distributed is fnlm.train.distributed
        for ident in [k for k in out if k.startswith("fnlm.train.distributed.")]:
            out["fnlm.distributed." + ident.rsplit(".", 1)[1]] = ident
    for name in fnlm.__all__:
        obj = getattr(fnlm, name)
        if inspect.ismodule(obj):
            continue
        if id(obj) in owner:
            out[f"fnlm.{name}"] = owner[id(obj)]
    return out


def _outside_code(markdown: str, fn) -> str:
    """Apply ``fn`` to the text outside fenced code blocks."""
    parts = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.M | re.S)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def link_names(markdown: str) -> str:
    names = api_names()

    def repl(m: re.Match) -> str:
        name = m.group(1)
        target = names.get(name)
        if target is None:
            return m.group(0)
        return f"[`{name}`][{target}]"

    # a backticked name not already inside a link text
    return _outside_code(markdown, lambda t: re.sub(r"(?<!\[)`(fnlm(?:\.\w+)+)`(?!\]|\()", repl, t))


TEST = re.compile(r"`(tests/(?:\w+/)*(test_\w+)\.py::(test_\w+))`")  # tests/examples/ too; anchors by basename


def test_anchor(module: str, test: str) -> str:
    return f"{module}--{test}"


def cited_tests() -> list[tuple[str, str, str]]:
    """(file, module, test) of every test the Markdown pages name, in order of first mention."""
    seen: dict[str, tuple[str, str, str]] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in TEST.finditer(path.read_text(encoding="utf-8")):
            seen.setdefault(m.group(1), (m.group(1).partition("::")[0], m.group(2), m.group(3)))
    return list(seen.values())


def tests_page() -> str:
    """The page that shows the source of every test the documentation cites."""
    out = [
        "# The tests behind the equations",
        "",
        "Each test that [Math to code](math_to_code.md) and the other pages cite, with its source: "
        "what it compares the function with, and to which tolerance. `tests/test_docs.py` checks that "
        "every test named in the documentation exists.",
        "",
    ]
    sources: dict[str, tuple[str, ast.Module]] = {}
    for file, module, test in cited_tests():
        if file not in sources:
            text = (ROOT / file).read_text(encoding="utf-8")
            sources[file] = (text, ast.parse(text))
        text, tree = sources[file]
        node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == test), None)
        if node is None:
            continue  # tests/test_docs.py reports it
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        code = "\n".join(text.splitlines()[start : node.end_lineno])
        out += [
            f"## `{module}.py::{test}` {{ #{test_anchor(module, test)} }}",
            "",
            f"`{file}`, lines {start + 1}-{node.end_lineno}:",
            "",
            "```python",
            code,
            "```",
            "",
        ]
    return "\n".join(out)


def link_tests(markdown: str) -> str:
    def repl(m: re.Match) -> str:
        return f"[`{m.group(1)}`](tests.md#{test_anchor(m.group(2), m.group(3))})"

    return _outside_code(markdown, lambda t: TEST.sub(repl, t))


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "tests.md", content=tests_page()))
    return files


def site_links(markdown: str) -> str:
    def repl(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        path, _, frag = target.partition("#")
        if path.startswith("docs/"):
            path = path[len("docs/") :]
        path = LINKS.get(path, path)
        return f"[{text}]({path}{'#' + frag if frag else ''})"

    return re.sub(r"\[([^\]]+)\]\((?!https?:)([^)\s]+)\)", repl, markdown)


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    if src in GENERATED:
        text = (ROOT / GENERATED[src]).read_text(encoding="utf-8")
        if src == "license.md":
            text = "# License\n\n```text\n" + text + "\n```\n"
        markdown = site_links(text)
    if src == "api/index.md":
        markdown = _api_index_markdown(markdown)
    elif not src.startswith("api/") and src != "tests.md":
        markdown = link_tests(link_names(markdown))
    return markdown


def reexports_table() -> str:
    fnlm = importlib.import_module("fnlm")
    names = api_names()
    rows = ["| `fnlm.X` | is |", "|---|---|"]
    for name in fnlm.__all__:
        target = names.get(f"fnlm.{name}")
        if target:
            rows.append(f"| `fnlm.{name}` | [`{target}`][{target}] |")
    return "\n".join(rows) + "\n"


def _api_index_markdown(markdown: str) -> str:
    return markdown.replace("<!-- fnlm-reexports -->", reexports_table())
