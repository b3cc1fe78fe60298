"""The "Through time" page in a real Chromium: two small runs (a Metrix run still training, with
synthetic points, and the baseline of the same seed) with 3 evaluations each, side by side; the
epoch slider moves both panels, Play animates, and a fourth evaluation landing while the page is
open adds a frame. Screenshots go to $DML_SCREENSHOTS (default: screenshots/).

Skips when Chromium or Playwright is missing, except under CI=true, where that fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.servers import app_server
from tests.test_browser import (CHROMIUM, CHROMIUM_ARGS, _free_port, _require_browser,
                                open_page, settle, shots_dir)

pytestmark = pytest.mark.browser      # ~14 s: a server start, one page, one new evaluation

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, D = 8, 30, 16


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def evaluation(epoch: int, seed: int, mixing: bool) -> dict[str, np.ndarray]:
    """Training and test embeddings whose classes gather as the epochs pass (the same images
    every time: same noise, less of it), and, for a mixing run, synthetic points between pairs
    of the probe batch's images; the training split is a subsample with ``train_index``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2 * CLASSES, D)) * 2
    noise = rng.standard_normal((2, CLASSES * PER_CLASS, D))
    drift = np.linalg.qr(rng.standard_normal((D, D)))[0]
    spread = 1.6 / epoch

    def split(k, offset):
        y = np.repeat(np.arange(CLASSES), PER_CLASS)
        return _unit((centres[y + offset] + noise[k] * spread) @ np.linalg.matrix_power(
            drift, epoch)), y + offset

    tr, ytr = split(0, 0)
    te, yte = split(1, CLASSES)
    ev = {"train_embeddings": tr.astype(np.float16), "train_labels": ytr,
          "train_index": np.arange(len(tr)) * 3 + 1,
          "test_embeddings": te.astype(np.float16), "test_labels": yte}
    if mixing:
        probe = np.arange(0, len(tr), PER_CLASS // 4)
        prng = np.random.default_rng(epoch)
        parents = prng.integers(0, len(probe), (120, 2))
        lam = prng.uniform(0.2, 0.8, 120).astype(np.float32)
        syn = _unit(lam[:, None] * tr[probe[parents[:, 0]]]
                    + (1 - lam[:, None]) * tr[probe[parents[:, 1]]])
        ev.update(synthetic_embeddings=syn, synthetic_parents=parents, synthetic_weight=lam,
                  synthetic_kind=np.array(["metrix-embed"] * 120), probe_index=probe,
                  probe_labels=ytr[probe])
    return ev


def write_run(root: Path, mixing: str, epochs, finish: bool):
    from dml.config import RunConfig
    from dml.runs import RunWriter

    cfg = RunConfig().with_overrides([f"mixing.name={mixing}", "train.seed=0",
                                      f"name=tl-{mixing}-s0", "train.epochs=4"]).to_dict()
    w = RunWriter.create(root, cfg, run_id=f"tl-{mixing}")
    w.write_class_names({c: f"c{c}" for c in range(2 * CLASSES)})
    for e in epochs:
        add_evaluation(w, e, mixing != "none")
    if finish:
        w.set_status("finished", best={"epoch": epochs[-1]})
        w.close()
    return w


def add_evaluation(w, epoch: int, mixing: bool) -> None:
    w.save_eval(epoch, **evaluation(epoch, 0, mixing))
    w.append_metrics({"epoch": epoch, "test": {"recall@1": 0.4 + 0.1 * epoch},
                      **({"synthetic_points": 120} if mixing else {})})
    w.set_status("running", progress={"epoch": epoch, "epochs": 4})


@pytest.fixture(scope="module")
def timeline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeline-runs")
    base = write_run(root, "none", [1, 2, 3], finish=True)
    live = write_run(root, "metrix-embed", [1, 2, 3], finish=False)   # still training
    yield {"root": root, "live": live, "baseline": base.run.id}
    live.close()


@pytest.fixture(scope="module")
def server(timeline_runs):
    _require_browser()
    with app_server(timeline_runs["root"], _free_port(), REPO) as url:
        yield url


def slider_state(plot) -> tuple[str, list[str]]:
    """(the slider's current value text, its tick labels)."""
    current = plot.locator("g.slider-group > text.slider-label").first
    ticks = plot.locator("g.slider-label-group text.slider-label").all_text_contents()
    return current.text_content(), ticks


def move_slider(page, plot, label: str) -> None:
    """Drag the slider's grip onto the tick ``label``, as a user does."""
    tick = plot.locator("g.slider-label-group text.slider-label", has_text=label).first
    grip = plot.locator("rect.slider-grip-rect").first.bounding_box()
    to = tick.bounding_box()
    y = grip["y"] + grip["height"] / 2
    page.mouse.move(grip["x"] + grip["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(to["x"] + to["width"] / 2, y, steps=8)
    page.mouse.up()


def titles(plot) -> list[str]:
    return plot.locator(".annotation-text").all_text_contents()


def test_the_epoch_slider_moves_two_aligned_runs_and_new_evaluations_add_frames(
        server, timeline_runs):
    _require_browser()
    from playwright.sync_api import sync_playwright

    live = timeline_runs["live"]
    out = shots_dir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        open_page(page, f"{server}/timeline?run={live.run.id}", "Through time")
        plot = page.locator(".js-plotly-plot").first
        plot.wait_for(timeout=60_000)
        assert plot.locator("canvas").count() > 0                    # WebGL scatter
        page.get_by_text("still training").first.wait_for(timeout=10_000)
        # the baseline of the same seed is picked as the second panel
        heads = titles(plot)
        assert len(heads) == 2, heads
        assert "metrix-embed" in heads[0] and "/none" in heads[1], heads
        current, ticks = slider_state(plot)
        assert ticks == ["1", "2", "3"], ticks
        assert current.endswith("3"), current                 # a training run opens at its last
        assert page.get_by_text("synthetic (metrix-embed)").count() >= 1
        page.screenshot(path=str(out / "timeline-open.png"), full_page=True)

        # move the slider to the first evaluation: both panels show epoch 1
        move_slider(page, plot, "1")
        page.wait_for_function("""() => [...document.querySelectorAll(
            '.js-plotly-plot .annotation-text')].every(e => e.textContent.includes('epoch 1'))""",
                               timeout=10_000)
        assert slider_state(plot)[0].endswith("1")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "timeline-epoch1.png"), full_page=True)

        # Play: the frames run through to the last evaluation
        plot.locator("g.updatemenu-button", has_text="Play").first.click()
        page.wait_for_timeout(700)
        page.screenshot(path=str(out / "timeline-playing.png"), full_page=True)
        page.wait_for_function("""() => [...document.querySelectorAll(
            '.js-plotly-plot .annotation-text')].every(e => e.textContent.includes('epoch 3'))""",
                               timeout=20_000)

        # the run trains on: a fourth evaluation lands and the page adds its frame
        add_evaluation(live, 4, mixing=True)
        page.wait_for_function("""() => [...document.querySelectorAll(
            '.js-plotly-plot g.slider-label-group text.slider-label')].length === 4""",
                               timeout=60_000, polling=500)
        settle(page, 60_000)
        plot = page.locator(".js-plotly-plot").first
        assert slider_state(plot)[1] == ["1", "2", "3", "4"]
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(out / "timeline-new-evaluation.png"), full_page=True)
        browser.close()
    # the cache of the running run was extended, not rebuilt: one file per split and method
    from dml.alignment import load_timeline
    tl = load_timeline(live.path, "train", "pca")
    assert tl is not None and tl.epochs.tolist() == [1, 2, 3, 4]
