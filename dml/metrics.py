"""Evaluation metrics for deep metric learning (docs/METHODS.md sections 3 and 6).

Retrieval (Recall@K, R-Precision, MAP@R), clustering (NMI, pairwise F1) and the Metrix
"utilization" measure. All nearest-neighbour searches are exact faiss searches on the CPU
(faiss uses all OpenMP threads, ``faiss.omp_get_max_threads()``).

Conventions
-----------
* Embeddings are ``(n, d)`` arrays (numpy or torch, any float dtype); they are converted to
  contiguous float32.  Retrieval assumes the caller has L2-normalised them.
* Labels are ``(n,)`` arrays of hashable class ids (ints or strings); only equality matters.
* Retrieval uses ``faiss.IndexFlatL2`` (squared Euclidean distance), which is what
  pytorch-metric-learning's ``AccuracyCalculator`` uses by default (``FaissKNN`` with
  ``faiss.IndexFlatL2``).  On L2-normalised vectors ``||a-b||^2 = 2 - 2 a.b``, so the ranking is
  the cosine ranking; using the same index type (and the same query blocking, see
  ``retrieval_metrics``) makes even float32 near-ties come out in the same order as pml.
* Queries whose class has no other member in the reference set (R = 0) are excluded from
  *every* retrieval metric, Recall@K included.  This is pml's behaviour (its "lone query"
  mask is applied to precision_at_1, r_precision and MAP@R alike), so ``recall@1`` equals pml's
  ``precision_at_1``.  If no query has R > 0 every retrieval value is NaN (as in pml).
"""

from __future__ import annotations

from typing import Any, Sequence

import faiss
import numpy as np

__all__ = [
    "retrieval_metrics",
    "clustering_metrics",
    "kmeans_assign",
    "pairwise_f1",
    "nearest_train_distances",
    "utilization",
]

# Memory budget for one chunk of queries: the (chunk, k+1) faiss outputs plus the per-chunk
# temporaries of the metric computation are about 40 bytes per neighbour slot.
_BYTES_PER_SLOT = 40
_DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30  # 1 GiB


# --------------------------------------------------------------------------------------------
# input conversion
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """``x`` as a float32 (n, d) array, checked: 2-D, not empty, finite (ValueError naming
    ``name`` otherwise)."""
    x = np.ascontiguousarray(_to_numpy(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _as_labels(y: Any, n: int, name: str) -> np.ndarray:
    y = _to_numpy(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries but there are {n} embeddings")
    return y


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------
def _query_chunks(n_q: int, d: int, k: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Split ``range(n_q)`` into query chunks for faiss.

    faiss' flat search processes queries in blocks of ``distance_compute_blas_query_bs``
    (4096) with BLAS when ``nq * d >= distance_compute_blas_threshold`` and with a direct
    per-pair kernel otherwise; the two (and different BLAS block shapes) round differently
    at the float32 ulp level, which can swap near-tied neighbours.  The automatic chunk size
    is a multiple of the faiss block and a short tail that would fall below the BLAS
    threshold is merged into the previous chunk, so a chunked search returns bit-for-bit
    the neighbour lists of one big search (and of pml, which does one big search).
    """
    block = max(int(faiss.cvar.distance_compute_blas_query_bs), 1)
    blas_threshold = int(faiss.cvar.distance_compute_blas_threshold)
    if chunk_size is None:
        n_blocks = _DEFAULT_CHUNK_BUDGET_BYTES // (block * (k + 1) * _BYTES_PER_SLOT)
        if n_blocks >= 1:
            chunk = block * n_blocks
        else:  # huge k: fall back to fewer queries (near-ties may then flip, see docstring)
            chunk = max(2, _DEFAULT_CHUNK_BUDGET_BYTES // ((k + 1) * _BYTES_PER_SLOT))
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError("chunk_size must be a positive integer or None")
    bounds = list(range(0, n_q, chunk)) + [n_q]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if len(chunks) > 1:
        a, b = chunks[-1]
        whole_uses_blas = n_q * d >= blas_threshold
        if (whole_uses_blas and (b - a) * d < blas_threshold) or (b - a) < 2:
            chunks[-2:] = [(chunks[-2][0], b)]
    return chunks


def _search(index: faiss.Index, queries: np.ndarray, k: int, exclude: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Indices and squared distances ``(nq, k)`` of the k nearest references, nearest first;
    ``exclude`` (nq,): one reference index per query to leave out (its own), -1 for none."""
    if exclude is None:
        d2, nn = index.search(queries, k)
        return nn, d2
    d2, nn = index.search(queries, k + 1)
    drop = nn == np.asarray(exclude)[:, None]
    # rows where the excluded one is not among the k+1 hits (exact duplicates pushed it out, or
    # there is none): drop the last (farthest) hit instead, as pml does.
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    # a row can contain an index only once, so exactly one entry per row is dropped
    return nn[~drop].reshape(len(nn), k), d2[~drop].reshape(len(nn), k)


def knn(queries: Any, refs: Any, k: int, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest references (n, D) of each query (m, D), by Euclidean distance
    (faiss ``IndexFlatL2``): indices (m, k) int64 and distances (m, k) float32, nearest first.
    ``exclude`` (m,) gives, per query, one reference index to leave out (the query itself), or
    -1. Every nearest-neighbour search of Tango (metrics, maps, the explorer) is this one."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(refs, dtype=np.float32)
    k = max(0, min(int(k), len(r) - (1 if exclude is not None else 0)))
    if not len(q) or not len(r) or k == 0:
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    index = faiss.IndexFlatL2(r.shape[1])
    index.add(r)
    nn, d2 = _search(index, q, k, None if exclude is None else np.asarray(exclude))
    return nn.astype(np.int64), np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    query_embeddings: Any = None,
    query_labels: Any = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R with exact faiss k-NN (squared L2, ``IndexFlatL2``).

    Args:
        embeddings: ``(n, d)`` L2-normalised embeddings.  Leave-one-out mode (default): every
            row is a query against all other rows (the query is removed by *index*, so exact
            duplicates of other classes are ranked like any other neighbour).  Query-vs-gallery
            mode (In-Shop): when ``query_embeddings`` is given, these are the gallery.
        labels: ``(n,)`` class labels of ``embeddings``.
        ks: the K of Recall@K.
        query_embeddings: optional ``(m, d)`` queries (gallery mode).
        query_labels: ``(m,)`` labels of the queries (required with ``query_embeddings``).
        chunk_size: maximum number of queries per faiss search; ``None`` picks the largest
            multiple of 4096 that keeps one chunk's neighbour lists under ~1 GiB (e.g. 60k
            points in 10 classes of 6,000: 4096 queries x 6,000 neighbours, ~1 GB peak).
            Multiples of 4096 give bit-identical neighbour lists to a single search; other
            sizes may swap float32 near-ties, moving the metrics by ~1e-5 at most.

    Returns:
        ``{"recall@K" for K in ks, "r_precision", "map@r"}`` (python floats), averaged over
        queries with R > 0, where R = number of references of the query's class (self
        excluded).  With rel(i) = 1 if the i-th neighbour has the query's class:
        Recall@K = mean 1[sum_{i<=K} rel(i) > 0];  R-Precision = mean (1/R) sum_{i<=R} rel(i);
        MAP@R = mean (1/R) sum_{i<=R} P@i rel(i), P@i = (1/i) sum_{j<=i} rel(j)
        (Musgrave et al. 2020, eq. for MAP@R; identical to pml's AccuracyCalculator with
        ``k="max_bin_count"``).
    """
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError("every K in ks must be >= 1")
    ref = as_embeddings(embeddings, "embeddings")
    ref_labels = _as_labels(labels, len(ref), "labels")
    leave_one_out = query_embeddings is None
    if leave_one_out:
        if query_labels is not None:
            raise ValueError("query_labels given without query_embeddings")
        qry, qry_labels = ref, ref_labels
    else:
        if query_labels is None:
            raise ValueError("query_labels are required with query_embeddings")
        qry = as_embeddings(query_embeddings, "query_embeddings")
        qry_labels = _as_labels(query_labels, len(qry), "query_labels")
        if qry.shape[1] != ref.shape[1]:
            raise ValueError(
                f"query dim {qry.shape[1]} != gallery dim {ref.shape[1]}"
            )

    # integer class ids shared by queries and references
    _, inv = np.unique(np.concatenate([ref_labels, qry_labels]), return_inverse=True)
    inv = inv.reshape(-1).astype(np.int32 if len(inv) < 2**31 else np.int64)
    ref_ids, qry_ids = inv[: len(ref)], inv[len(ref) :]
    ref_counts = np.bincount(ref_ids, minlength=int(inv.max()) + 1)
    r_all = ref_counts[qry_ids] - (1 if leave_one_out else 0)  # R per query

    out_keys = [f"recall@{k}" for k in ks] + ["r_precision", "map@r"]
    valid = r_all > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return {key: float("nan") for key in out_keys}

    n_avail = len(ref) - (1 if leave_one_out else 0)  # neighbours a query can have
    if n_avail < 1:
        return {key: float("nan") for key in out_keys}
    # max R (global, not per chunk: row sums then see the same row length in every chunk,
    # so the floating-point result does not depend on the chunking)
    r_max = int(r_all.max())
    k_search = min(max(max(ks), r_max), n_avail)

    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)

    hits = {k: 0 for k in ks}
    # per-query values, averaged once at the end so that the result does not depend on
    # the chunking through floating-point summation order
    rp_per_query = np.zeros(len(qry), dtype=np.float64)
    map_per_query = np.zeros(len(qry), dtype=np.float64)
    for a, b in _query_chunks(len(qry), ref.shape[1], k_search, chunk_size):
        self_ids = np.arange(a, b, dtype=np.int64) if leave_one_out else None
        nn = _search(index, qry[a:b], k_search, self_ids)[0]
        keep = valid[a:b]
        if not keep.any():
            continue
        if not keep.all():
            nn = nn[keep]
        rel = ref_ids[nn] == qry_ids[a:b][keep][:, None]  # (c, k_search) bool
        del nn
        r = r_all[a:b][keep]
        for k in ks:
            hits[k] += int(rel[:, :k].any(axis=1).sum())
        rel_r = rel[:, :r_max] & (np.arange(r_max)[None, :] < r[:, None])
        del rel
        rows = np.flatnonzero(keep) + a
        rp_per_query[rows] = rel_r.sum(axis=1) / r
        # sum_{i<=R} P@i * rel(i), with P@i * rel(i) = rel(i) * cumsum(rel)(i) / i
        prec = np.where(rel_r, np.cumsum(rel_r, axis=1, dtype=np.int32), 0)
        del rel_r
        ap = (prec / np.arange(1.0, r_max + 1.0)).sum(axis=1)
        map_per_query[rows] = ap / r

    result = {f"recall@{k}": hits[k] / n_valid for k in ks}
    result["r_precision"] = float(rp_per_query[valid].mean())
    result["map@r"] = float(map_per_query[valid].mean())
    return result


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------
def kmeans_assign(
    embeddings: Any, n_clusters: int, seed: int = 0, niter: int = 20, nredo: int = 1
) -> np.ndarray:
    """k-means (``faiss.Kmeans``, L2) cluster id of every row: ``(n, d) -> (n,)`` int64.

    Deterministic for a given ``seed``.  Defaults (niter=20, faiss' subsampling to 256 points
    per centroid for training) are those of pml's ``FaissKMeans``; every point is assigned to
    its nearest final centroid.
    """
    x = as_embeddings(embeddings, "embeddings")
    n_clusters = int(n_clusters)
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters={n_clusters} must be in [1, {len(x)}]")
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=int(niter),
        nredo=int(nredo),
        seed=int(seed),
        verbose=False,
        min_points_per_centroid=1,  # only silences faiss' "too few points" warning
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def pairwise_f1(labels_true: Any, labels_pred: Any) -> float:
    """Pairwise clustering F1 over all n(n-1)/2 pairs (Song et al. 2016), ``(n,), (n,) -> float``.

    TP = pairs in the same cluster and the same class, P = TP / #same-cluster pairs,
    R = TP / #same-class pairs, F1 = 2PR / (P + R); computed from the (sparse) contingency
    table in O(n log n).  Returns 0.0 when TP = 0 (including degenerate all-singleton cases).
    """
    y = _to_numpy(labels_true).reshape(-1)
    c = _to_numpy(labels_pred).reshape(-1)
    if len(y) != len(c):
        raise ValueError("labels_true and labels_pred differ in length")
    _, yi = np.unique(y, return_inverse=True)
    _, ci = np.unique(c, return_inverse=True)
    yi = yi.reshape(-1).astype(np.int64)
    ci = ci.reshape(-1).astype(np.int64)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1.0) / 2.0).sum())

    _, cell_counts = np.unique(yi * (int(ci.max()) + 1) + ci, return_counts=True)
    tp = pairs(cell_counts)
    same_cluster = pairs(np.bincount(ci))
    same_class = pairs(np.bincount(yi))
    if tp == 0.0:
        return 0.0
    precision, recall = tp / same_cluster, tp / same_class
    return 2.0 * precision * recall / (precision + recall)


def clustering_metrics(
    embeddings: Any, labels: Any, seed: int = 0, niter: int = 20, nredo: int = 1
) -> dict[str, float]:
    """NMI and pairwise F1 of k-means (k = number of distinct labels) on ``(n, d)`` embeddings.

    NMI = I(Y; C) / ((H(Y) + H(C)) / 2) (sklearn ``normalized_mutual_info_score``, arithmetic
    average, as pml); F1 see ``pairwise_f1``.  Returns ``{"nmi": float, "f1": float}``.
    """
    from sklearn.metrics import normalized_mutual_info_score

    x = as_embeddings(embeddings, "embeddings")
    y = _as_labels(labels, len(x), "labels")
    n_classes = len(np.unique(y))
    assign = kmeans_assign(x, n_classes, seed=seed, niter=niter, nredo=nredo)
    nmi = normalized_mutual_info_score(y, assign, average_method="arithmetic")
    return {"nmi": float(nmi), "f1": pairwise_f1(y, assign)}


# --------------------------------------------------------------------------------------------
# utilization (Metrix)
# --------------------------------------------------------------------------------------------
def nearest_train_distances(query_embeddings: Any, train_embeddings: Any) -> np.ndarray:
    """Squared Euclidean distance of each query to its nearest training embedding.

    ``(m, d), (n, d) -> (m,)`` float64: min_x ||f(q) - f(x)||^2.  One exact k=1 faiss
    ``IndexFlatL2`` search finds the neighbour; the distance to it is then recomputed
    directly in float64 (faiss' ``|q|^2 + |x|^2 - 2 q.x`` loses precision near 0).
    """
    q = as_embeddings(query_embeddings, "query_embeddings")
    x = as_embeddings(train_embeddings, "train_embeddings")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != train dim {x.shape[1]}")
    nn = knn(q, x, 1)[0][:, 0]
    out = np.empty(len(q), dtype=np.float64)
    step = max(1, (1 << 24) // q.shape[1])
    for a in range(0, len(q), step):
        diff = q[a : a + step].astype(np.float64) - x[nn[a : a + step]].astype(np.float64)
        out[a : a + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def utilization(query_embeddings: Any, train_embeddings: Any) -> float:
    """Metrix utilization u(Q, X) = (1/|Q|) sum_{q in Q} min_{x in X} ||f(q) - f(x)||^2.

    ``(m, d)`` query (test) embeddings, ``(n, d)`` training embeddings -> float
    (docs/METHODS.md section 3; lower = training set closer to every test example).
    """
    return float(nearest_train_distances(query_embeddings, train_embeddings).mean())
