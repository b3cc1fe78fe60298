"""End to end in a real Chromium: start the app server with `dml.launch` on real runs, open every
page, lasso points on the explorer's map and check that their thumbnails appear; the theme of
streamlit_config.toml must be the one the browser draws. Screenshots go to $DML_SCREENSHOTS
(default: screenshots/, git-ignored).

Skips when Chromium or Playwright is missing, except under CI=true, where that fails.
"""
# ruff: noqa: F811  (the app_runs fixture is imported, then requested by name)

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.servers import app_server
from tests.test_app_fixtures import app_runs  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DML_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGES = {"": "Runs", "compare": "Compare runs", "explorer": "Embedding explorer",
         "timeline": "Through time", "failures": "Retrieval failures",
         "utilization": "Utilization", "playground": "Mixing playground",
         "inspector": "Checkpoint inspector"}


def _require_browser():
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI=true: {missing}")
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_runs):  # noqa: F811
    _require_browser()
    with app_server(app_runs["root"], _free_port(), REPO) as url:
        yield url


@pytest.fixture(scope="module")
def browser_page():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        yield page
        browser.close()


def shots_dir() -> Path:
    d = Path(os.environ.get("DML_SCREENSHOTS", REPO / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


SETTLED = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return app && app.getAttribute('data-test-script-state') === 'notRunning'
    && !document.querySelector('[data-testid="stSkeleton"]');
}"""


def settle(page, timeout: float = 90_000):
    """Wait until the script run is over and every element has been drawn."""
    page.wait_for_function(SETTLED, timeout=timeout, polling=100)
    page.wait_for_timeout(500)


def open_page(page, url: str, title: str, timeout: float = 90_000):
    page.goto(url)
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=timeout)
    settle(page, timeout)
    assert page.locator('[data-testid="stException"]').count() == 0, \
        page.locator('[data-testid="stException"]').first.inner_text()


def test_every_page_renders_with_the_configured_theme(server, browser_page, app_runs):  # noqa: F811
    page = browser_page
    for path, title in PAGES.items():
        query = f"?run={app_runs['umap_run']}" if path in ("explorer", "playground") else ""
        open_page(page, f"{server}/{path}{query}", title)
        if path == "":
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
            # the theme of streamlit_config.toml is the one drawn: primary button colour
            from dml.launch import CONFIG_FILE, _load_toml
            hexcol = _load_toml(CONFIG_FILE)["theme"]["primaryColor"].lstrip("#")
            rgb = tuple(int(hexcol[i:i + 2], 16) for i in (0, 2, 4))
            button = page.locator('[data-testid="stBaseButton-primary"]').first
            color = button.evaluate("e => getComputedStyle(e).backgroundColor")
            assert color.replace(" ", "") == "rgb({},{},{})".format(*rgb), color
        if path in ("explorer", "compare", "utilization", "playground"):
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots_dir() / f"page-{path or 'runs'}.png"), full_page=True)


def test_lasso_on_the_map_shows_thumbnails(server, browser_page, app_runs):  # noqa: F811
    page = browser_page
    open_page(page, f"{server}/explorer?run={app_runs['umap_run']}", "Embedding explorer")
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for(timeout=60_000)
    assert plot.locator("canvas").count() > 0                  # WebGL scatter
    assert page.locator('[data-testid="stImage"]').count() == 0
    drag = plot.locator(".nsewdrag").first
    box = drag.bounding_box()
    assert box and box["width"] > 100
    lasso_whole_plot(page, box, margin=0.02)          # dragmode is lasso
    page.get_by_text("selected point(s)").first.wait_for(timeout=60_000)
    page.locator('[data-testid="stImage"]').first.wait_for(timeout=60_000)
    settle(page, 60_000)
    n_images = page.locator('[data-testid="stImage"] img').count()
    assert n_images > 5, n_images
    assert page.get_by_text("Nearest training neighbours").first.is_visible()
    page.screenshot(path=str(shots_dir() / "explorer-selection.png"), full_page=True)


def lasso_whole_plot(page, box: dict, margin: float = 0.01) -> None:
    """Drag a lasso around the plotting area ``box`` (a bounding box), ``margin`` inside it."""
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    lo, hi = margin, 1 - margin
    corners = [(lo, lo), (hi, lo), (hi, hi), (lo, hi), (lo, lo + 0.01)]
    page.mouse.move(x0 + w * corners[0][0], y0 + h * corners[0][1])
    page.mouse.down()
    for fx, fy in corners[1:]:
        page.mouse.move(x0 + w * fx, y0 + h * fy, steps=12)
    page.mouse.up()
