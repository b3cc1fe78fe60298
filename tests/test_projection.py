"""dml.projection: PCA / UMAP maps of an evaluation, synthetic points placed without moving the
real ones, the on-disk cache (atomic, invalidated when its evaluation changes), precompute."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dml import projection as P
from dml.runs import RunWriter


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fake_eval(seed=0, n_train=120, n_test=80, n_syn=30, d=8, classes=4):
    """An evaluation dict shaped like the trainer's npz: clustered unit vectors per class."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes * 2, d)) * 3

    def split(n, offset):
        y = np.arange(n) % classes + offset
        return _unit(centres[y] + rng.standard_normal((n, d)) * 0.3).astype(np.float16), y

    tr, ytr = split(n_train, 0)
    te, yte = split(n_test, classes)
    probe = np.arange(16)
    parents = rng.integers(0, 16, (n_syn, 2))
    lam = rng.uniform(0, 1, n_syn).astype(np.float32)
    a, b = tr[probe[parents[:, 0]]].astype(np.float32), tr[probe[parents[:, 1]]].astype(np.float32)
    syn = _unit(lam[:, None] * a + (1 - lam[:, None]) * b)
    return {"train_embeddings": tr, "train_labels": ytr, "test_embeddings": te,
            "test_labels": yte, "synthetic_embeddings": syn, "synthetic_parents": parents,
            "synthetic_weight": lam, "synthetic_kind": np.array(["metrix-embed"] * n_syn),
            "synthetic_top_classes": np.stack([ytr[parents[:, 0]], ytr[parents[:, 1]]], 1),
            "probe_index": probe}


def make_run(root, evals: dict[int, dict], best: int | None = None):
    w = RunWriter.create(root, {"data": {"name": "digits"}, "loss": {"name": "contrastive"},
                                "mixing": {"name": "none"}, "train": {"seed": 0}})
    for epoch, ev in evals.items():
        w.save_eval(epoch, **ev)
    w.set_status("finished", best={"epoch": best} if best else None)
    return w.run


# --------------------------------------------------------------------------- math

def test_pca_is_exact_and_deterministic():
    ev = fake_eval()
    proj = P.compute_projection(ev, "pca")
    x = np.concatenate([ev["train_embeddings"], ev["test_embeddings"]]).astype(np.float32)
    mean, comps = proj["pca_mean"], proj["pca_components"]
    assert comps.shape == (2, 8)
    np.testing.assert_allclose(comps @ comps.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(proj["train"], (x[:120] - mean) @ comps.T, atol=1e-5)
    np.testing.assert_allclose(proj["synthetic"],
                               P.pca_transform(ev["synthetic_embeddings"], mean, comps), atol=1e-6)
    # the first component carries the most variance, signs are fixed
    coords = np.concatenate([proj["train"], proj["test"]])
    assert coords[:, 0].var() >= coords[:, 1].var()
    again = P.compute_projection(ev, "pca")
    np.testing.assert_array_equal(again["test"], proj["test"])


def test_knn_graph_is_symmetric_with_k_neighbours():
    x = _unit(np.random.default_rng(1).standard_normal((50, 6)))
    x[7] = x[3]                                     # an exact duplicate
    g = P.knn_graph(x, 5)
    assert (abs(g - g.T) > 0).nnz == 0
    assert np.all(g.diagonal() == 0)
    assert np.all(np.diff(g.indptr) >= 5)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    for i in (0, 3, 7, 20):
        nn = set(np.argsort(d[i])[1:6]) - {i}
        assert nn <= set(g[i].indices) | ({3, 7} - {i})


def test_umap_places_synthetic_points_without_moving_real_ones():
    ev = fake_eval()
    with_syn = P.compute_projection(ev, "umap", seed=0)
    no_syn = P.compute_projection({k: v for k, v in ev.items()
                                   if not k.startswith("synthetic")}, "umap", seed=0)
    np.testing.assert_array_equal(with_syn["train"], no_syn["train"])   # real points unmoved
    np.testing.assert_array_equal(with_syn["test"], no_syn["test"])
    assert with_syn["synthetic"].shape == (30, 2) and "synthetic" not in no_syn
    # a synthetic point identical to a training point lands next to it
    tr = ev["train_embeddings"].astype(np.float32)
    copy = dict(ev, synthetic_embeddings=tr[:5].copy())
    placed = P.compute_projection(copy, "umap", seed=0)
    spread = np.ptp(placed["train"], axis=0).max()
    assert np.linalg.norm(placed["synthetic"] - placed["train"][:5], axis=1).max() < 0.15 * spread
    # classes stay together: nearest map neighbour of a train point is mostly its own class
    xy, y = placed["train"], ev["train_labels"]
    dd = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dd, np.inf)
    assert (y[dd.argmin(1)] == y).mean() > 0.9


def test_knn_place_puts_copies_on_their_reference():
    ref = _unit(np.random.default_rng(2).standard_normal((40, 5)))
    xy = np.random.default_rng(3).standard_normal((40, 2)).astype(np.float32)
    np.testing.assert_allclose(P.knn_place(ref[:4], ref, xy, k=1), xy[:4], atol=1e-6)
    mid = P.knn_place(ref[:1], ref, xy, k=10)
    assert np.all(mid >= xy.min(0) - 1e-6) and np.all(mid <= xy.max(0) + 1e-6)


def test_unknown_method_and_missing_embeddings_fail_clearly():
    with pytest.raises(P.ProjectionError, match="valid: umap, pca"):
        P.compute_projection(fake_eval(), "tsne")
    with pytest.raises(P.ProjectionError, match="no saved embeddings"):
        P.compute_projection({"probe_index": np.arange(3)}, "pca")


# --------------------------------------------------------------------------- cache

def test_cache_round_trip_and_invalidation(tmp_path):
    run = make_run(tmp_path, {1: fake_eval(0), 2: fake_eval(1)}, best=1)
    assert P.load_projection(run.path, 1, "pca") is None
    proj = P.get_projection(run.path, 1, "pca")
    f = P.projection_path(run.path, 1, "pca")
    assert f.name == "epoch_0001.pca.npz" and f.is_file()
    assert not [p for p in f.parent.iterdir() if p.name.endswith(".tmp")]   # atomic write
    cached = P.load_projection(run.path, 1, "pca")
    np.testing.assert_array_equal(cached["test"], proj["test"])
    assert cached["meta"]["method"] == "pca" and cached["meta"]["version"] == P.PROJECTION_VERSION
    with np.load(f, allow_pickle=False) as z:           # readable without pickles
        assert json.loads(str(z["meta"]))["source_size"] == run.eval_path(1).stat().st_size
    # the evaluation file is rewritten (a resumed run): the cache no longer applies
    RunWriter(run).save_eval(1, **fake_eval(5))
    assert P.load_projection(run.path, 1, "pca") is None
    new = P.get_projection(run.path, 1, "pca")
    assert not np.allclose(new["test"], proj["test"])
    # an unknown format version is ignored, never misread
    d = dict(np.load(f, allow_pickle=False))
    meta = json.loads(str(d.pop("meta")))
    meta["version"] = 99
    np.savez(f, meta=np.array(json.dumps(meta)), **d)
    os.utime(run.eval_path(1), ns=(meta["source_mtime_ns"], meta["source_mtime_ns"]))
    assert P.load_projection(run.path, 1, "pca") is None


def test_precompute_best_and_last(tmp_path):
    run = make_run(tmp_path, {e: fake_eval(e) for e in (1, 2, 3)}, best=2)
    assert P.resolve_epochs(run, "best+last") == [2, 3]
    assert P.resolve_epochs(run, "all") == [1, 2, 3]
    assert P.resolve_epochs(run, 7) == [] and P.resolve_epochs(run, [1, 9]) == [1]
    files = P.precompute_projections(run.path, "best+last", methods=("pca", "umap"))
    assert sorted(p.name for p in files) == ["epoch_0002.pca.npz", "epoch_0002.umap.npz",
                                             "epoch_0003.pca.npz", "epoch_0003.umap.npz"]
    assert all(p.is_file() for p in files)
    assert not P.projection_path(run.path, 1, "umap").exists()
    mtimes = [p.stat().st_mtime_ns for p in files]
    P.precompute_projections(run.path, "best+last")        # already cached: nothing recomputed
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    umap = P.load_projection(run.path, 2, "umap")
    assert umap["synthetic"].shape == (30, 2) and umap["meta"]["seconds"] is not None
