"""The course website, built offline and opened in a real browser (headless Chromium through Playwright).

The site is built once (``gptlora.teaching.site``) into a temporary folder and served on 127.0.0.1 by a
server this module starts. Playwright drives Debian's Chromium (``/usr/bin/chromium``, ``apt-get install
chromium``): its own ``playwright install`` downloads a browser, which this project's machines cannot.
Without the ``site`` extra or without Chromium the tests skip, saying which; ``.ci/run`` installs both.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

from gptlora.teaching import site

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mkdocs_jupyter") is None,
                       reason='the site extra is not installed: .venv/bin/pip install -e ".[site]"'),
]
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.is_file(),
    reason=f"needs the playwright package (site extra) and Debian's Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return site.build(tmp_path_factory.mktemp("site") / "site")


@pytest.fixture(scope="module")
def base_url(built):
    """The site served on 127.0.0.1 at a free port, for the module's tests."""
    handler = functools.partial(QuietHandler, directory=str(built))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # pytest shows the server's log otherwise
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox"])  # as root, Chromium refuses its sandbox
        yield chromium
        chromium.close()


def pages(built: Path) -> list[str]:
    """Every page of the site, as a path below its root (``notebooks/01_gpt_model/``)."""
    return sorted(str(path.parent.relative_to(built)) + "/" if path.parent != built else ""
                  for path in built.rglob("index.html") if "search" not in path.parts and "assets" not in path.parts)


def png_outputs(path: Path) -> int:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return sum("image/png" in output.get("data", {}) for cell in nb["cells"] for output in cell.get("outputs", []))


def test_the_site_holds_the_chapters_and_nothing_from_shared(built):
    assert {page for page in pages(built) if page.startswith("notebooks/")} == \
        {f"notebooks/{path.stem}/" for path in NOTEBOOKS}
    assert (built / "docs" / "numbers" / "index.html").is_file() and (built / "exercises" / "GRADING" / "index.html").is_file()
    shared = {path.name for path in (REPO_ROOT.parent / "shared").rglob("*") if path.is_file()}
    copied = sorted(path.name for path in built.rglob("*") if path.name in shared and path.name != "README.md")
    assert not copied, f"the site holds files of ../shared: {copied}"


@needs_browser
def test_every_page_loads_without_errors_and_its_links_resolve(built, base_url, browser):
    problems, checked = [], {}
    page = browser.new_page()
    page.on("console", lambda message: message.type == "error" and problems.append(f"{page.url}: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"{page.url}: {error}"))
    # A load the next page.goto cuts short (the search worker, the favicon) is ERR_ABORTED; any other failure counts.
    page.on("requestfailed", lambda request: "ERR_ABORTED" not in (request.failure or "")
            and problems.append(f"{page.url}: {request.url} failed ({request.failure})"))
    for path in pages(built):
        page.goto(base_url + path, wait_until="load")
        for href in page.eval_on_selector_all("a[href]", "links => links.map(link => link.href)"):
            target = urlparse(urljoin(page.url, href))
            if f"{target.scheme}://{target.netloc}/" != base_url or target.path in checked:
                continue
            checked[target.path] = page.request.get(urljoin(base_url, target.path)).status
            if checked[target.path] != 200:
                problems.append(f"{path}: a link to {target.path} gives HTTP {checked[target.path]}")
    page.close()
    assert len(checked) > 20
    assert not problems, "\n".join(problems[:20])


@needs_browser
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_a_chapter_page_shows_its_plots_and_opens_in_colab(notebook, base_url, browser):
    page = browser.new_page()
    page.goto(f"{base_url}notebooks/{notebook.stem}/", wait_until="load")
    widths = page.eval_on_selector_all(".jupyter-wrapper img", "images => images.map(image => image.naturalWidth)")
    assert len(widths) >= png_outputs(notebook) and all(width > 0 for width in widths), \
        f"{notebook.name}: {png_outputs(notebook)} plot(s) in the notebook, image widths on the page {widths}"
    colab = page.get_by_role("link", name="Open in Colab", exact=True).get_attribute("href")
    owner_repo = urlparse(site.repository_url()).path.strip("/")
    assert colab == f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook.name}"
    download = page.get_by_role("link", name="Download", exact=True).get_attribute("href")
    assert page.request.get(urljoin(page.url, download)).json()["cells"], f"{notebook.name}: Download is not the notebook"
    page.close()


@needs_browser
def test_search_finds_lora(base_url, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # wide: the search box is in the header
    page.goto(base_url, wait_until="networkidle")  # the search index and its worker loaded
    search = page.locator("input.md-search__input")
    search.click()
    search.press_sequentially("LoRA", delay=50)  # key by key, as a reader types: the theme searches on each key
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=60_000)
    assert results.count() >= 3 and "LoRA" in results.first.inner_text()
    page.close()
