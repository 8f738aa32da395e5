"""Every measured figure has one home, docs/benchmarks.md: the README's results table is checked
against it, and a speed, accuracy or run-time figure in the README, the other documentation pages,
a docstring or a ``help=`` text that is not on that page fails (so a figure cannot go stale in one place while the page moves
on)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
SOURCES = ("fnlm", "examples", "benchmarks")
# the Markdown pages besides the benchmarks page itself
PAGES = (
    "README.md",
    "weights/README.md",
    "docs/design.md",
    "docs/math_to_code.md",
    "docs/scaling.md",
    "docs/examples.md",
)

_NUM = r"\d+(?:\.\d+)?"
_RANGE = rf"{_NUM}(?:\s?[-–]\s?{_NUM})?"
FIGURE_PATTERNS = (
    # speed-ups: 1.37x, ~2.5×, 0.87-0.94x; not shapes ("16 x 128", "3 x [n, dk]") nor "0.04 x^3"
    re.compile(rf"(?<![\w.])~?{_RANGE}\s?[x×](?![\w\[(^]|\s*[\d\[(])"),
    # accuracy-looking fractions: 0.869 (not 0.044715, not 1e-5)
    re.compile(r"(?<![\w.])0\.\d{3}(?![\d\w])"),
    # run times in minutes: 3-6 min, 8 minutes
    re.compile(rf"(?<![\w.])~?{_RANGE}\s?min(?:utes)?\b"),
    # throughputs: 31.6 reviews/s, 25,160 tokens/s
    re.compile(r"(?<![\w.])~?\d[\d,.]*\s?(?:reviews|tokens|samples|steps)/s\b"),
    # times in seconds: 69.7 s, ~30 s
    re.compile(rf"(?<![\w.])~?{_NUM}\s?s\b(?![/'])"),
    # relative changes: 0–15% slower, 46.7% lower
    re.compile(rf"(?<![\w.])~?{_RANGE}\s?%\s(?:faster|slower|lower|higher|less|more)\b"),
)

# Matches that are not measured figures: (file, figure, why). Keep it short and explicit.
ALLOWLIST = {
    ("fnlm/train/_guard.py", "60 s"): "a timeout the code sets, not a measurement",
    ("fnlm/train/distributed.py", "0.1 s"): "a polling interval the code sets, not a measurement",
    ("docs/scaling.md", "34 s"): "the activation-memory formula 34 s b h bytes per layer (s: sequence length)",
    ("docs/scaling.md", "600 s"): "the collective timeout DataParallel.start sets, not a measurement",
}


def normalize(text: str) -> str:
    return text.replace("×", "x").replace("–", "-").replace("\u2009", " ").replace("~", "").replace("**", "")


def figures_in(text: str) -> list[str]:
    """The speed/accuracy/time figures in ``text``, in order."""
    out = []
    for pat in FIGURE_PATTERNS:
        out += [m.group(0) for m in pat.finditer(text)]
    return out


def texts_of_source(src: str):
    """(line, text) of every docstring and every string constant in a ``help=`` argument."""
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "lineno", 1), doc
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "help":
                    for sub in ast.walk(kw.value):
                        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                            yield sub.lineno, sub.value


def stale_figures(name: str, text: str, page: str, *, python: bool) -> list[str]:
    """The figures of one file that are neither on ``page`` nor allowlisted."""
    page = normalize(page)
    parts = texts_of_source(text) if python else [(1, text)]
    bad = []
    for line, part in parts:
        for fig in figures_in(part):
            if (name, fig) in ALLOWLIST or normalize(fig).strip() in page:
                continue
            bad.append(f"{name}:{line}: {fig!r}")
    return bad


def test_no_figure_outside_the_benchmarks_page():
    page = PAGE.read_text(encoding="utf-8")
    bad = []
    for name in PAGES:
        bad += stale_figures(name, (ROOT / name).read_text(encoding="utf-8"), page, python=False)
    for d in SOURCES:
        for path in sorted((ROOT / d).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            bad += stale_figures(name, path.read_text(encoding="utf-8"), page, python=True)
    assert not bad, (
        "figures that are not on docs/benchmarks.md (move them there and link to the "
        f"page, or allowlist a non-figure in {Path(__file__).name}): {bad}"
    )


def test_the_figure_scanner_catches_a_stale_figure():
    """A planted docstring and help text with figures the page does not hold fail; shapes, settings
    and the page's own figures pass."""
    planted = '''
"""Module docstring: the step is ~1.7x faster in bf16 (README)."""
import argparse

def f():
    """Trains in 5.5-7 minutes at 0.871 accuracy; batch 16 x 128; 3 x [n, dk]."""

ap = argparse.ArgumentParser()
ap.add_argument("--export", help="bf16 package, ~5.3x the pipeline; 31.6 reviews/s")
ap.add_argument("--dtype", help="the bf16 step is 2.26x float32's")
'''
    page = PAGE.read_text(encoding="utf-8")
    bad = stale_figures("planted.py", planted, page, python=True)
    figs = [b.split(": ", 1)[1] for b in bad]
    assert figs == ["'~1.7x'", "'0.871'", "'5.5-7 minutes'", "'~5.3x'"], bad
    # 2.26x and 42.3 reviews/s are on the page; the shapes are no figures
    assert "2.26x" in normalize(page) and "31.6 reviews/s" in page
    assert figures_in("16 x 128, 3 x [n, dk], 0.044715 x^3, int8 x int8, 1e-5") == []


def results_table(readme: str) -> list[list[str]]:
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def test_readme_results_table_is_on_the_benchmarks_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = PAGE.read_text(encoding="utf-8")
    machines = re.findall(r"^\| \*\*([\w-]+)\*\* \|", page, re.M)
    rows = results_table(readme)
    assert len(rows) >= 4, rows
    page_numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", normalize(page)))
    missing = []
    for result, ours, ref, machine in rows:
        assert machine in machines, f"README results row {result!r} names no machine of the page: {machine!r}"
        for num in re.findall(r"\d[\d,]*(?:\.\d+)?", f"{ours} {ref}"):
            if num not in page_numbers:
                missing.append((result, num))
    assert not missing, f"README results figures not on docs/benchmarks.md: {missing}"
