"""The teaching site (mkdocs.yml, docs/, conformance/site): its code is the project's, every
snippet runs, it builds with --strict, and a reader's browser switches the framework tabs."""

from __future__ import annotations

import functools
import html
import importlib.util
import re
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conformance import cli
from conformance.site import listing, pages, snippets, source
from conformance.site.source import BACKENDS, ROOT, TABS

DOCS = ROOT / "docs"
SCREENSHOTS = ROOT / "build" / "docs"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
GENERATED = {"side_by_side.md"}  # written by `make docs` from the code itself (tests/test_docs.py)
# The teaching pages, whose code all comes from the backends or from docs/snippets.
TEACHING = ("index.md", "blocks.md", "shapes.md", "training.md", "differences.md", "exercises.md", "reproduce.md")


def hand_written_pages() -> list[Path]:
    return [
        path
        for path in DOCS.rglob("*.md")
        if path.relative_to(DOCS).parts[0] != "results" and path.name not in GENERATED
    ]


# --- the code on the pages is the project's code ----------------------------------------------


@pytest.mark.parametrize("name", sorted(pages.LISTINGS))
def test_every_listing_is_cut_from_every_backend(name):
    for backend, wanted in pages.LISTINGS[name].items():
        for file, names in wanted:
            definition = source.first_found(f"{BACKENDS[backend]}/{file}", names)
            lines = (ROOT / definition.path).read_text().splitlines()
            assert lines[definition.first_line - 1].strip() == definition.code.splitlines()[0].strip()


# Lecture length: the chapter's listings, as the site shows them, in lines (decorators and docstrings included).
LECTURE_LINES = {"conv_block": 25, "DenseBlock": 20, "transition_block": 20, "stem": 20, "DenseNet": 35}


@pytest.mark.parametrize("names", listing.BLOCKS, ids=lambda names: names[0])
def test_the_chapter_s_listings_are_lecture_length(names):
    for package in BACKENDS.values():
        lines = len(source.first_found(f"{package}/model.py", names).code.splitlines())
        assert lines <= LECTURE_LINES[names[0]], f"{package}: {names[0]} is {lines} lines"


def test_every_code_link_names_a_definition():
    links = [(page, *match) for page in hand_written_pages() for match in pages.LINK.findall(page.read_text())]
    assert links, "the pages link no line of code"
    for _page, path, name in links:
        source.find(path, name)  # LookupError names the page's broken link target


def test_a_missing_definition_is_a_clear_error():
    with pytest.raises(LookupError, match="defines no 'renamed_block'.*conv_block"):
        source.find("densenet_torch/model.py", "renamed_block")


def test_hand_written_pages_hold_no_code_of_their_own():
    """Python on the site comes from the backends or from docs/snippets (run below), never a copy."""
    for page in (DOCS / name for name in TEACHING):
        assert "```python" not in page.read_text(), f"{page}: use <!-- xf:listing --> or <!-- xf:run -->"


def test_commands_on_the_site_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    subcommands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    text = "\n".join(page.read_text() for page in hand_written_pages())
    made = set(re.findall(r"`make ([\w-]+)", text)) | set(re.findall(r"^make ([\w-]+)", text, re.MULTILINE))
    called = set(re.findall(r"densenet-xf (\w[\w-]*)", text))
    assert made and called
    assert made <= targets, f"make targets named on the site but not in the Makefile: {made - targets}"
    assert called <= subcommands, f"densenet-xf subcommands that do not exist: {called - subcommands}"


# --- every snippet runs ---------------------------------------------------------------------


@pytest.mark.parametrize("snippet", snippets.snippets(), ids=lambda s: f"{s.topic}-{s.backend}")
def test_snippet_runs(snippet):
    """Each snippet asserts what it prints; a run is cached only for identical code (see snippets.py)."""
    if not snippet.installed:
        pytest.skip(f"{snippets.FRAMEWORK[snippet.backend]} is not installed")
    assert snippets.run(snippet).strip()


def test_every_page_topic_has_a_snippet_per_tab():
    topics = {
        match[1]
        for page in hand_written_pages()
        for match in pages.DIRECTIVE.findall(page.read_text())
        if match[0] == "run"
    }
    assert topics == {s.topic for s in snippets.snippets()}, "a snippet no page shows, or a page without its snippet"
    assert {s.backend for s in snippets.snippets("shapes")} == set(BACKENDS)


# --- the built site -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (the dev extra: pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_line_links_land_on_a_line(site):
    checked = 0
    for page in site.rglob("*.html"):
        for href in re.findall(r'href="([^"#]*)#(__codelineno-0-\d+)"', page.read_text()):
            target = (page.parent / html.unescape(href[0])).resolve()
            target = target / "index.html" if target.is_dir() else page
            assert f'id="{href[1]}"' in target.read_text(), f"{page}: {href}"
            checked += 1
    assert checked > 50


def test_outputs_on_the_pages_were_computed(site):
    shapes = (site / "shapes" / "index.html").read_text()
    for snippet in snippets.snippets("shapes"):
        if snippet.installed:
            assert "DenseBlock output: (4, " in shapes
    exercises = (site / "exercises" / "index.html").read_text()
    if snippets.Snippet("exercises", "torch").installed:
        assert "758,226" in exercises  # the d2l net's parameter count, measured at build time
        assert "<td>dense MLP (growth 16, 4 layers)</td>" in exercises  # exercise 5, trained at build time


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (make browser, or apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1400",
    ):
        options.add_argument(argument)
    # The driver's path is given: Selenium Manager downloads nothing.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(site):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def shown_code(tab_set):
    """The text of the code in the tab a reader sees now."""
    blocks = [b for b in tab_set.find_elements("css selector", ".tabbed-content > .tabbed-block") if b.is_displayed()]
    assert len(blocks) == 1
    return blocks[0].find_element("css selector", "td.code").text


def test_framework_tabs_switch_in_a_browser(served, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{served}/blocks/")
    tab_sets = browser.find_elements("css selector", ".tabbed-set")
    assert len(tab_sets) == len(listing_blocks()), "one set of tabs per building block"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for backend in BACKENDS:
        labels = [
            label
            for label in tab_sets[0].find_elements("css selector", ".tabbed-labels > label")
            if label.text == TABS[backend]
        ]
        assert labels, f"no {TABS[backend]} tab"
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", labels[0])
        labels[0].click()
        for tab_set, names in zip(tab_sets, listing_blocks()):
            expected = source.first_found(f"{BACKENDS[backend]}/model.py", names).code.splitlines()[0]
            # Linked tabs: one click switches every block on the page to that framework.
            WebDriverWait(browser, 10).until(lambda _, e=expected, t=tab_set: e in shown_code(t))
        browser.save_screenshot(str(SCREENSHOTS / f"blocks-{backend}.png"))


def listing_blocks():
    from conformance.site import listing

    return listing.BLOCKS


# --- every page reachable, every tab set the four frameworks, no code wider than the page ----


def nav_pages() -> list[str]:
    """The Markdown files mkdocs.yml's nav lists, in order."""
    import yaml

    def walk(items):
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                yield from walk(value) if isinstance(value, list) else [value]

    return list(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


def test_every_page_in_docs_is_in_the_nav():
    listed = set(nav_pages())
    pages_in_docs = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert pages_in_docs - listed == set(), "pages no reader can reach from the navigation"
    assert listed - pages_in_docs <= {"code/index.md"}, "the nav names a page that does not exist"


def page_url(served: str, page: str) -> str:
    path = page.removesuffix(".md")
    path = path.removesuffix("README").removesuffix("index")
    return f"{served}/{path}/" if path and not path.endswith("/") else f"{served}/{path}"


TAB_SETS = """return [...document.querySelectorAll('.tabbed-set')].map(s => ({
    labels: [...s.querySelectorAll(':scope > .tabbed-labels > label')].map(l => l.textContent.trim()),
    checked: [...s.querySelectorAll(':scope > input')].findIndex(i => i.checked)}))"""
OVERFLOWING = """return [...document.querySelectorAll('pre > code')]
    .filter(c => c.offsetParent !== null && c.scrollWidth > c.clientWidth + 1)
    .map(c => c.textContent.split('\\n').reduce((a, b) => (a.length >= b.length ? a : b)))"""


def click_framework(browser, title):
    labels = [label for label in browser.find_elements("css selector", ".tabbed-labels > label") if label.text == title]
    if labels:
        browser.execute_script("arguments[0].click();", labels[0])
    return bool(labels)


def test_every_tab_set_holds_the_four_frameworks_and_they_switch_together(served, browser):
    titles = list(TABS.values())
    seen = 0
    for page in nav_pages():
        browser.get(page_url(served, page))
        tab_sets = browser.execute_script(TAB_SETS)
        for tab_set in tab_sets:
            assert tab_set["labels"] == titles, f"{page}: a tab set with tabs {tab_set['labels']}"
        seen += len(tab_sets)
        for index, title in enumerate(titles):
            if not click_framework(browser, title):
                break
            checked = [tab_set["checked"] for tab_set in browser.execute_script(TAB_SETS)]
            assert checked == [index] * len(tab_sets), f"{page}: clicking {title} left tabs {checked}"
    assert seen >= 10


def test_no_code_block_is_wider_than_the_page_at_1280_pixels(served, browser):
    size = browser.get_window_size()
    browser.set_window_size(1280, 1000)
    try:
        for page in nav_pages():
            browser.get(page_url(served, page))
            for title in TABS.values():
                click_framework(browser, title)  # the code of every tab, shown in turn
                too_wide = browser.execute_script(OVERFLOWING)
                assert not too_wide, f"{page} ({title} tab): lines wider than the page: {too_wide[:3]}"
    finally:
        browser.set_window_size(size["width"], size["height"])
