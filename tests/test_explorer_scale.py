"""Large runs in the embedding explorer: UMAP fitted on a subsample with the rest placed by
``transform``, PCA by covariance, maps of 100k points drawn as a density image with an exact
sample on top, synthetic points that never hide the real ones, the light point table (no
embeddings until a selection asks for them) of subsampled training splits, and, in a real
Chromium, a 100k-point run whose map appears."""
# ruff: noqa: F811

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest

from app import plots, selection
from dml import projection as P
from dml.runs import Run, RunWriter
from tests.test_projection import _unit, fake_eval, make_run

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- projection

def test_fit_subsample_is_stratified_seeded_and_bounded():
    groups = np.concatenate([np.repeat(np.arange(50), 40), [99]])     # 2,001 points
    idx = P.fit_subsample(groups, 500, seed=0)
    assert len(idx) == 500 and np.all(np.diff(idx) > 0)
    assert set(groups[idx]) == set(groups)                  # every group, the single one too
    per = np.bincount(groups[idx][groups[idx] < 50])
    assert per.min() >= 9 and per.max() <= 11               # each keeps its share
    np.testing.assert_array_equal(idx, P.fit_subsample(groups, 500, seed=0))
    assert not np.array_equal(idx, P.fit_subsample(groups, 500, seed=1))
    assert P.fit_subsample(groups, None) is None and P.fit_subsample(groups, 0) is None
    assert P.fit_subsample(groups, len(groups)) is None
    assert len(P.fit_subsample(groups, 20)) == 20           # fewer than groups: still bounded


def test_umap_fits_a_subsample_and_places_every_other_point():
    ev = fake_eval(n_train=360, n_test=240, n_syn=40, classes=6)
    stats: dict = {}
    proj = P.compute_projection(ev, "umap", fit_max=150, stats=stats)
    assert stats["fit_points"] == 150
    assert stats["transform_points"] == 360 + 240 - 150 + 40
    assert stats["transform_s_per_10k"] > 0
    assert proj["train"].shape == (360, 2) and proj["test"].shape == (240, 2)
    assert proj["synthetic"].shape == (40, 2)
    xy = np.concatenate([proj["train"], proj["test"]])
    assert np.isfinite(xy).all()
    # the fitted points are UMAP's fit of the subsample alone: placing the others moved none
    fit = P.fit_subsample(P.fit_groups(ev), 150, 0)
    x = np.concatenate(list(P.real_points(ev).values()))
    np.testing.assert_array_equal(xy[fit], P.fit_umap(x[fit]).embedding)
    # placed points land among their own class: the nearest map neighbour shares it
    y = np.concatenate([ev["train_labels"], ev["test_labels"]])
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.9
    again = P.compute_projection(ev, "umap", fit_max=150)      # reproducible
    np.testing.assert_array_equal(again["test"], proj["test"])
    # at most fit_max points: fitted on all, as before
    small: dict = {}
    P.compute_projection(ev, "pca", stats=small)
    assert small["fit_points"] == 600


def test_transform_reproduces_umaps_own_transform_in_chunks():
    ev = fake_eval(n_train=300, n_test=150, n_syn=0)
    x = np.concatenate(list(P.real_points(ev).values()))
    fitted = P.fit_umap(x[:250])
    ref = fitted.transform_reference(x[250:])
    np.testing.assert_array_equal(fitted.transform(x[250:]), ref)   # same steps, same result
    seen = []
    chunked = fitted.transform(x[250:], chunk=64, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(64, 200), (128, 200), (192, 200), (200, 200)]
    assert chunked.shape == (200, 2) and np.isfinite(chunked).all()
    assert np.abs(chunked - ref).max() < 0.2 * np.ptp(fitted.embedding)


def test_fit_size_comes_from_the_run_config(tmp_path):
    def run_with(train):
        w = RunWriter.create(tmp_path, {"data": {"name": "digits"}, "loss": {"name": "contrastive"},
                                        "mixing": {"name": "none"}, "train": train})
        w.save_eval(1, **fake_eval(n_train=200, n_test=100, n_syn=10))
        w.set_status("finished", best={"epoch": 1})
        return w.run

    assert P.run_fit_max(run_with({"seed": 0}).path) == P.DEFAULT_FIT_MAX == 10_000
    assert P.run_fit_max(run_with({P.FIT_MAX_KEY: 0}).path) is None
    run = run_with({P.FIT_MAX_KEY: 120})
    assert P.run_fit_max(run.path) == 120
    P.precompute_projections(run.path, "best", ("umap",))
    meta = P.load_projection(run.path, 1, "umap")["meta"]
    assert meta["fit_max"] == 120 and meta["fit_points"] == 120
    assert meta["transform_points"] == 300 - 120 + 10
    other = make_run(tmp_path / "b", {1: fake_eval(n_train=200, n_test=100)}, best=1)
    P.get_projection(other.path, 1, "umap", fit_max=50)            # an explicit fit size wins
    assert P.load_projection(other.path, 1, "umap")["meta"]["fit_points"] == 50


def test_pca_of_many_points_is_the_svd_one():
    x = _unit(np.random.default_rng(4).standard_normal((3000, 12)) * np.linspace(3, 0.5, 12))
    mean, comps = P.fit_pca(x)                                # 3000 > 4 x 12: covariance
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    ref = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
    np.testing.assert_allclose(comps, ref, atol=1e-4)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-6)


# --------------------------------------------------------------------------- big tables

def big_table(n_real: int = 100_000, n_syn: int = 2048, classes: int = 100,
              seed: int = 0) -> selection.PointTable:
    """A point table of a large evaluation (no embeddings: the app's light table), classes
    clustered on the map, synthetic points piled between pairs of clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, (classes, 2))
    n_tr = int(n_real * 0.6)
    ytr = rng.integers(0, classes // 2, n_tr)
    yte = rng.integers(classes // 2, classes, n_real - n_tr)
    parents = rng.integers(0, 64, (n_syn, 2))
    probe = rng.choice(n_tr, 64, replace=False)
    ev = {"train_labels": ytr, "test_labels": yte, "synthetic_parents": parents,
          "probe_index": probe, "probe_labels": ytr[probe],
          "synthetic_weight": rng.uniform(0, 1, n_syn).astype(np.float32),
          "synthetic_kind": np.array(["metrix-embed"] * n_syn)}
    pa, pb = ytr[probe[parents[:, 0]]], ytr[probe[parents[:, 1]]]
    proj = {"train": centres[ytr] + rng.standard_normal((n_tr, 2)) * 0.4,
            "test": centres[yte] + rng.standard_normal((len(yte), 2)) * 0.4,
            "synthetic": (centres[pa] + centres[pb]) / 2 + rng.standard_normal((n_syn, 2)) * 0.05}
    return selection.build_point_table(ev, {k: v.astype(np.float32) for k, v in proj.items()})


def _png(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
                      .convert("RGBA"))


def test_map_of_100k_points_is_a_density_image_with_an_exact_sample():
    pt = big_table()
    vis = selection.visible_mask(pt, ["train", "test"], None, True)
    t0 = time.perf_counter()
    fig, trace_ids = plots.map_figure(pt, vis, height=620)
    built = time.perf_counter() - t0
    payload = pio.to_json(fig, validate=False)
    meta = fig.layout.meta
    assert meta["rendering"] == "density" and meta["real"] == 100_000
    assert len(payload) < 1_000_000, len(payload)     # every point as a marker: 3.5 MB
    assert built < 10, built                           # ~0.2 s on an idle core
    markers = {t.name: t for t in fig.data if t.x is not None and len(t.x) > 2}
    assert set(markers) == {"train", "test", "synthetic"}
    assert len(markers["train"].x) + len(markers["test"].x) == plots.SAMPLE_POINTS
    assert len(markers["synthetic"].x) == 2048           # synthetic points: always exact
    data = [t for t in fig.data if t.x is not None and t.x[0] is not None]   # no legend chips
    assert len(trace_ids) == len(data) and data[0].name == "extent"   # the image's corners
    assert not len(trace_ids[0]) and data[0].marker.opacity == 0
    for tr, ids in zip(data[1:], trace_ids[1:]):
        assert len(ids) == len(tr.x) and vis[ids].all()
    # the image: data coordinates covering every point, coloured where the points are
    (image,) = fig.layout.images
    assert (image.xref, image.yref, image.layer, image.sizing) == ("x", "y", "below", "stretch")
    xy = pt.xy[vis]
    assert image.x <= xy[:, 0].min() and image.x + image.sizex >= xy[:, 0].max()
    assert image.y >= xy[:, 1].max() and image.y - image.sizey <= xy[:, 1].min()
    rgba = _png(image.source)
    assert rgba.shape[1] == plots.DENSITY_PIXELS or rgba.shape[0] == plots.DENSITY_PIXELS
    assert 0.02 < (rgba[..., 3] > 0).mean() < 0.9
    assert len({tuple(p) for p in rgba[rgba[..., 3] > 200][:, :3][::50]}) > 20   # many classes
    # the sample is fixed: hiding the synthetic points or the test split keeps the same train
    fig2, _ = plots.map_figure(pt, selection.visible_mask(pt, ["train", "test"], None, False))
    same = {t.name: t for t in fig2.data}
    np.testing.assert_array_equal(same["train"].customdata[:, 0], markers["train"].customdata[:, 0])
    # few enough visible points (one class isolated): every point exact, no image
    one = selection.visible_mask(pt, ["train", "test"], [3], True)
    fig3, ids3 = plots.map_figure(pt, one)
    assert fig3.layout.meta["rendering"] == "points" and not fig3.layout.images
    assert sum(len(i) for i in ids3) == int(one.sum())


def test_exact_rendering_up_to_the_threshold():
    pt = big_table(n_real=6000, n_syn=100)
    vis = selection.visible_mask(pt, ["train", "test"])
    fig, ids = plots.map_figure(pt, vis)
    assert fig.layout.meta == {"rendering": "points", "real": 6000, "drawn": 6100}
    assert not fig.layout.images and sum(len(i) for i in ids) == 6100
    dense, _ = plots.map_figure(pt, vis, exact_max=5000)
    assert dense.layout.meta["rendering"] == "density"


def test_density_image_of_single_points_and_piles():
    xy = np.array([[0.25, 0.5], [0.75, 0.5]] + [[0.5, 0.9]] * 100, np.float32)
    rgb = np.array([[255, 0, 0], [0, 0, 255]] + [[0, 255, 0]] * 100, np.float32)
    img, (w, h) = plots.density_image(xy, rgb, (0, 1, 0, 1), pixels=100)
    assert img.shape == (100, 100, 4) and (w, h) == (100, 100)
    red, blue, pile = img[50, 25], img[50, 75], img[10, 50]
    assert np.abs(red[:3].astype(int) - [255, 0, 0]).max() <= 1
    assert np.abs(blue[:3].astype(int) - [0, 0, 255]).max() <= 1
    assert abs(int(red[3]) - 0.55 * 255) <= 2           # one marker of opacity 0.55
    assert pile[3] == 255 and np.abs(pile[:3].astype(int) - [0, 255, 0]).max() <= 1
    assert img[90, 10, 3] == 0                           # nothing there: transparent


def test_synthetic_points_never_hide_the_real_ones():
    alone = np.array([[0, 0], [5, 5]], np.float32)
    np.testing.assert_allclose(plots.pile_opacity(alone, (0, 5, 0, 5)), [0.8, 0.8])
    for m in (2, 10, 500):
        a = plots.pile_opacity(np.zeros((m, 2), np.float32), (-1, 1, -1, 1))
        covered = 1 - np.prod(1 - a.astype(np.float64))
        assert covered <= 0.5 + 1e-3, (m, covered)        # at least half of a real point shows
    pt = big_table(n_real=3000, n_syn=600)
    fig, _ = plots.map_figure(pt, selection.visible_mask(pt, ["train", "test"]))
    names = [t.name for t in fig.data]
    syn = fig.data[names.index("synthetic")]
    assert names.index("synthetic") > names.index("test")  # on top, but see-through
    assert syn.marker.symbol == plots.SYNTHETIC_SYMBOL == "x-thin-open"   # outlines only
    op = np.asarray(syn.marker.opacity)
    assert op.shape == (600,) and 0 < op.min() and op.max() <= 0.8       # per point
    chip = fig.data[names.index("synthetic (600)")]
    assert chip.marker.line.width > 0                   # the outline-only chip is visible


# --------------------------------------------------------------------------- light table

def test_point_table_of_a_subsampled_training_split():
    ev = {"train_labels": np.array([1, 1, 2, 3]), "train_index": np.array([5, 9, 12, 20]),
          "test_labels": np.array([7]), "probe_index": np.array([9, 30, 20]),
          "probe_labels": np.array([1, 8, 3]), "synthetic_parents": np.array([[0, 1], [2, 0]]),
          "synthetic_top_classes": np.array([[6, 6], [6, 6]]),
          "synthetic_weight": np.array([0.5, 0.25], np.float32)}
    proj = {"train": np.zeros((4, 2), np.float32), "test": np.zeros((1, 2), np.float32),
            "synthetic": np.ones((2, 2), np.float32)}
    pt = selection.build_point_table(ev, proj)
    assert pt.emb.shape == (7, 0)                              # built without embeddings
    assert pt.index[pt.split == "train"].tolist() == [5, 9, 12, 20]   # images to show
    syn = pt.split == "synthetic"
    assert pt.parents[syn].tolist() == [[1, 8], [3, 1]]        # the probe batch's own classes
    assert pt.parent_index[syn].tolist() == [[9, 30], [20, 9]]
    # written before probe_labels: the classes through train_index where the parent was
    # embedded, else the strategy's top classes
    older = {k: v for k, v in ev.items() if k != "probe_labels"}
    pt2 = selection.build_point_table(older, proj)
    assert pt2.parents[pt2.split == "synthetic"].tolist() == [[1, 6], [3, 1]]
    # older still (the whole training split embedded): train_labels at the probe indices
    oldest = {k: v for k, v in older.items() if k != "train_index"}
    oldest["train_labels"] = np.arange(40) % 10
    proj["train"] = np.zeros((40, 2), np.float32)
    pt3 = selection.build_point_table(oldest, proj)
    assert pt3.parents[pt3.split == "synthetic"].tolist() == [[9, 0], [0, 9]]
    assert pt3.index[pt3.split == "train"].tolist() == list(range(40))


def test_map_arrays_leave_the_embeddings_for_later(tmp_path):
    ev = fake_eval()
    run = make_run(tmp_path, {1: ev}, best=1)
    light = selection.read_map_arrays(run.eval_path(1))
    assert not [k for k in light if k.endswith("_embeddings")]
    proj = P.get_projection(run.path, 1, "pca")
    pt = selection.build_point_table(light, proj)
    full = selection.build_point_table(run.load_eval(1), proj)
    assert pt.emb.shape == (230, 0) and full.emb.shape == (230, 8)
    for k in ("split", "index", "label", "xy", "parents", "parent_index", "kind"):
        np.testing.assert_array_equal(getattr(pt, k), getattr(full, k))
    emb = selection.read_point_embeddings(run.eval_path(1), pt)
    assert emb.dtype == np.float32 and emb.shape == (230, 8)   # as stored (float16 + float32)
    np.testing.assert_allclose(emb.astype(np.float32), full.emb, atol=1e-3)
    ids = np.array([0, 130, 205])
    assert selection.neighbours_of_selection(pt, ids, 3, emb=emb) == \
        selection.neighbours_of_selection(full, ids, 3)


def test_lasso_over_many_points_matches_the_even_odd_rule():
    rng = np.random.default_rng(5)
    xy = rng.uniform(-1, 1, (20_000, 2)).astype(np.float32)
    t = np.sort(rng.uniform(0, 2 * np.pi, 300))
    r = rng.uniform(0.3, 0.9, 300)
    px, py = r * np.cos(t), r * np.sin(t)
    got = selection.points_in_lasso(xy, px, py)
    x, y = xy[:, 0][:, None].astype(float), xy[:, 1][:, None].astype(float)    # all at once
    x1, y1, x2, y2 = px[None], py[None], np.roll(px, -1)[None], np.roll(py, -1)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    want = np.flatnonzero((((y1 > y) != (y2 > y)) & (x < x_at)).sum(1) % 2 == 1)
    np.testing.assert_array_equal(got, want)
    assert 0 < len(got) < len(xy)


# --------------------------------------------------------------------------- in a browser

def make_big_run(root: Path, n_real: int = 100_000, dim: int = 16) -> Run:
    """A finished 100k-point run with both maps cached (the "UMAP" one is a clustered layout
    written through the cache, so no UMAP is fitted here)."""
    pt = big_table(n_real)
    rng = np.random.default_rng(1)
    centres = _unit(rng.standard_normal((100, dim)))
    emb = {s: _unit(centres[pt.label[pt.split == s]]
                    + 0.2 * rng.standard_normal(((pt.split == s).sum(), dim))).astype(np.float16)
           for s in ("train", "test")}
    n_syn = int((pt.split == "synthetic").sum())
    w = RunWriter.create(root, {"name": "big", "data": {"name": "digits"},
                                "loss": {"name": "contrastive"}, "mixing": {"name": "none"},
                                "train": {"seed": 0}}, run_id="big-100k")
    w.save_eval(1, train_embeddings=emb["train"], train_labels=pt.label[pt.split == "train"],
                test_embeddings=emb["test"], test_labels=pt.label[pt.split == "test"],
                synthetic_embeddings=_unit(rng.standard_normal((n_syn, dim))),
                synthetic_parents=rng.integers(0, 64, (n_syn, 2)),
                synthetic_weight=pt.weight[pt.split == "synthetic"],
                synthetic_kind=np.array(["metrix-embed"] * n_syn),
                probe_index=np.arange(64), probe_labels=pt.label[:64])
    w.set_status("finished", best={"epoch": 1})
    for method in ("umap", "pca"):
        P.save_projection(w.path, 1, method, {s: pt.xy[pt.split == s]
                                              for s in ("train", "test", "synthetic")})
    return w.run


MAP_WITH_IMAGE = """() => {
  const g = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
  return !!(g && g._fullData && g._fullData.length && g.querySelector('canvas')
            && g.layout.meta && g.querySelector('.imagelayer image, .layer-below image'));
}"""


@pytest.mark.browser
@pytest.mark.slow
def test_browser_opens_a_100k_point_map(tmp_path):
    from tests.servers import app_server
    from tests.test_browser import (CHROMIUM, CHROMIUM_ARGS, _free_port, _require_browser,
                                    lasso_whole_plot, settle)

    _require_browser()
    from playwright.sync_api import sync_playwright

    root = tmp_path / "runs"
    run = make_big_run(root)
    shots = Path(os.environ.get("DML_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with app_server(root, _free_port(), REPO, env={"DML_MAP_TIMINGS": "1"},
                    log_path=tmp_path / "server.log") as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            t0 = time.perf_counter()
            page.goto(f"{url}/explorer?run={run.id}")
            page.wait_for_function(MAP_WITH_IMAGE, timeout=120_000, polling=100)
            seconds = time.perf_counter() - t0
            meta = page.evaluate("() => document.querySelector('.js-plotly-plot').layout.meta")
            assert meta["rendering"] == "density" and meta["real"] == 100_000, meta
            drawn = page.evaluate("() => document.querySelector('.js-plotly-plot')._fullData"
                                  ".reduce((n, t) => n + ((t.x && t.x.length > 2) ? "
                                  "t.x.length : 0), 0)")
            assert drawn == plots.SAMPLE_POINTS + 2048
            settle(page, 60_000)
            page.screenshot(path=str(shots / "explorer-100k.png"))
            assert page.locator('[data-testid="stException"]').count() == 0
            # a lasso around the whole plot selects every point, not only the drawn sample
            drag = page.locator(".js-plotly-plot .nsewdrag").first
            lasso_whole_plot(page, drag.bounding_box(), margin=0.01)
            page.get_by_text("102048 selected point(s)").first.wait_for(timeout=120_000)
            settle(page, 120_000)
            page.screenshot(path=str(shots / "explorer-100k-selection.png"), full_page=True)
            browser.close()
    steps = [json.loads(line.split("explorer timings ", 1)[1]) for line in
             (tmp_path / "server.log").read_text(errors="replace").splitlines()
             if "explorer timings " in line]
    assert steps and steps[0]["rendering"] == "density"
    print(f"first map of 100k points on a fresh server: {seconds:.2f} s; script steps "
          f"{steps[0]}; screenshots in {shots}")
    assert seconds < 60, seconds
