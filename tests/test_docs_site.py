"""The documentation site builds in strict mode and reads right in a real browser.

* `mkdocs build --strict` (mkdocs.yml): a broken link or anchor, a missing cross-reference or a
  docstring that fails to render is a failure.
* The API reference has an entry for every public name of the packages' ``__all__``.
* Every internal link of every built page resolves (file and anchor).
* Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium; nothing is
  downloaded at run time) opens the pages from a local HTTP server: every formula is typeset by
  KaTeX (no raw ``$$`` or ``\\frac`` left in the visible text, no KaTeX error), the search box finds
  ``multi_head_attention``, and a screenshot of the attention section is saved.

Skipped with the reason where mkdocs (the ``docs`` extra) or Chromium is not installed.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_ANCHOR = "scaled-dot-product-attention-321-eq-1"


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not _have("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.skip('mkdocs, mkdocs-material or mkdocstrings not installed: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"site built in {elapsed:.1f} s")
    return out


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def broken_links(site: Path) -> list[str]:
    bad = []
    for page_path in sorted(site.rglob("*.html")):
        for href in _parse(page_path).links:
            if urlparse(href).scheme or href.startswith(("mailto:", "//")):
                continue
            target, frag = urldefrag(href)
            if not target:
                dest = page_path
            elif target.startswith("/"):  # 404.html links from the site's root
                dest = site / unquote(target).lstrip("/")
            else:
                dest = (page_path.parent / unquote(target)).resolve()
            if dest.is_dir():
                dest = dest / "index.html"
            if not dest.exists():
                bad.append(f"{page_path.relative_to(site)}: {href}")
            elif frag and dest.suffix == ".html" and unquote(frag) not in _parse(dest).ids:
                bad.append(f"{page_path.relative_to(site)}: {href} (no such anchor)")
    return bad


def test_site_builds_strictly_with_every_page(site):
    for page in (
        "index.html",
        "math_to_code.html",
        "design.html",
        "examples.html",
        "benchmarks.html",
        "scaling.html",
        "api/index.html",
        "api/nn.html",
        "license.html",
    ):
        assert (site / page).exists(), page
    assert "img/attention_minilm_last_layer.png" in (site / "examples.html").read_text(encoding="utf-8")
    assert (site / "img" / "finetune_imdb_training.png").exists()


def test_api_reference_has_every_public_name(site):
    spec = importlib.util.spec_from_file_location("fnlm_docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    names = hooks.api_names()  # the names the site documents and links
    documented = {k for k, v in names.items() if k == v}
    ids = set()
    for page in (site / "api").glob("*.html"):
        ids |= _parse(page).ids
    missing = sorted(documented - ids)
    assert not missing, f"public names without an API entry: {missing}"
    import fnlm

    for name in fnlm.__all__:  # each fnlm.X re-export is listed and points at an entry
        if not isinstance(getattr(fnlm, name), type(fnlm)):
            assert names[f"fnlm.{name}"] in ids, name
    print(
        f"API entries: {len(documented)} (the subpackages' __all__, fnlm.random, fnlm.tree, fnlm.train.distributed); fnlm.__all__: {len(fnlm.__all__)}"
    )


def test_every_internal_link_resolves(site):
    bad = broken_links(site)
    assert not bad, f"broken links: {bad[:20]}"


def test_the_link_checker_catches_a_broken_link(tmp_path):
    (tmp_path / "a.html").write_text(
        '<h1 id="top">a</h1><a href="b.html">b</a><a href="a.html#top">ok</a>'
        '<a href="a.html#nowhere">x</a><a href="https://example.org/">ext</a>'
    )
    assert broken_links(tmp_path) == ["a.html: b.html", "a.html: a.html#nowhere (no such anchor)"]


# ---------------------------------------------------------------- the browser


def _chromium() -> tuple[str, str] | None:
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(site):
    if not _have("selenium"):
        pytest.skip('selenium not installed: pip install -e ".[docs]"')
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (the browser test drives the system's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=opts)
    driver.set_page_load_timeout(60)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver.base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield driver
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def _wait(predicate, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _typeset(driver) -> dict:
    return driver.execute_script("""
        const all = document.querySelectorAll('.arithmatex');
        const done = [...all].filter(e => e.querySelector('.katex'));
        return {total: all.length, done: done.length,
                display: document.querySelectorAll('.katex-display').length,
                errors: document.querySelectorAll('.katex-error').length};
    """)


def test_every_formula_is_typeset(browser, site):
    math_pages = sorted(
        p.relative_to(site).as_posix() for p in site.rglob("*.html") if 'class="arithmatex"' in p.read_text("utf-8")
    )
    assert "math_to_code.html" in math_pages and "examples.html" in math_pages, math_pages
    totals = {}
    for page in math_pages:
        browser.get(browser.base + page)
        state = _wait(
            lambda: (s := _typeset(browser))["total"] and s["done"] == s["total"] and s, what=f"KaTeX on {page}"
        )
        assert state["errors"] == 0, f"{page}: {state['errors']} formulas KaTeX could not parse"
        text = browser.find_element("tag name", "article").text
        for raw in ("$$", "\\frac", "\\mathrm", "\\sqrt"):
            assert raw not in text, f"{page}: raw {raw!r} left in the visible text"
        totals[page] = state
    assert totals["math_to_code.html"]["display"] >= 13 and totals["math_to_code.html"]["done"] >= 140, totals
    print("formulas typeset:", {p: s["done"] for p, s in totals.items()})


def test_search_finds_multi_head_attention(browser):
    from selenium.webdriver.common.by import By

    browser.get(browser.base + "index.html")
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    if not box.is_displayed():  # a narrow window: the search box opens from the header's button
        browser.find_element(By.CSS_SELECTOR, "label.md-header__button[for='__search']").click()
    _wait(box.is_displayed, what="the search box")
    box.click()
    box.send_keys("multi_head_attention")
    hits = _wait(
        lambda: [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")],
        what="search results",
    )
    # (search.highlight adds ?h=<query> to each result's address)
    assert any("/api/nn.html" in h and h.endswith("#fnlm.nn.multi_head_attention") for h in hits), hits[:10]


def test_screenshot_of_the_attention_section(browser, tmp_path):
    browser.get(browser.base + f"math_to_code.html#{ATTENTION_ANCHOR}")
    _wait(lambda: (s := _typeset(browser))["total"] and s["done"] == s["total"], what="KaTeX")
    browser.execute_script(f"document.getElementById('{ATTENTION_ANCHOR}').scrollIntoView();")
    time.sleep(0.3)
    shot = tmp_path / "attention.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("FNLM_SCREENSHOT_DIR"):  # keep a copy, e.g. FNLM_SCREENSHOT_DIR=docs/img
        shutil.copy(shot, Path(os.environ["FNLM_SCREENSHOT_DIR"]) / "site_attention.png")
    # the link from the equation's table to the function's API entry is there and resolves
    from selenium.webdriver.common.by import By

    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "article a")]
    assert any(h.endswith("api/nn.html#fnlm.nn.attention_reference") for h in links)
    # ... and so is the link from its "Checked by" to the test's source
    assert any(h.endswith("tests.html#test_attention--test_attention_reference_is_the_literal_formula") for h in links)


def test_readme_test_command_is_what_ci_runs():
    """The README's second command is .ci/run's test line, verbatim (docs extra included, so CI
    builds the site and runs the browser test)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("```", 2)[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if "pytest" in x)
    assert line in ci.splitlines(), (line, ci)
    assert '".[test,docs]"' in line
