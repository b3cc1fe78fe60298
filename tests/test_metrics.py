"""Tests for dml.metrics: retrieval (vs pml and brute force), clustering, utilization."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dml import metrics
from dml.metrics import neighbours
from dml.metrics import (
    clustering_metrics,
    kmeans_assign,
    nearest_train_distances,
    pairwise_f1,
    retrieval_metrics,
    utilization,
)

KS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- helpers
def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gaussian_data(n, d, n_classes, seed):
    """Pure noise: random unit vectors with random (uneven) labels."""
    rng = np.random.default_rng(seed)
    return _normalise(rng.standard_normal((n, d))), rng.integers(0, n_classes, n)


def clustered_data(n, d, n_classes, noise, seed):
    """Class centres + isotropic noise, normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d))
    y = rng.integers(0, n_classes, n)
    return _normalise(centres[y] + noise * rng.standard_normal((n, d))), y


def brute_force_retrieval(x, y, ks, qx=None, qy=None):
    """Definition-level reference: float64 distance matrix, stable argsort, per-query loop."""
    loo = qx is None
    if loo:
        qx, qy = x, y
    x64, q64 = x.astype(np.float64), qx.astype(np.float64)
    dist = (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None, :] - 2 * q64 @ x64.T
    if loo:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    if loo:
        order = order[:, :-1]  # the query itself (inf) is last
    recall = {k: [] for k in ks}
    rp, mapr = [], []
    for i in range(len(qx)):
        rel = (y[order[i]] == qy[i]).astype(np.float64)
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            recall[k].append(rel[:k].any())
        rp.append(rel[:r].sum() / r)
        prec = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        mapr.append((prec * rel[:r]).sum() / r)
    out = {f"recall@{k}": float(np.mean(recall[k])) for k in ks}
    out["r_precision"] = float(np.mean(rp))
    out["map@r"] = float(np.mean(mapr))
    return out


def assert_dicts_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=atol), k


# ----------------------------------------------------------------------------- vs pml
@pytest.fixture(scope="module")
def pml_calc():
    pytest.importorskip("pytorch_metric_learning")
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    # pml >= 2: leave-one-out is get_accuracy(query, labels) (reference=None ->
    # ref_includes_query=True); the old `embeddings_come_from_same_source` is gone.
    return AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )


def _check_against_pml(calc, ours, pml):
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


DATASETS = {
    # uneven random class sizes, plus a singleton class (a "lone" query)
    "gaussian": lambda: gaussian_data(1500, 32, 40, seed=0),
    "clustered": lambda: clustered_data(1500, 32, 30, noise=1.5, seed=1),
    # n*d above faiss' BLAS threshold: exercises the BLAS kernel + 4096 blocking
    "clustered_blas": lambda: clustered_data(6000, 32, 60, noise=2.0, seed=2),
}


def _with_singleton(x, y):
    y = y.copy()
    y[0] = y.max() + 1  # a class with exactly one member
    return x, y


@pytest.mark.parametrize("name", list(DATASETS))
def test_leave_one_out_matches_pml(pml_calc, name):
    x, y = _with_singleton(*DATASETS[name]())
    ours = retrieval_metrics(x, y)
    pml = pml_calc.get_accuracy(x, y)
    _check_against_pml(pml_calc, ours, pml)
    # the same with an explicit chunk size that is a multiple of faiss' query block
    assert retrieval_metrics(x, y, chunk_size=4096) == ours


@pytest.mark.parametrize("name", list(DATASETS))
def test_query_vs_gallery_matches_pml(pml_calc, name):
    x, y = DATASETS[name]()
    rng = np.random.default_rng(5)
    is_query = rng.random(len(x)) < 0.3
    qx, qy, gx, gy = x[is_query], y[is_query].copy(), x[~is_query], y[~is_query]
    qy[0] = y.max() + 7  # a query whose class is absent from the gallery (R = 0)
    ours = retrieval_metrics(gx, gy, query_embeddings=qx, query_labels=qy)
    pml = pml_calc.get_accuracy(qx, qy, gx, gy, ref_includes_query=False)
    _check_against_pml(pml_calc, ours, pml)


def test_torch_inputs_match_numpy():
    torch = pytest.importorskip("torch")
    x, y = clustered_data(500, 16, 10, noise=1.0, seed=3)
    ref = retrieval_metrics(x, y)
    got = retrieval_metrics(torch.from_numpy(x).double(), torch.from_numpy(y))
    assert got == ref


# ----------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("seed", [0, 1])
def test_against_brute_force_leave_one_out(seed):
    x, y = clustered_data(400, 8, 12, noise=1.0, seed=seed)
    x, y = _with_singleton(x, y)
    ours = retrieval_metrics(x, y, ks=KS)
    ref = brute_force_retrieval(x, y, KS)
    assert_dicts_close(ours, ref, atol=1e-9)


def test_against_brute_force_query_vs_gallery():
    x, y = clustered_data(500, 8, 10, noise=1.0, seed=4)
    qx, qy, gx, gy = x[:150], y[:150], x[150:], y[150:]
    ours = retrieval_metrics(gx, gy, ks=KS, query_embeddings=qx, query_labels=qy)
    ref = brute_force_retrieval(gx, gy, KS, qx, qy)
    assert_dicts_close(ours, ref, atol=1e-9)


def test_output_keys_and_custom_ks():
    x, y = clustered_data(200, 8, 5, noise=1.0, seed=0)
    out = retrieval_metrics(x, y, ks=(1, 3, 10))
    assert list(out) == ["recall@1", "recall@3", "recall@10", "r_precision", "map@r"]
    assert all(isinstance(v, float) for v in out.values())
    assert out["recall@1"] <= out["recall@3"] <= out["recall@10"]


# ----------------------------------------------------------------------------- duplicates
@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0]])
def test_duplicate_of_other_class_is_excluded_by_index(perm, pml_or_none):
    """Hand-worked: p = (1, 0) twice (classes 0 and 1), q = (0, 1) twice (classes 0 and 1).

    Leave-one-out, each query's nearest other point is its exact duplicate, which has the
    other class: rank 1 is a miss for every query (R = 1 for every query, so
    recall@1 = R-Precision = MAP@R = 0), and both points at the other location are within
    rank 3 (recall@3 = 1).  A "drop the first hit" implementation would, for whichever
    duplicate faiss lists second, drop the duplicate and keep the query itself at rank 1.
    """
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)[perm]
    y = np.array([0, 1, 0, 1])[perm]
    out = retrieval_metrics(x, y, ks=(1, 3))
    assert out == {"recall@1": 0.0, "recall@3": 1.0, "r_precision": 0.0, "map@r": 0.0}
    if pml_or_none is not None:  # pml also removes the query by index
        _check_against_pml(pml_or_none, out, pml_or_none.get_accuracy(x, y))


@pytest.fixture(scope="module")
def pml_or_none():
    try:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    except ImportError:
        return None
    return AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )


def test_knn_matches_brute_force():
    g = np.random.default_rng(0)
    q, r = g.normal(size=(30, 8)).astype(np.float32), g.normal(size=(50, 8)).astype(np.float32)
    idx, dist = metrics.knn(q, r, 5)
    d = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    assert (idx == np.argsort(d, axis=1)[:, :5]).all()
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :5], rtol=1e-4, atol=1e-5)
    ex = g.integers(0, 50, size=30)
    ex[:3] = -1                                               # nothing to leave out
    idx2, _ = metrics.knn(q, r, 5, exclude=ex)
    for i in range(30):
        want = [j for j in np.argsort(d[i]) if j != ex[i]][:5]
        assert list(idx2[i]) == want
    assert metrics.knn(q[:0], r, 3)[0].shape == (0, 0)


def test_self_not_in_hits_drops_last():
    """All points identical: self may be pushed out of the k+1 hits by ties."""
    import faiss

    n, k = 10, 2
    x = np.ones((n, 4), dtype=np.float32) / 2.0
    index = faiss.IndexFlatL2(4)
    index.add(x)
    _, raw = index.search(x, k + 1)
    nn = neighbours._search(index, x, k, np.arange(n))[0]
    assert nn.shape == (n, k)
    assert (metrics.knn(x, x, k, exclude=np.arange(n))[0] == nn).all()   # the public kNN
    for i in range(n):
        assert i not in nn[i]
        assert len(set(nn[i])) == k
        expected = [j for j in raw[i] if j != i][:k]  # self removed, else last dropped
        assert list(nn[i]) == expected
    assert any(i not in raw[i] for i in range(n))  # the case really happens here


# ----------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 333])
def test_small_chunks_equal_single_chunk(chunk_size):
    x, y = clustered_data(700, 16, 14, noise=1.2, seed=6)  # n*d below faiss' BLAS threshold
    single = retrieval_metrics(x, y, chunk_size=10**9)
    assert retrieval_metrics(x, y, chunk_size=chunk_size) == single
    qx, qy = x[:200], y[:200]
    single_q = retrieval_metrics(x[200:], y[200:], query_embeddings=qx, query_labels=qy,
                                 chunk_size=10**9)
    got_q = retrieval_metrics(x[200:], y[200:], query_embeddings=qx, query_labels=qy,
                              chunk_size=chunk_size)
    assert got_q == single_q


def test_auto_chunking_equals_single_chunk(monkeypatch):
    x, y = clustered_data(9000, 32, 90, noise=2.0, seed=7)  # BLAS path, ~100 per class
    single = retrieval_metrics(x, y, chunk_size=10**9)
    # shrink the memory budget so that the automatic choice is 4096-query chunks
    monkeypatch.setattr(neighbours, "_DEFAULT_CHUNK_BUDGET_BYTES", 4096 * 200 * 40)
    k = int(np.bincount(y).max()) - 1  # max R = the k searched
    assert k < 199  # so the 4096 x 200-slot budget gives exactly one 4096 block per chunk
    chunks = neighbours._query_chunks(9000, 32, k, None)
    assert chunks == [(0, 4096), (4096, 9000)]  # tail of 808 merged (below BLAS threshold)
    assert retrieval_metrics(x, y) == single


def test_query_chunks_tail_rules():
    # whole set below the BLAS threshold: plain split
    assert neighbours._query_chunks(10, 4, 5, 4) == [(0, 4), (4, 8), (8, 10)]
    # a single-query tail is merged
    assert neighbours._query_chunks(9, 4, 5, 4) == [(0, 4), (4, 9)]
    # whole set on the BLAS path, tail below it: merged
    assert neighbours._query_chunks(5000, 128, 10, 4096) == [(0, 5000)]
    assert neighbours._query_chunks(9000, 128, 10, 4096) == [(0, 4096), (4096, 9000)]
    # whole set and tail both on the BLAS path: kept
    assert neighbours._query_chunks(9000, 256, 10, 4096) == [(0, 4096), (4096, 8192), (8192, 9000)]


def test_lone_queries_only_gives_nan():
    x, y = gaussian_data(20, 4, 1, seed=0)
    out = retrieval_metrics(x, np.arange(20))  # every class a singleton
    assert all(math.isnan(v) for v in out.values())


def test_bad_inputs():
    x, y = gaussian_data(20, 4, 3, seed=0)
    with pytest.raises(ValueError):
        retrieval_metrics(x, y[:-1])
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, query_embeddings=x)
    x[0, 0] = np.nan
    with pytest.raises(ValueError):
        retrieval_metrics(x, y)


# ----------------------------------------------------------------------------- clustering
def brute_force_pairwise_f1(y, c):
    tp = fp = fn = 0
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            same_y, same_c = y[i] == y[j], c[i] == c[j]
            tp += same_y and same_c
            fp += same_c and not same_y
            fn += same_y and not same_c
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_pairwise_f1_hand_worked():
    # classes: {0,1,2,3},{4,5}; clusters: {0,1,2},{3,4,5}
    # same-class pairs 6+1=7, same-cluster pairs 3+3=6, TP = 3 + 1 = 4
    # P = 4/6, R = 4/7, F1 = 2PR/(P+R) = 8/13
    y = [0, 0, 0, 0, 1, 1]
    c = [5, 5, 5, 9, 9, 9]
    assert pairwise_f1(y, c) == pytest.approx(8 / 13, abs=1e-12)
    assert pairwise_f1(y, y) == 1.0
    assert pairwise_f1(y, list(range(6))) == 0.0  # all singletons: no predicted pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_f1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, 150)
    c = np.where(rng.random(150) < 0.6, y, rng.integers(0, 9, 150))
    assert pairwise_f1(y, c) == pytest.approx(brute_force_pairwise_f1(y, c), abs=1e-12)


def test_nmi_matches_sklearn_and_is_deterministic():
    from sklearn.metrics import normalized_mutual_info_score

    x, y = clustered_data(1200, 16, 12, noise=0.8, seed=8)
    out = clustering_metrics(x, y, seed=3)
    assign = kmeans_assign(x, 12, seed=3)
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert out["f1"] == pytest.approx(pairwise_f1(y, assign), abs=1e-12)
    assert clustering_metrics(x, y, seed=3) == out  # deterministic for a given seed
    assert 0.0 < out["nmi"] < 1.0 and 0.0 < out["f1"] < 1.0


def test_perfect_clustering_gives_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = np.eye(8)[y * 2] * 10 + 0.01 * rng.standard_normal((200, 8))
    out = clustering_metrics(x, y, seed=0, nredo=3)
    assert out == {"nmi": pytest.approx(1.0), "f1": pytest.approx(1.0)}


# ----------------------------------------------------------------------------- utilization
def test_utilization_hand_worked():
    train = np.array([[0.0, 0.0], [2.0, 0.0]])
    query = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    # squared distances to the nearest training point: 1, 0, 1 (tie), (1 + 16) = 17
    np.testing.assert_allclose(nearest_train_distances(query, train), [1.0, 0.0, 1.0, 17.0])
    assert utilization(query, train) == pytest.approx(19 / 4)


def test_utilization_matches_brute_force():
    rng = np.random.default_rng(9)
    train = _normalise(rng.standard_normal((800, 24)))
    query = _normalise(rng.standard_normal((300, 24)))
    d2 = ((query[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(nearest_train_distances(query, train), d2.min(1), rtol=1e-6)
    assert utilization(query, train) == pytest.approx(d2.min(1).mean(), rel=1e-6)
    # a query that is exactly a training point has distance exactly 0
    assert nearest_train_distances(train[:5], train).max() == 0.0


# ----------------------------------------------------------------------------- evaluate
def test_one_evaluation_definition_per_data_set_kind():
    # dml.evaluation.evaluate_embeddings is the trainer's, dml eval's and the inspector's
    from dml.evaluation import evaluate_embeddings

    x, y = clustered_data(600, 16, 6, noise=0.8, seed=10)
    train, ytr = clustered_data(300, 16, 5, noise=0.8, seed=11)
    out = evaluate_embeddings({"val": x[:200], "test": x[200:], "train": train},
                              {"val": y[:200], "test": y[200:], "train": ytr}, seed=1)
    assert out["val"] == retrieval_metrics(x[:200], y[:200])
    assert out["test"] == {**retrieval_metrics(x[200:], y[200:]),
                           **clustering_metrics(x[200:], y[200:], seed=1)}
    assert out["utilization"] == pytest.approx(utilization(x[200:], train))
    # query / gallery (In-Shop): retrieval of the queries against the gallery, clustering of
    # the queries (the test split), as in every other kind
    q = evaluate_embeddings({"test": x[:100], "gallery": x[100:]},
                            {"test": y[:100], "gallery": y[100:]}, seed=1)
    assert q["test"] == {**retrieval_metrics(x[100:], y[100:], query_embeddings=x[:100],
                                             query_labels=y[:100]),
                         **clustering_metrics(x[:100], y[:100], seed=1)}
    assert "utilization" not in q and "val" not in q


def test_overlapping_single_thread_blas_contexts_restore_blas_when_the_last_one_leaves():
    """The rank method limits BLAS to one thread process-wide; two overlapping users (two app
    sessions) must not leave the process single-threaded (A in, B in, A out, B out)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from dml.metrics.ranking import _one_blas_thread

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    before = blas()
    a, b = _one_blas_thread(), _one_blas_thread()
    a.__enter__()
    b.__enter__()
    assert all(n == 1 for n in blas())
    a.__exit__(None, None, None)
    assert all(n == 1 for n in blas())          # B still ranks
    b.__exit__(None, None, None)
    assert blas() == before
