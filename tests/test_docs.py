"""Documentation that cannot drift: every qualified fnlm name, file path and test named in the
README and docs/ exists (the idea of jax's tests/documentation_coverage_test.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({ROOT / "README.md", ROOT / "weights" / "README.md", *(ROOT / "docs").glob("*.md")})

QUALIFIED = re.compile(r"(?<![\w/.])fnlm(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"^(?:fnlm|examples|benchmarks|tests|docs|weights|\.ci)/[\w./-]*(?:::\w+)?$")


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted``, then getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


def names_in(text: str) -> set[str]:
    out = set()
    for m in QUALIFIED.finditer(text):
        name = m.group(0)
        if name.endswith(".X"):  # a placeholder: "fnlm.nn.X"
            continue
        out.add(name)
    return out


def paths_in(text: str) -> set[str]:
    tokens = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)\s#]+)\)", text)
    return {t for t in tokens if PATH.match(t)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_qualified_name_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for name in sorted(names_in(text)):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            bad.append(name)
    assert not bad, f"{doc.name} names things that do not exist: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_test_named_exists(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for token in sorted(paths_in(text)):
        path, _, test = token.partition("::")
        if path.startswith("weights/all-MiniLM-L6-v2"):  # fetched on first use, not part of a checkout
            continue
        target = ROOT / path
        if not target.exists():
            bad.append(token)
        elif test and not re.search(rf"^def {re.escape(test)}\(", target.read_text(encoding="utf-8"), re.M):
            bad.append(token)
    assert not bad, f"{doc.name} names files or tests that do not exist: {bad}"


def test_the_checker_catches_drift():
    """The two checks above fail on a stale name and a stale path (so they can fail)."""
    assert names_in("see `fnlm.nn.encoder` and fnlm.nn.X") == {"fnlm.nn.encoder"}
    with pytest.raises(AttributeError):
        resolve("fnlm.nn.no_such_function")
    assert paths_in("`fnlm/encoder.py`, [a](docs/design.md), `tests/test_x.py::test_y`, `x.py`") == {
        "fnlm/encoder.py",
        "docs/design.md",
        "tests/test_x.py::test_y",
    }
    assert not (ROOT / "fnlm/encoder.py").exists()


def test_math_to_code_names_a_test_for_every_equation():
    """Every section of docs/math_to_code.md that shows an equation says which tests check it."""
    text = (ROOT / "docs" / "math_to_code.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    missing = []
    for sec in sections:
        title = sec.splitlines()[0]
        if "$$" in sec and not re.search(r"\*\*Checked by:\*\*.*?`tests/(?:\w+/)*test_\w+\.py::test_\w+`", sec, re.S):
            missing.append(title)
    assert not missing, f"sections without a 'Checked by' test: {missing}"


LATEX = re.compile(r"\\[a-zA-Z]+|_\{|\^\{")


def test_math_to_code_formulas_are_math_not_code():
    """Formulas are $...$ / $$...$$ (typeset on the site and on GitHub), not LaTeX inside backticks,
    and no line has an unpaired backtick (one breaks the rendering of everything after it)."""
    text = (ROOT / "docs" / "math_to_code.md").read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    latex_as_code = [s for s in re.findall(r"`([^`\n]+)`", prose) if LATEX.search(s)]
    assert not latex_as_code, f"LaTeX inside backticks: {latex_as_code}"
    odd = [i for i, line in enumerate(prose.splitlines(), 1) if line.count("`") % 2]
    assert not odd, f"lines with an unpaired backtick: {odd}"
    inline = re.findall(r"(?<![$\\])\$(?!\$)[^$\n]+?(?<!\\)\$", prose)
    assert len(inline) > 100 and prose.count("$$") % 2 == 0


def test_readme_install_section_matches_pyproject():
    """The Python and torch versions the README's install section states are pyproject.toml's."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    python = meta["requires-python"].removeprefix(">=")
    torch_req = next(d for d in meta["dependencies"] if d.startswith("torch"))
    assert f"Python {python} or newer" in readme and f"`{torch_req}`" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
