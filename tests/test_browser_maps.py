"""Maps arriving in a real Chromium: a finished run whose UMAP map is still queued for the
background map process (dml.maps) opens in the explorer on its PCA map with a note that says
where the UMAP map stands; when the background process has made it, the page switches to it
by itself. Screenshots go to $DML_SCREENSHOTS (default: screenshots/).

Skips when Chromium or Playwright is missing, except under CI=true, where that fails.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from tests.servers import app_server
from tests.test_browser import (CHROMIUM, CHROMIUM_ARGS, _free_port, _require_browser,
                                open_page, settle, shots_dir)
from tests.test_browser_timeline import write_run

pytestmark = pytest.mark.browser      # ~20-70 s: a server start and one UMAP (numba loading)

REPO = Path(__file__).resolve().parents[1]


def test_a_background_map_shows_up_in_the_explorer_when_it_is_made(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    from dml import maps
    from dml.projection import load_projection, precompute_projections

    root = tmp_path / "runs"
    root.mkdir()
    run = write_run(root, "metrix-embed", [1, 2], finish=True).run
    precompute_projections(run.path, "last", ("pca",))            # PCA made, UMAP to come
    q = root / maps.QUEUE_DIR
    q.mkdir()
    fd = os.open(q / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)           # another run's maps "hold" the queue
    try:
        st = maps.enqueue(run.path, "last")
        assert st["epochs"] == [2] and "umap" in st["methods"]
        out = shots_dir()
        with app_server(root, _free_port(), REPO) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            open_page(page, f"{url}/explorer?run={run.id}", "Embedding explorer")
            note = page.get_by_text("The UMAP map of epoch 2 is queued behind other runs' maps")
            note.first.wait_for(timeout=30_000)
            assert "(1 to go)" in note.first.inner_text()      # PCA was made already
            assert page.get_by_text("finished · maps queued").count() == 0   # (runs page only)
            page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)   # PCA meanwhile
            page.screenshot(path=str(out / "maps-queued.png"), full_page=True)

            os.close(fd)                                # the queue is free: a drainer starts
            fd = -1
            maps.start_drainer(root, log=q / "log")
            page.get_by_text("arrived from the background").first.wait_for(timeout=240_000)
            settle(page, 60_000)
            assert load_projection(run.path, 2, "umap") is not None
            assert maps.maps_status(run.path)["state"] == "done"
            page.get_by_text("The UMAP map of epoch 2 is").first.wait_for(state="detached",
                                                                          timeout=10_000)
            assert page.get_by_role("radio", name="UMAP").is_checked()   # switched by itself
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(out / "maps-arrived.png"), full_page=True)

            open_page(page, f"{url}/", "Runs")          # the runs table: plain finished now
            assert page.get_by_text("maps queued").count() == 0
            browser.close()
    finally:
        if fd >= 0:
            os.close(fd)
