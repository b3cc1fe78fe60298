"""Retrieval failures: the per-query retrieval of ``dml.metrics.query_retrieval`` against
hand-worked examples, a brute-force ranking and the metrics it must average to; the pure helpers
of the page (``app/failures.py``, the explorer's focus in ``app/selection.py`` and
``app/plots.py``); the page itself and the explorer's focus under ``AppTest`` on small runs
written here (no training), and once on the trainer's runs."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from app import failures, plots, selection
from dml.metrics import (query_retrieval, reference_split, retrieval_metrics,
                         split_retrieval_args)
from tests import test_app_fixtures

app_runs = test_app_fixtures.app_runs     # the trainer's runs (a fixture), for one test below

METHODS = ("faiss", "rank", "torch")


# ----------------------------------------------------------------------------- oracles
def brute_force(x, y, k, qx=None, qy=None):
    """Definition-level reference: float64 squared distances rounded to float32 (the ranking
    ``retrieval_metrics`` documents), a stable argsort (equal distances by the smaller index),
    the query itself left out in leave-one-out; per query AP@R, top-1 and the first k."""
    loo = qx is None
    if loo:
        qx, qy = x, y
    x64, q64 = np.asarray(x, np.float64), np.asarray(qx, np.float64)
    d = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1).astype(np.float32)
    ap, top1, nn = [], [], []
    for i in range(len(q64)):
        order = np.argsort(d[i], kind="stable")
        if loo:
            order = order[order != i]
        rel = y[order] == qy[i]
        r = int(rel.sum())
        if r:
            hits = np.cumsum(rel[:r])
            ap.append(sum(hits[j] / (j + 1) for j in range(r) if rel[j]) / r)
        else:
            ap.append(math.nan)
        top1.append(bool(r) and bool(rel[0]))
        nn.append(order[:k])
    return np.array(ap), np.array(top1), np.array(nn)


def grid_data(n, d, n_classes, seed, levels=3):
    """Points on a small integer grid: many exactly equal distances (float32 computes them
    exactly), so the order of ties decides ranks."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, levels, (n, d)).astype(np.float32),
            rng.integers(0, n_classes, n))


def clustered(n, d, n_classes, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d))
    y = rng.integers(0, n_classes, n)
    x = centres[y] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


# ----------------------------------------------------------------------------- hand-worked
# 1-D points 0, 1, 3, 4, 10, 20 of classes a a b a b c (c alone: R = 0, it does not count).
# Query 0: others by distance 1(a) 3(b) 4(a) 10(b): rel 1 0 1 0, R = 2, AP@R = (1/1)/2 = 0.5
# Query 1: 0(a) 3(b) 4(a): rel 1 0 1, R = 2, AP@R = 0.5
# Query 2 (b): 4(a) 1(a) 0(a) 10(b): rel 0 0 0 1, R = 1, AP@R = 0
# Query 3 (a): 3(b) 1(a) 0(a): rel 0 1 1, R = 2, AP@R = (P@2 = 1/2) / 2 = 0.25
# Query 4 (b): 4(a) 3(b) 1(a): rel 0 1 0, R = 1, AP@R = 0
# Query 5 (c): 10(b) 4(a) 3(b): no same-class reference, AP@R NaN, top-1 wrong
HAND_X = np.array([[0], [1], [3], [4], [10], [20]], np.float32)
HAND_Y = np.array([0, 0, 1, 0, 1, 2])
HAND_AP = [0.5, 0.5, 0.0, 0.25, 0.0, math.nan]
HAND_TOP1 = [True, True, False, False, False, False]
HAND_NN = [[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 1, 0], [3, 2, 1], [4, 3, 2]]
HAND_RIGHT = [[1, 0, 1], [1, 0, 1], [0, 0, 0], [0, 1, 1], [0, 1, 0], [0, 0, 0]]

# Query/gallery (In-Shop style): gallery 1(a) 4(b) 6(a) -2(b); queries 0(a), 5(b), 3(z).
# Query 0: 1(a, d 1) -2(b, 4) 4(b, 16) 6(a, 36): rel 1 0 0 1, R = 2, AP@R = 0.5
# Query 5: 4 and 6 tie at d = 1, the smaller index (4, gallery #1) first: rel 1 0 0 1, AP 0.5;
#          top-1 right only because of the tie rule
# Query 3 (z, no such class in the gallery): 4(#1) 1(#0) 6(#2) -2(#3), NaN
GAL_X = np.array([[1], [4], [6], [-2]], np.float32)
GAL_Y = np.array([0, 1, 0, 1])
QRY_X = np.array([[0], [5], [3]], np.float32)
QRY_Y = np.array([0, 1, 7])


@pytest.mark.parametrize("method", METHODS)
def test_hand_worked_leave_one_out(method):
    r = query_retrieval(HAND_X, HAND_Y, k=3, method=method)
    np.testing.assert_array_equal(r.ap, HAND_AP)         # NaN where it does not count
    assert r.top1.tolist() == HAND_TOP1
    assert r.neighbours.tolist() == HAND_NN
    assert r.correct.astype(int).tolist() == HAND_RIGHT
    assert r.valid.tolist() == [True] * 5 + [False]
    assert r.r.tolist() == [2, 2, 1, 2, 1, 0]
    assert r.leave_one_out and len(r) == 6
    # averaged over the queries that count: MAP@R = (0.5 + 0.5 + 0 + 0.25 + 0) / 5, R@1 = 2/5
    assert np.nanmean(r.ap) == pytest.approx(0.25) and r.top1[r.valid].mean() == 0.4


@pytest.mark.parametrize("method", METHODS)
def test_hand_worked_query_vs_gallery_with_a_tie(method):
    r = query_retrieval(GAL_X, GAL_Y, k=4, query_embeddings=QRY_X, query_labels=QRY_Y,
                        method=method)
    np.testing.assert_array_equal(r.ap, [0.5, 0.5, math.nan])
    assert r.top1.tolist() == [True, True, False]
    assert r.neighbours.tolist() == [[0, 3, 1, 2], [1, 2, 0, 3], [1, 0, 2, 3]]
    assert r.correct.astype(int).tolist() == [[1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert r.r.tolist() == [2, 2, 0] and not r.leave_one_out


def test_more_neighbours_asked_than_there_are():
    r = query_retrieval(HAND_X[:3], np.array([0, 0, 1]), k=10)
    assert r.neighbours.shape == (3, 2)            # leave-one-out: 2 others each
    assert r.neighbours.tolist() == [[1, 2], [0, 2], [1, 0]]
    lone = query_retrieval(HAND_X[:1], np.array([0]), k=3)   # nothing to rank at all
    assert lone.neighbours.shape == (1, 0) and np.isnan(lone.ap).all() and not lone.top1.any()


# ----------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_exact_ties(method, seed):
    """Integer points: most queries have equal distances among their first neighbours."""
    x, y = grid_data(300, 4, 6, seed)
    y[:2] = [97, 98]                                   # two lone queries
    ap, top1, nn = brute_force(x, y, 10)
    r = query_retrieval(x, y, k=10, method=method)
    assert (r.neighbours == nn).all()
    assert (r.correct == (y[nn] == y[:, None])).all()
    np.testing.assert_allclose(r.ap, ap, rtol=0, atol=1e-12)
    assert (r.top1 == top1).all()
    # and query vs gallery
    qx, qy = grid_data(80, 4, 6, seed + 10)
    ap, top1, nn = brute_force(x, y, 7, qx, qy)
    r = query_retrieval(x, y, k=7, query_embeddings=qx, query_labels=qy, method=method)
    assert (r.neighbours == nn).all()
    np.testing.assert_allclose(r.ap, ap, rtol=0, atol=1e-12)
    assert (r.top1 == top1).all()


@pytest.mark.parametrize("method", ["rank", "torch"])
def test_matches_brute_force_on_normalised_embeddings(method):
    """The rank and torch methods round float64 distances to float32 as the oracle does."""
    x, y = clustered(500, 16, 3, seed=2, noise=1.5)
    ap, top1, nn = brute_force(x, y, 10)
    r = query_retrieval(x, y, k=10, method=method)
    assert (r.neighbours == nn).all()
    np.testing.assert_allclose(r.ap, ap, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_per_query_values_average_to_the_metrics(method):
    """Large classes (auto: the rank method) and small ones (auto: faiss), a lone query."""
    for x, y in (clustered(1200, 8, 2, seed=0, noise=2.0), clustered(900, 8, 60, seed=1)):
        y = y.copy()
        y[0] = 1000
        m = retrieval_metrics(x, y, ks=(1,), method=method)
        r = query_retrieval(x, y, k=5, method=method)
        assert not r.valid[0] and r.valid[1:].all()
        assert r.ap[r.valid].mean() == pytest.approx(m["map@r"], abs=1e-12)
        assert r.r_precision[r.valid].mean() == pytest.approx(m["r_precision"], abs=1e-12)
        assert r.top1[r.valid].mean() == pytest.approx(m["recall@1"], abs=1e-12)
        # top-1 right is the first neighbour's flag
        assert (r.top1[r.valid] == r.correct[r.valid, 0]).all()


def test_torch_tensors_and_chunks_give_the_same_lists():
    torch = pytest.importorskip("torch")
    x, y = clustered(400, 8, 20, seed=3)
    ref = query_retrieval(x, y, k=6, method="faiss")
    for got in (query_retrieval(torch.from_numpy(x), torch.from_numpy(y), k=6),
                query_retrieval(x, y, k=6, method="faiss", chunk_size=64)):
        assert (got.neighbours == ref.neighbours).all()
        np.testing.assert_array_equal(got.ap, ref.ap)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="k must be at least 1"):
        query_retrieval(HAND_X, HAND_Y, k=0)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        query_retrieval(HAND_X, HAND_Y[:5])
    with pytest.raises(ValueError, match="query_labels are required"):
        query_retrieval(GAL_X, GAL_Y, query_embeddings=QRY_X)


def test_the_evaluation_ranks_test_queries_against_the_gallery():
    emb = {"test": QRY_X, "gallery": GAL_X, "val": HAND_X}
    labels = {"test": QRY_Y, "gallery": GAL_Y, "val": HAND_Y}
    assert reference_split("test", emb) == "gallery"
    assert reference_split("test", ["train", "test"]) == "test"
    assert reference_split("val", emb) == "val"
    args = split_retrieval_args(emb, labels, "test")
    assert args["embeddings"] is GAL_X and args["query_embeddings"] is QRY_X
    assert set(split_retrieval_args(emb, labels, "val")) == {"embeddings", "labels"}


# ----------------------------------------------------------------------------- page helpers
def write_eval(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def test_query_results_of_an_evaluation_file(tmp_path):
    f = write_eval(tmp_path / "gallery.npz", test_embeddings=QRY_X.astype(np.float16),
                   test_labels=QRY_Y, gallery_embeddings=GAL_X.astype(np.float16),
                   gallery_labels=GAL_Y, val_embeddings=HAND_X.astype(np.float16),
                   val_labels=HAND_Y, synthetic_embeddings=np.zeros((2, 1), np.float16))
    res = failures.query_results(f, "test", k=4)
    assert res["split"] == "test" and res["ref_split"] == "gallery"
    assert res["neighbours"].tolist() == [[0, 3, 1, 2], [1, 2, 0, 3], [1, 0, 2, 3]]
    assert res["labels"].tolist() == QRY_Y.tolist() and res["ref_labels"].tolist() == [0, 1, 0, 1]
    val = failures.query_results(f, "val", k=3)
    assert val["ref_split"] == "val" and val["neighbours"].tolist() == HAND_NN
    assert failures.query_splits(np.load(f).files) == ["test", "val"]


def test_evaluations_without_what_the_page_needs_say_so(tmp_path):
    bare = write_eval(tmp_path / "bare.npz", synthetic_embeddings=np.zeros((2, 4), np.float16),
                      probe_index=np.arange(2))
    with pytest.raises(failures.NoRetrieval, match=r"train.save_embeddings was none"):
        failures.read_retrieval_arrays(bare, "test")
    val_only = write_eval(tmp_path / "val.npz", val_embeddings=HAND_X, val_labels=HAND_Y,
                          train_embeddings=HAND_X, train_labels=HAND_Y)
    with pytest.raises(failures.NoRetrieval, match=r"no test split to rank \(saved: train, val\)"):
        failures.read_retrieval_arrays(val_only, "test")
    assert failures.query_splits(np.load(val_only).files) == ["val"]


RES = {"split": "test", "ref_split": "test", "labels": np.array([0, 0, 1, 1, 2, 2]),
       "ref_labels": np.array([0, 0, 1, 1, 2, 2]),
       "ap": np.array([0.5, 0.25, 0.25, 1.0, np.nan, 0.0]),
       "valid": np.array([True, True, True, True, False, True]),
       "top1": np.array([True, False, False, True, False, False])}


def test_order_filter_and_wrong_only():
    assert failures.order_queries(RES).tolist() == [5, 1, 2, 0, 3]     # ties (0.25) by index
    assert failures.order_queries(RES, order="highest").tolist() == [3, 0, 1, 2, 5]
    assert failures.order_queries(RES, order="index").tolist() == [0, 1, 2, 3, 5]
    assert failures.order_queries(RES, classes=[1, 2]).tolist() == [5, 2, 3]
    assert failures.order_queries(RES, only_wrong=True).tolist() == [5, 1, 2]
    assert failures.order_queries(RES, classes=[0], only_wrong=True).tolist() == [1]
    assert failures.order_queries(RES, classes=[]).tolist() == [5, 1, 2, 0, 3]
    with pytest.raises(ValueError, match="order must be one of"):
        failures.order_queries(RES, order="best")


def test_disagreements_of_two_runs():
    b = dict(RES, ap=np.array([0.125, 1.0, 0.75, 0.25, np.nan, 0.5]),
             top1=np.array([False, True, True, False, False, True]))
    d = failures.disagreements(RES, b)
    # a right, b wrong: 0 (gap 0.375), 3 (gap 0.75) -> 3 first; b right, a wrong: 1 (0.75),
    # 2 (0.5), 5 (0.5) -> 1, then 2 and 5 by index
    assert d["a_only"].tolist() == [3, 0] and d["b_only"].tolist() == [1, 2, 5]
    assert failures.disagreements(RES, b, classes=[1])["b_only"].tolist() == [2]
    other = dict(b, labels=np.array([0, 0, 1, 1, 2, 3]))
    assert "other labels" in failures.comparison_problem(RES, other)
    shorter = dict(b, ref_labels=np.array([0, 1]))
    assert "4 against" not in failures.comparison_problem(RES, shorter)
    assert "6 against 2 images" in failures.comparison_problem(RES, shorter)
    with pytest.raises(ValueError, match="different splits"):
        failures.disagreements(RES, dict(b, ref_split="gallery"))


def test_thumbnail_cells_and_their_html():
    res = dict(RES, ref_split="gallery", neighbours=np.array([[3, 0, -1]] * 6),
               correct=np.array([[False, True, False]] * 6))
    names = {0: "<zero>", 1: "one"}
    cells = failures.neighbour_cells(res, 1, k=3, class_names=names,
                                     images=["data:image/png;base64,AAAA", None])
    assert [c["caption"] for c in cells] == ["query · <zero>", "✗ one", "✓ <zero>"]
    assert [c["color"] for c in cells] == [failures.QUERY, failures.WRONG, failures.RIGHT]
    assert cells[1]["title"] == "1. gallery #3: class one (wrong)"
    html = failures.strip_html(cells, size=40)
    assert html.count("<figure") == 3 and html.count("<img") == 1       # one image, two boxes
    assert "&lt;zero&gt;" in html and "<zero>" not in html
    assert f"border:3px solid {failures.WRONG}" in html and "width:40px" in html


def test_focus_parameter_round_trip_and_point():
    assert selection.parse_focus(selection.focus_param("test", 12)) == ("test", 12)
    for bad in (None, "", "test", "test:-1", "test:x", "synthetic:3", "nope:1"):
        assert selection.parse_focus(bad) is None, bad
    pt = selection.build_point_table(
        {"train_labels": np.array([0, 1]), "train_index": np.array([5, 9]),
         "test_labels": np.array([2, 2, 3])},
        {"train": np.zeros((2, 2)), "test": np.arange(6.0).reshape(3, 2)})
    assert selection.focus_point(pt, "test", 2) == 4
    assert selection.focus_point(pt, "train", 9) == 1       # a subsample: the data-set index
    assert selection.focus_point(pt, "train", 1) is None
    fig = plots.add_focus(plots.go.Figure(), pt, 3, [2, 0])     # test #1 (class 2)
    ring, focus = fig.data
    assert list(ring.customdata) == [2, 0] and list(ring.marker.color) == [
        plots.RIGHT_COLOR, plots.WRONG_COLOR]          # test #0: class 2; train #5: class 0
    assert list(focus.x) == [2.0] and list(focus.y) == [3.0] and focus.name == "focus"


def test_large_images_are_shrunk_for_thumbnails():
    from app.images import shrink

    img = np.zeros((200, 100, 3), np.uint8)
    img[:, 50:] = 200                                  # right half bright
    small = shrink(img, 128)
    assert small.shape == (128, 64, 3)
    assert (small[:, :31] == 0).all() and (small[:, 33:] == 200).all()
    tiny = np.ones((8, 8), np.uint8)
    assert shrink(tiny, 128) is tiny


def test_thumbnail_png_round_trip():
    from PIL import Image

    for img in (np.arange(48, dtype=np.uint8).reshape(6, 8),
                np.arange(144, dtype=np.uint8).reshape(6, 8, 3)):
        uri = plots.png_data_uri(img, colors=0)
        back = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        assert (back == img).all()


# ----------------------------------------------------------------------------- runs for the app
DIGITS_TEST_CLASSES = 5


def digits_features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (n, 64) float, labels) of a digits split, as the default config makes it."""
    from app.images import load_run_dataset
    from dml.config import RunConfig

    ds = load_run_dataset(RunConfig().to_dict())
    sp = getattr(ds, split)
    return sp.load(np.arange(len(sp))).numpy().reshape(len(sp), -1).astype(np.float64), \
        sp.labels.numpy().astype(np.int64)


def embeddings_of(pixels: np.ndarray, labels: np.ndarray, signal: float, seed: int):
    """Unit embeddings (n, 16): a random projection of the pixels plus ``signal`` times a
    class direction, and noise of the run's seed."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(0).standard_normal((pixels.shape[1], 16)) / 40
    centres = np.random.default_rng(1).standard_normal((int(labels.max()) + 1, 16))
    x = (pixels - pixels.mean(0)) @ proj + signal * centres[labels] \
        + 0.6 * rng.standard_normal((len(labels), 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_runs(root: Path, missing_data: bool = False) -> dict:
    """Two finished digits runs of the same split (a baseline and a Metrix run, 2 evaluations
    each: test and validation embeddings), a run that saved no embeddings, one that saved the
    training split only, and (``missing_data``) a run whose data set cannot be loaded."""
    from dml.config import RunConfig
    from dml.runs import RunWriter

    te, yte = digits_features("test")
    va, yva = digits_features("val")
    names = {c: str(c) for c in range(10)}

    def run(run_id, mixing, evals, data=()):
        cfg = RunConfig().with_overrides([f"mixing.name={mixing}", "train.seed=0",
                                          f"name={run_id}", *data]).to_dict()
        w = RunWriter.create(root, cfg, run_id=run_id)
        w.write_class_names(names)
        for epoch, arrays in evals.items():
            w.save_eval(epoch, **arrays)
            emb = {s_: arrays[f"{s_}_embeddings"] for s_ in ("test", "val", "gallery")
                   if f"{s_}_embeddings" in arrays}
            labels = {s_: arrays[f"{s_}_labels"] for s_ in emb}
            w.append_metrics({"epoch": epoch, **{   # as the trainer records them
                s_: retrieval_metrics(**split_retrieval_args(emb, labels, s_), ks=(1,))
                for s_ in ("test", "val") if s_ in emb}})
        w.set_status("finished", best={"epoch": max(evals)})
        w.close()
        return run_id

    def evals(signal, seed):
        return {e: {"test_embeddings": embeddings_of(te, yte, signal * e, seed + e),
                    "test_labels": yte,
                    "val_embeddings": embeddings_of(va, yva, signal * e, seed + e),
                    "val_labels": yva} for e in (1, 2)}

    out = {"root": root, "baseline": run("baseline", "none", evals(0.35, 0)),
           "metrix": run("metrix", "metrix-embed", evals(0.45, 7))}
    out["no-embeddings"] = run("no-embeddings", "none",
                               {1: {"synthetic_embeddings": np.zeros((3, 16), np.float16)}})
    out["train-only"] = run("train-only", "none",
                            {1: {"train_embeddings": embeddings_of(va, yva, 1, 0),
                                 "train_labels": yva}},
                            data=["data.split_seed=5"])
    if missing_data:
        out["no-data"] = run("no-data", "none", {1: evals(0.35, 0)[1]},
                             data=["data.name=mnist", f"data.root={root / 'absent'}",
                                   "data.split_seed=3"])
        # In-Shop style: the test split's queries against a gallery (the digits' validation
        # images stand in for it; the data set has no gallery, so no thumbnails either)
        ev = evals(0.35, 0)[1]
        out["gallery"] = run("gallery", "none", {1: {
            "test_embeddings": ev["test_embeddings"], "test_labels": yte,
            "gallery_embeddings": embeddings_of(te, yte, 0.35, 3)[::2],
            "gallery_labels": yte[::2]}}, data=["data.split_seed=9"])
    return out


def top1_by_brute_force(emb16: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Leave-one-out top-1 right, by a float64 distance matrix."""
    x = emb16.astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return labels[np.argmin(d, axis=1)] == labels


# ----------------------------------------------------------------------------- AppTest
pytest.importorskip("streamlit")


@pytest.fixture(scope="module")
def failure_runs(tmp_path_factory):
    return write_runs(tmp_path_factory.mktemp("failure-runs"), missing_data=True)


def open_page(root, monkeypatch, page="failures", query=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DML_RUNS", str(root))
    monkeypatch.setenv("DML_NO_WARMUP", "1")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"),
                           default_timeout=120)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def row_heads(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**test #")
            or m.value.startswith("**val #")]


def html_blocks(at) -> list[str]:
    return [e.proto.body for e in at.get("html")]


def test_page_lists_the_lowest_ap_queries_with_thumbnails(failure_runs, monkeypatch):
    from dml.runs import Run

    root = failure_runs["root"]
    at = open_page(root, monkeypatch, query={"run": "metrix", "epoch": "1"})
    heads = row_heads(at)
    assert len(heads) == failures.PAGE
    # independent truth: the queries' AP@R from the brute-force oracle on the saved embeddings
    ev = Run(Path(root) / "metrix").load_eval(1)
    ap, top1, _ = brute_force(ev["test_embeddings"].astype(np.float32), ev["test_labels"], 8)
    lowest = np.lexsort((np.arange(len(ap)), ap))[:failures.PAGE]
    assert [int(h.split("#")[1].split("*")[0]) for h in heads] == lowest.tolist()
    assert f"AP@R {ap[lowest[0]]:.3f}" in heads[0]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["MAP@R"] == f"{np.mean(ap):.3f}"
    assert metrics["top-1 wrong"] == f"{int((~top1).sum()):,}"
    blocks = html_blocks(at)
    assert len(blocks) == failures.PAGE
    assert blocks[0].count("<img") == 9                   # the query and its 8 neighbours
    assert failures.RIGHT in "".join(blocks) and failures.WRONG in "".join(blocks)
    links = at.get("page_link")
    assert len(links) == failures.PAGE
    first = int(heads[0].split("#")[1].split("*")[0])
    assert links[0].proto.page == "explorer"
    assert links[0].proto.query_string == f"run=metrix&epoch=1&focus=test%3A{first}"

    # a class filter: only its queries, still lowest AP@R first
    at.multiselect(key="rf-classes-metrix-test").set_value([7]).run()
    heads = row_heads(at)
    assert heads and all("class 7 " in h for h in heads)
    want = [i for i in lowest.tolist() + np.argsort(ap, kind="stable").tolist()
            if ev["test_labels"][i] == 7]
    assert int(heads[0].split("#")[1].split("*")[0]) == want[0]
    # more on demand
    n_class = int((ev["test_labels"] == 7).sum())
    more = next(b for b in at.button if b.label.startswith("Show"))
    more.click().run()
    assert len(row_heads(at)) == min(2 * failures.PAGE, n_class)


def test_page_diff_of_two_runs_counts_what_brute_force_counts(failure_runs, monkeypatch):
    from dml.runs import Run

    root = failure_runs["root"]
    at = open_page(root, monkeypatch, query={"run": "metrix", "epoch": "2", "vs": "baseline"})
    assert at.radio(key="rf-mode").value == "Where two runs differ"
    assert at.selectbox(key="rf-vs-metrix").value == "baseline"
    a = Run(Path(root) / "metrix").load_eval(2)
    b = Run(Path(root) / "baseline").load_eval(2)
    ta = top1_by_brute_force(a["test_embeddings"], a["test_labels"])
    tb = top1_by_brute_force(b["test_embeddings"], b["test_labels"])
    n_ab, n_ba = int((ta & ~tb).sum()), int((tb & ~ta).sum())
    assert n_ab > 0 and n_ba > 0
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["metrix right, baseline wrong"] == f"{n_ab:,}"
    assert metrics["baseline right, metrix wrong"] == f"{n_ba:,}"
    heads = [m.value for m in at.markdown if m.value.startswith("**test #")]
    assert len(heads) == min(failures.PAGE, n_ab)
    shown = [int(h.split("#")[1].split("*")[0]) for h in heads]
    assert all(ta[i] and not tb[i] for i in shown)
    blocks = html_blocks(at)
    assert len(blocks) == 3 * len(heads)     # per row: the query, both runs' neighbours
    assert [b_.count("<figure") for b_ in blocks[:3]] == [1, 8, 8]
    at.radio(key="rf-side").set_value("b_only").run()
    shown = [int(m.value.split("#")[1].split("*")[0]) for m in at.markdown
             if m.value.startswith("**test #")]
    assert shown and all(tb[i] and not ta[i] for i in shown)


def test_page_explains_what_is_missing(failure_runs, monkeypatch):
    root = failure_runs["root"]
    at = open_page(root, monkeypatch, query={"run": "no-embeddings"})
    assert any("train.save_embeddings was none" in e.value for e in at.error)
    at = open_page(root, monkeypatch, query={"run": "train-only"})
    assert any("no test or validation split" in e.value and "saved: train" in e.value
               for e in at.error)
    # a data set that cannot be loaded: the rows without images, a warning, no error
    at = open_page(root, monkeypatch, query={"run": "no-data"})
    assert not at.error
    assert any("cannot be loaded" in w.value for w in at.warning)
    blocks = html_blocks(at)
    assert len(blocks) == failures.PAGE and "<img" not in "".join(blocks)
    assert "✓" in "".join(blocks) or "✗" in "".join(blocks)
    # no other run of that data set: nothing to compare with, said so
    at.radio(key="rf-mode").set_value("Where two runs differ").run()
    assert any("No other run of this data set" in i.value for i in at.info)


def test_page_ranks_test_queries_against_a_gallery(failure_runs, monkeypatch):
    from dml.runs import Run

    root = failure_runs["root"]
    ev = Run(Path(root) / "gallery").load_eval(1)
    gx, gy = ev["gallery_embeddings"].astype(np.float32), ev["gallery_labels"]
    ap, _, nn = brute_force(gx, gy, 8, ev["test_embeddings"].astype(np.float32),
                            ev["test_labels"])
    at = open_page(root, monkeypatch, query={"run": "gallery"})
    assert any(f"against the gallery ({len(gy):,} images)" in c.value for c in at.caption)
    heads = row_heads(at)
    q = int(heads[0].split("#")[1].split("*")[0])
    assert q == int(np.lexsort((np.arange(len(ap)), ap))[0])
    # its neighbours are gallery images, in the brute-force order
    shown = re.findall(r'title="\d+\. gallery #(\d+): class (\d+)', html_blocks(at)[0])
    assert [int(j) for j, _ in shown] == nn[q].tolist()
    assert [int(c) for _, c in shown] == gy[nn[q]].tolist()
    # the digits data set has no gallery split to show: captions only, and a note
    assert any("cannot be loaded (the data set 'digits' has no gallery split)" in w.value
               for w in at.warning)


def test_explorer_rings_the_focus_and_its_neighbours(failure_runs, monkeypatch):
    from dml.runs import Run
    from tests.test_app_pages import decode

    root = failure_runs["root"]
    ev = Run(Path(root) / "metrix").load_eval(1)
    _, _, nn = brute_force(ev["test_embeddings"].astype(np.float32), ev["test_labels"], 10)
    q = 17
    at = open_page(root, monkeypatch, "explorer",
                   query={"run": "metrix", "epoch": "1", "focus": f"test:{q}"})
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if (c.key or "").startswith("map-"))
    by_name = {t.get("name"): t for t in spec["data"]}
    focus = by_name["focus"]
    ring = next(t for n, t in by_name.items() if n and n.startswith("its 10 nearest"))
    # the map's points: the validation split, then the test split (point id = 180 + index)
    first_test = len(ev["val_labels"])
    assert decode(focus["customdata"]).tolist() == [first_test + q]
    assert decode(ring["customdata"]).tolist() == (first_test + nn[q]).tolist()
    right = ev["test_labels"][nn[q]] == ev["test_labels"][q]
    assert ring["marker"]["color"] == [plots.RIGHT_COLOR if r else plots.WRONG_COLOR
                                       for r in right]
    assert any("Ringed: test #17" in c.value for c in at.caption)
    # nothing lassoed: the focus is the selection below the map
    assert any(s.value == "1 selected point(s)" for s in at.subheader)
    # an index not on the map: a warning, the map without rings
    at = open_page(root, monkeypatch, "explorer",
                   query={"run": "metrix", "epoch": "1", "focus": "test:99999"})
    assert any("not on this map" in w.value for w in at.warning)


def test_page_on_trained_runs_matches_the_recorded_metrics(app_runs, monkeypatch):
    """Runs made by the trainer: the page ranks their saved (float16) test embeddings and its
    MAP@R and Recall@1 are the ones the trainer recorded from the float32 embeddings, up to
    that rounding."""
    from dml.projection import best_epoch
    from dml.runs import Run

    rid = app_runs["umap_run"]
    run = Run(Path(app_runs["root"]) / rid)
    epoch = best_epoch(run)
    at = open_page(app_runs["root"], monkeypatch, query={"run": rid, "epoch": str(epoch)})
    rec = next(r for r in run.metrics() if r["epoch"] == epoch)["test"]
    shown = {m.label: float(m.value) for m in at.metric if m.label in ("MAP@R", "Recall@1")}
    assert shown["MAP@R"] == pytest.approx(rec["map@r"], abs=0.01)
    assert shown["Recall@1"] == pytest.approx(rec["recall@1"], abs=0.01)
    assert len(row_heads(at)) == min(failures.PAGE, len(run.load_eval(epoch)["test_labels"]))


def test_the_benchmark_runs_and_its_values_average_to_the_metrics():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_query_retrieval

    assert bench_query_retrieval.main(["--n", "600", "--d", "8", "--classes", "3", "60",
                                       "--repeats", "1"]) == 0
