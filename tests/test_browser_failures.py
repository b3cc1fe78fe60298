"""The "Retrieval failures" page in a real Chromium: two digits runs of the same split (a baseline
and a Metrix run, written here, no training); the lowest-AP queries with their thumbnails, a class
filter, the two-run diff, a click through to the explorer with the query ringed, and a run whose
data set is missing (captions instead of thumbnails). Screenshots
go to $DML_SCREENSHOTS (default: screenshots/).

Skips when Chromium or Playwright is missing, except under CI=true, where that fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.failures import PAGE, RIGHT, WRONG
from tests.servers import app_server
from tests.test_browser import (CHROMIUM, CHROMIUM_ARGS, _free_port, _require_browser,
                                open_page, settle, shots_dir)
from tests.test_failures import top1_by_brute_force, write_runs

pytestmark = pytest.mark.browser      # ~20 s: a server start, two pages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _require_browser()
    return write_runs(tmp_path_factory.mktemp("failure-runs"), missing_data=True)


@pytest.fixture(scope="module")
def server(runs):
    with app_server(runs["root"], _free_port(), REPO) as url:
        yield url


def disagreeing_class(root: Path, epoch: int) -> tuple[int, int]:
    """(the class with the most test queries the Metrix run gets right at top-1 and the
    baseline wrong, how many), by brute force on the saved embeddings."""
    from dml.runs import Run

    a, b = (Run(root / r).load_eval(epoch) for r in ("metrix", "baseline"))
    y = a["test_labels"]
    wins = top1_by_brute_force(a["test_embeddings"], y) & ~top1_by_brute_force(
        b["test_embeddings"], y)
    counts = np.bincount(y[wins], minlength=int(y.max()) + 1)
    return int(counts.argmax()), int(counts.max())


def row_heads(page) -> list[str]:
    return [t for t in page.locator('[data-testid="stMarkdownContainer"] p').all_inner_texts()
            if t.startswith(("test #", "val #"))]


def test_failures_page_filter_diff_and_click_through_to_the_map(server, runs):
    _require_browser()
    from playwright.sync_api import sync_playwright

    out = shots_dir()
    cls, wins = disagreeing_class(runs["root"], 2)
    assert wins > 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        open_page(page, f"{server}/failures?run=metrix&epoch=2", "Retrieval failures")
        strips = page.locator(".rf-strip")
        strips.first.wait_for(timeout=30_000)
        assert strips.count() == PAGE
        first = strips.first
        assert first.locator("img").count() == 9            # the query and 8 neighbours
        # every thumbnail drawn (decoded, not a broken image), borders green or red
        assert page.evaluate("""() => [...document.querySelectorAll('.rf-strip img')]
                                 .every(i => i.complete && i.naturalWidth > 0)""")
        html = first.inner_html()
        assert RIGHT in html or WRONG in html
        heads = row_heads(page)
        assert len(heads) == PAGE and "AP@R 0.0" in heads[0]
        page.screenshot(path=str(out / "failures-lowest-ap.png"), full_page=False)

        # filter by a class (digits: the class id is the digit): every row is of that class
        box = page.locator('[data-testid="stMultiSelect"]').first
        box.click()
        page.keyboard.type(str(cls))
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        page.wait_for_function(f"""() => [...document.querySelectorAll(
            '[data-testid="stMarkdownContainer"] p')].filter(p => p.innerText.startsWith(
            'test #')).every(p => p.innerText.includes('class {cls} '))""", timeout=30_000)
        settle(page, 30_000)
        heads = row_heads(page)
        assert heads and all(f"class {cls} " in h for h in heads)
        page.screenshot(path=str(out / "failures-class-filter.png"), full_page=False)

        # the two-run diff (the class still picked): counts both ways, per row the query and
        # both runs' lists
        page.get_by_text("Where two runs differ").first.click()
        page.get_by_text("metrix right, baseline wrong").first.wait_for(timeout=30_000)
        settle(page, 30_000)
        labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
        assert any("baseline right, metrix wrong" in t for t in labels), labels
        values = page.locator('[data-testid="stMetricValue"]').all_inner_texts()
        assert int(values[0].replace(",", "")) == wins      # what brute force counts
        heads = row_heads(page)
        assert len(heads) == min(wins, PAGE) and all(f"class {cls} " in h for h in heads)
        assert page.locator(".rf-strip").count() == 3 * len(heads)   # query, run A, run B
        page.screenshot(path=str(out / "failures-two-runs.png"), full_page=False)

        # click through: the first row's "metrix map" opens the explorer with the query ringed
        query = heads[0].split("·")[0].strip()                       # "test #123"
        page.locator('[data-testid="stPageLink-NavLink"]', has_text="metrix map").first.click()
        page.get_by_role("heading", name="Embedding explorer", exact=True).first.wait_for(
            timeout=60_000)
        page.get_by_text(f"Ringed: {query}").first.wait_for(timeout=60_000)
        settle(page, 60_000)
        assert "focus=" in page.url and "run=metrix" in page.url
        plot = page.locator(".js-plotly-plot").first
        assert plot.locator("g.legend", has_text="focus").count() == 1
        assert page.get_by_text("1 selected point(s)").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(out / "failures-explorer-focus.png"), full_page=False)

        # a run whose data set cannot be loaded: the same rows, captions in place of images
        open_page(page, f"{server}/failures?run=no-data", "Retrieval failures")
        page.locator(".rf-strip").first.wait_for(timeout=30_000)
        assert page.locator(".rf-strip").count() == PAGE
        assert page.locator(".rf-strip img").count() == 0
        assert page.get_by_text("cannot be loaded").count() >= 1
        page.screenshot(path=str(out / "failures-no-images.png"), full_page=False)
        browser.close()
