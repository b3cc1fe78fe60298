"""Evaluation metrics for deep metric learning (docs/METHODS.md sections 3 and 6).

Retrieval (Recall@K, R-Precision, MAP@R, and per query what they average: ``query_retrieval``),
clustering (NMI, pairwise F1) and the Metrix "utilization" measure. Every nearest-neighbour
ranking is exact. On the CPU it is a faiss search
(faiss uses all OpenMP threads, ``faiss.omp_get_max_threads()``), or, for retrieval with large
classes (MAP@R needs R = class size - 1 neighbours per query), a per-class rank count that needs
no search (``retrieval_metrics(method="rank")``); embeddings that are torch tensors on a GPU are
ranked there (block-wise matmul and ``torch.topk``).

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

from dataclasses import dataclass
from typing import Any, Sequence

import faiss
import numpy as np

__all__ = [
    "retrieval_metrics",
    "query_retrieval",
    "QueryRetrieval",
    "reference_split",
    "split_retrieval_args",
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


def _on_accelerator(x: Any) -> bool:
    """Whether ``x`` is a torch tensor on a non-CPU device (CUDA, MPS)."""
    dev = getattr(x, "device", None)
    return hasattr(x, "detach") and dev is not None and getattr(dev, "type", "cpu") != "cpu"


def _as_torch_embeddings(x: Any, name: str):
    """``x`` as a float32 (n, d) torch tensor on its own device (numpy: on the CPU), checked
    like ``as_embeddings``."""
    import torch

    t = x.detach() if hasattr(x, "detach") else torch.from_numpy(np.asarray(x))
    t = t.to(torch.float32).contiguous()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


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
    method: str = "auto",
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R by exact nearest-neighbour ranking (squared L2).

    Args:
        embeddings: ``(n, d)`` L2-normalised embeddings.  Leave-one-out mode (default): every
            row is a query against all other rows (the query is removed by *index*, so exact
            duplicates of other classes are ranked like any other neighbour).  Query-vs-gallery
            mode (In-Shop): when ``query_embeddings`` is given, these are the gallery.
        labels: ``(n,)`` class labels of ``embeddings``.
        ks: the K of Recall@K.
        query_embeddings: optional ``(m, d)`` queries (gallery mode).
        query_labels: ``(m,)`` labels of the queries (required with ``query_embeddings``).
        chunk_size: maximum number of queries per faiss search (``method="faiss"``); ``None``
            picks the largest multiple of 4096 that keeps one chunk's neighbour lists under
            ~1 GiB. Multiples of 4096 give bit-identical neighbour lists to a single search;
            other sizes may swap float32 near-ties, moving the metrics by ~1e-5 at most.
        method: how the ranking is computed; every method ranks by squared distance as a
            float32 and breaks exact ties by the smaller index:

            * ``"faiss"``: one exact faiss k-NN search of k = max(max K, max R) neighbours per
              query (``IndexFlatL2``, as pml); cheap while k is small.
            * ``"rank"``: per class, the sorted distances to the R class members and, merged
              with them, only the max(R, max K) nearest other-class distances (a partition, not
              a search): O(n) per query plus sorting what MAP@R needs. For data sets with large
              classes (MNIST-like: R in the thousands) it is many times cheaper than a search
              of R neighbours and computes the same ranks.
            * ``"torch"``: block-wise matmul and ``torch.topk`` on the embeddings' device
              (the GPU path; also runs on CPU tensors).
            * ``"auto"`` (default): ``"torch"`` when the embeddings are torch tensors on a
              non-CPU device, else ``"rank"`` when k >= ``RANK_MIN_K``, else ``"faiss"``.

            faiss computes the distance in float32 (per pair for small sets, by BLAS as
            ``|q|^2 + |x|^2 - 2 q.x`` once queries x dimensions >= 128,000); the rank and torch
            methods compute that formula in float64 and round it, so they give the float64
            ranking of the definition and agree with faiss up to its float32 rounding
            (distances within ~1e-7 of each other may be swapped: metrics within ~1e-6).

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
    if not ks or any(k < 1 for k in ks):
        raise ValueError("ks must be a non-empty list of K >= 1")
    out_keys = [f"recall@{k}" for k in ks] + ["r_precision", "map@r"]
    job, method = _rank_job(embeddings, labels, max(ks), query_embeddings, query_labels,
                            method)
    if job is None or not job.valid.any():
        return {key: float("nan") for key in out_keys}
    first, rp, ap = _rank(job, method, chunk_size)
    valid = job.valid
    n_valid = int(valid.sum())
    first = first[valid]
    result = {f"recall@{k}": int(np.count_nonzero(first <= k)) / n_valid for k in ks}
    result["r_precision"] = float(rp[valid].mean())
    result["map@r"] = float(ap[valid].mean())
    return result


def _rank_job(embeddings: Any, labels: Any, k_max: int, query_embeddings: Any,
              query_labels: Any, method: str, top_k: int = 0) -> tuple["_RankJob | None", str]:
    """The checked inputs of a retrieval evaluation as a ``_RankJob`` (None when a query can
    have no neighbour at all) and the method that ranks it (``"auto"`` resolved), as
    ``retrieval_metrics`` describes them. ``k_max``: the largest K ranked; ``top_k``: how many
    nearest references per query the job keeps (``job.top``)."""
    if method not in ("auto", "faiss", "rank", "torch"):
        raise ValueError(f"method must be 'auto', 'faiss', 'rank' or 'torch', got {method!r}")
    if method == "auto" and (_on_accelerator(embeddings) or _on_accelerator(query_embeddings)):
        method = "torch"
    conv = _as_torch_embeddings if method == "torch" else as_embeddings
    ref = conv(embeddings, "embeddings")
    ref_labels = _as_labels(labels, len(ref), "labels")
    leave_one_out = query_embeddings is None
    if leave_one_out:
        if query_labels is not None:
            raise ValueError("query_labels given without query_embeddings")
        qry, qry_labels = ref, ref_labels
    else:
        if query_labels is None:
            raise ValueError("query_labels are required with query_embeddings")
        qry = conv(query_embeddings, "query_embeddings")
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

    n_avail = len(ref) - (1 if leave_one_out else 0)  # neighbours a query can have
    if n_avail < 1:
        return None, method
    # max R (global, not per chunk: row sums then see the same row length in every chunk,
    # so the floating-point result does not depend on the chunking)
    r_max = int(r_all.max())
    k_max = max(int(k_max), int(top_k))
    k_search = min(max(k_max, r_max), n_avail)
    if method == "auto":
        method = "rank" if k_search >= RANK_MIN_K else "faiss"
    job = _RankJob(ref, qry, ref_ids, qry_ids, r_all, r_all > 0, k_max, r_max, k_search,
                   leave_one_out)
    if top_k:
        job.top = np.full((len(qry), min(int(top_k), n_avail)), -1, np.int64)
    return job, method


def _rank(job: "_RankJob", method: str, chunk_size: int | None = None):
    """Per query: rank of the first same-class neighbour, R-Precision and AP@R (see
    ``_RankJob.outputs``), by ``method`` ("faiss", "rank" or "torch"); ``job.top``, when the
    job has it, gets the nearest references of every query that counts."""
    if method == "faiss":
        return _ranks_faiss(job, chunk_size)
    if method == "rank":
        return _ranks_by_class(job)
    return _ranks_torch(job)


def reference_split(split: str, splits) -> str:
    """The split whose images the queries of ``split`` are ranked against (``splits``: the
    splits there are): a query/gallery data set's (In-Shop's) test queries against its gallery,
    any other split against itself, leave-one-out (docs/METHODS.md section 6)."""
    return "gallery" if split == "test" and "gallery" in splits else split


def split_retrieval_args(emb: Any, labels: Any, split: str) -> dict[str, Any]:
    """The arguments of ``retrieval_metrics`` / ``query_retrieval`` that rank the queries of
    ``split`` as Tango's evaluation does, from embedded splits (``emb``, ``labels``: split ->
    array): against ``reference_split(split, emb)``, leave-one-out when that is ``split``."""
    ref = reference_split(split, emb)
    args = {"embeddings": emb[ref], "labels": labels[ref]}
    if ref != split:
        args.update(query_embeddings=emb[split], query_labels=labels[split])
    return args


@dataclass
class QueryRetrieval:
    """What each query of an evaluation retrieves (``query_retrieval``); m queries, k shown.

    ap: (m,) float64, the query's AP@R (its term of MAP@R), NaN where it does not count.
    r_precision: (m,) float64, its R-Precision (NaN where it does not count).
    r: (m,) int64, R: the references of its class (itself excluded).
    valid: (m,) bool, R > 0: the queries every retrieval metric averages over.
    top1: (m,) bool, its nearest reference has its class (False where it does not count).
    neighbours: (m, k) int64, its k nearest references (indices into the references), nearest
    first, equal distances by the smaller index; -1 past the last reference there is.
    correct: (m, k) bool, which of them have the query's class.
    leave_one_out: the queries are the references (each query left out of its own list).
    """

    ap: np.ndarray
    r_precision: np.ndarray
    r: np.ndarray
    valid: np.ndarray
    top1: np.ndarray
    neighbours: np.ndarray
    correct: np.ndarray
    leave_one_out: bool

    def __len__(self) -> int:
        return len(self.ap)


def query_retrieval(
    embeddings: Any,
    labels: Any,
    k: int = 10,
    query_embeddings: Any = None,
    query_labels: Any = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> QueryRetrieval:
    """Per query, what ``retrieval_metrics`` averages: AP@R, R-Precision, whether the top-1 is
    right, and the ``k`` nearest references with a right/wrong flag each (``QueryRetrieval``).

    Arguments and conventions are ``retrieval_metrics``' (leave-one-out by default, query vs
    gallery with ``query_embeddings``; the same ranking by ``method``), so over the queries
    that count (``valid``) the mean of ``ap`` is its ``map@r``, the mean of ``top1`` its
    ``recall@1``. Queries that do not count (no other reference of their class) get NaN AP@R
    and their k nearest references from one exact search (``knn``). It costs what the metrics
    cost (the same ranking; the k nearest are read off it): 35,000 queries, d=128, on 2 shared
    cores (``benchmarks/bench_query_retrieval.py``, fastest of 3): 10 classes (the rank
    method) 14.4 s against 16.6 s for ``retrieval_metrics``, 3,500 classes (faiss) 7.1 s
    against 7.2 s; on a quieter moment 10.1 s against 14.5 s and 1.65 s against 1.63 s.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    job, method = _rank_job(embeddings, labels, 1, query_embeddings, query_labels, method,
                            top_k=k)
    leave_one_out = query_embeddings is None
    if job is None:   # a single reference and leave-one-out: nothing to rank
        n = len(_to_numpy(embeddings))
        none = np.zeros(n, bool)
        return QueryRetrieval(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64),
                              none, none.copy(), np.zeros((n, 0), np.int64),
                              np.zeros((n, 0), bool), leave_one_out)
    valid = job.valid
    if valid.any():
        first, rp, ap = _rank(job, method, chunk_size)
    else:
        first = np.full(len(valid), _NO_HIT, np.int64)
        rp = ap = np.zeros(len(valid))
    top = job.top
    lone = np.flatnonzero(~valid)
    if len(lone):   # not ranked by the metrics: their neighbours from one search
        q, r = _to_numpy(job.qry)[lone], _to_numpy(job.ref)
        top[lone] = knn(q, r, top.shape[1], lone if leave_one_out else None)[0]
    correct = (top >= 0) & (job.ref_ids[np.maximum(top, 0)] == job.qry_ids[:, None])
    return QueryRetrieval(
        ap=np.where(valid, ap, np.nan), r_precision=np.where(valid, rp, np.nan),
        r=job.r_all.astype(np.int64), valid=valid.copy(), top1=valid & (first == 1),
        neighbours=top, correct=correct, leave_one_out=leave_one_out)


# Below this many neighbours per query ("auto") the faiss search is the cheaper method.
RANK_MIN_K = 512
# Rank of the first same-class neighbour when none is among the neighbours ranked.
_NO_HIT = np.iinfo(np.int64).max
# Memory budget for the distance blocks of the torch method, and of one block of the rank
# method (one per thread).
_BLOCK_BUDGET_BYTES = 256 << 20
_RANK_BLOCK_BYTES = 128 << 20


@dataclass
class _RankJob:
    """One retrieval evaluation: references, queries, their integer class ids, R per query
    (``r_all``), which queries count (``valid``: R > 0), the largest K and R, the number of
    neighbours a search needs (``k_search``) and the mode."""

    ref: Any
    qry: Any
    ref_ids: np.ndarray
    qry_ids: np.ndarray
    r_all: np.ndarray
    valid: np.ndarray
    k_max: int
    r_max: int
    k_search: int
    leave_one_out: bool
    # (n_q, t) nearest references of each query, filled by the ranking when set (-1: none)
    top: np.ndarray | None = None

    def outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: rank of the first same-class neighbour (``_NO_HIT``: none ranked),
        R-Precision and AP@R (0 for queries that do not count)."""
        n = len(self.qry)
        return (np.full(n, _NO_HIT, np.int64), np.zeros(n, np.float64),
                np.zeros(n, np.float64))


def _ranks_faiss(job: _RankJob, chunk_size: int | None):
    """The k-NN lists of one exact faiss search (k = ``job.k_search``), chunked by queries."""
    ref, qry, k_search, r_max = job.ref, job.qry, job.k_search, job.r_max
    first, rp_per_query, map_per_query = job.outputs()
    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    for a, b in _query_chunks(len(qry), ref.shape[1], k_search, chunk_size):
        self_ids = np.arange(a, b, dtype=np.int64) if job.leave_one_out else None
        nn = _search(index, qry[a:b], k_search, self_ids)[0]
        keep = job.valid[a:b]
        if not keep.any():
            continue
        if not keep.all():
            nn = nn[keep]
        rel = job.ref_ids[nn] == job.qry_ids[a:b][keep][:, None]  # (c, k_search) bool
        r = job.r_all[a:b][keep]
        rows = np.flatnonzero(keep) + a
        if job.top is not None:
            job.top[rows] = nn[:, :job.top.shape[1]]
        del nn
        hit = rel.any(axis=1)
        first[rows[hit]] = rel[hit].argmax(axis=1) + 1
        rel_r = rel[:, :r_max] & (np.arange(r_max)[None, :] < r[:, None])
        del rel
        rp_per_query[rows] = rel_r.sum(axis=1) / r
        # sum_{i<=R} P@i * rel(i), with P@i * rel(i) = rel(i) * cumsum(rel)(i) / i
        prec = np.where(rel_r, np.cumsum(rel_r, axis=1, dtype=np.int32), 0)
        del rel_r
        ap = (prec / np.arange(1.0, r_max + 1.0)).sum(axis=1)
        map_per_query[rows] = ap / r
    return first, rp_per_query, map_per_query


def _sq_distances(q: np.ndarray, q_norms: np.ndarray, x: np.ndarray,
                  x_norms: np.ndarray) -> np.ndarray:
    """Squared distances (b, n) |q|^2 + |x|^2 - 2 q.x, computed in float64 (``q``, ``x`` and
    the norms float64) and rounded to float32, clamped at 0. In float32 this formula loses
    ~2.4e-7 absolute to cancellation, which reorders close neighbours of crowded embeddings
    (an untrained network's); in float64 the float32 result is the correctly rounded distance
    up to 1 ulp, as faiss' direct kernel computes it for small sets."""
    dot = q @ x.T
    dot *= -2.0
    dot += q_norms[:, None]
    dot += x_norms[None, :]
    out = dot.astype(np.float32)
    return np.maximum(out, 0.0, out=out)


def _index_keys(d: np.ndarray, index: np.ndarray, mark: int = 0) -> np.ndarray:
    """int64 keys that order pairs by (distance, reference index), as faiss ranks them: the
    bits of a non-negative float32 distance (they order like the float; -0.0 becomes 0), then
    the reference index (< 2^31), then one bit ``mark`` (1: same-class reference). ``d``:
    distances (b, n) with ``index`` (n,) or (b, n)."""
    bits = np.maximum(np.ascontiguousarray(d, np.float32).view(np.int32), 0).astype(np.int64)
    bits <<= 32
    bits |= np.left_shift(index, 1)
    if mark:
        bits |= 1
    return bits


def _smallest_keys(d: np.ndarray, index: np.ndarray, m: int) -> np.ndarray:
    """(b, m), in no order: the m smallest (distance, index) keys of each row of ``d`` (b, n),
    whose columns are the references ``index`` (n,) (excluded ones at +inf; at least m
    finite). A float partition picks m smallest distances; a row in which the m-th one is
    equalled outside the pick (which equal ones it took is arbitrary) is picked again on
    keys."""
    pick = np.argpartition(d, m - 1, axis=1)[:, :m]
    vals = np.take_along_axis(d, pick, axis=1)
    keys = _index_keys(vals, index[pick])
    w = vals.max(axis=1, keepdims=True)
    redo = np.flatnonzero((d == w).sum(axis=1) > (vals == w).sum(axis=1))
    if len(redo):
        keys[redo] = np.partition(_index_keys(d[redo], index), m - 1, axis=1)[:, :m]
    return keys


def _ranks_by_class(job: _RankJob):
    """The rank method (see ``retrieval_metrics``): queries class by class, in blocks.

    A query of class c has R same-class references. Its R + m nearest neighbours, m =
    max(R, max K), are among its R same-class references and the m nearest other-class ones:
    a float partition of the row finds those (``_smallest_keys``), no search of R + m
    neighbours is needed. The two sets are merged by sorting int64 keys (``_index_keys``) that
    order by (distance, reference index), as faiss does: float32 distances of normalised
    vectors are multiples of ~2.4e-7, so equal distances are common (most queries of a
    35,000-image test set have one) and their order decides some ranks. The first R entries of
    the merged list give R-Precision and AP@R, the first max K Recall@K, computed as in
    ``_ranks_faiss``."""
    ref, qry = job.ref, job.qry
    first, rp_out, ap_out = job.outputs()
    qry = qry.astype(np.float64)
    qry_norms = np.einsum("ij,ij->i", qry, qry)
    # references grouped by class (each class in index order): a class is a column range of a
    # distance block, so no column gathers; ``order`` maps a column to the reference's index
    order = np.argsort(job.ref_ids, kind="stable")
    column = np.empty(len(ref), np.int64)
    column[order] = np.arange(len(ref))
    # distances to the distinct reference vectors only: exact duplicates then get exactly
    # equal distances (BLAS rounds the same vector differently at different positions), so
    # their order is the index order, as in the definition
    uniq, inverse = np.unique(ref[order], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(uniq) == len(ref):
        uniq, inverse = ref[order], None
    uniq = uniq.astype(np.float64)
    uniq_norms = np.einsum("ij,ij->i", uniq, uniq)
    workers = _cpu_workers()

    def run(qb, start, stop, r, m):
        d = _sq_distances(qry[qb], qry_norms[qb], uniq, uniq_norms)
        if inverse is not None:
            d = d[:, inverse]
        if job.leave_one_out:   # the query itself, by index: +inf sorts it last
            d[np.arange(len(qb)), column[qb]] = np.inf
        # the same-class references (marked) merged with the other classes' m nearest: sorted,
        # their first r + m entries are the query's r + m nearest neighbours, in faiss' order
        keys = [_index_keys(d[:, start:stop], order[start:stop], mark=1)]
        if m:
            d[:, start:stop] = np.inf
            keys.insert(0, _smallest_keys(d, order, m))
        del d
        merged = np.concatenate(keys, axis=1) if m else keys[0]
        del keys
        merged.sort(axis=1)
        k = min(max(r, job.k_max), r + m)
        rel = (merged[:, :k] & 1).astype(bool)   # rel(i): the i-th neighbour is same-class
        if job.top is not None:   # the reference index of a key: its low 32 bits >> 1
            job.top[qb] = (merged[:, :job.top.shape[1]] & 0xFFFFFFFF) >> 1
        del merged
        hit = rel.any(axis=1)
        first[qb[hit]] = rel[hit].argmax(axis=1) + 1
        rel_r = rel[:, :r]
        rp_out[qb] = rel_r.sum(axis=1) / r
        # as _ranks_faiss: sum_{i<=R} rel(i) * cumsum(rel)(i) / i
        prec = np.where(rel_r, np.cumsum(rel_r, axis=1, dtype=np.int32), 0)
        ap_out[qb] = (prec / np.arange(1.0, r + 1.0)).sum(axis=1) / r

    sorted_ids = job.ref_ids[order]
    tasks = []
    for c in np.unique(job.qry_ids[job.valid]):
        start, stop = np.searchsorted(sorted_ids, c, "left"), np.searchsorted(sorted_ids, c,
                                                                               "right")
        queries = np.flatnonzero(job.valid & (job.qry_ids == c))
        r = int(stop - start) - (1 if job.leave_one_out else 0)
        m = min(max(r, job.k_max), len(ref) - int(stop - start))
        # the block size depends on the data only, not on the threads: BLAS rounds a query's
        # distances by its place in the block, and the result should not depend on the machine
        per_row = 16 * len(ref) + 8 * (5 * r + 3 * m)
        block = max(1, _RANK_BLOCK_BYTES // per_row)
        tasks += [(queries[a:a + block], int(start), int(stop), r, m)
                  for a in range(0, len(queries), block)]
    # blocks in parallel threads (numpy's products, sorts and partitions release the GIL),
    # each with a single-threaded BLAS (threads of both kinds fighting for the cores took 1.4x
    # the time); each block writes only its own queries' outputs
    if workers > 1 and len(tasks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with _one_blas_thread(), ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(run, *t) for t in tasks]:
                f.result()
    else:
        for t in tasks:
            run(*t)
    return first, rp_out, ap_out


def _one_blas_thread():
    """A context in which BLAS libraries run single-threaded (threadpoolctl, which
    scikit-learn brings; without it, nothing changes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _cpu_workers() -> int:
    """Threads for the rank method: faiss' OpenMP thread count (the cores it may use), at most
    8 (each holds a block of ``_RANK_BLOCK_BYTES``)."""
    try:
        return max(1, min(8, int(faiss.omp_get_max_threads())))
    except Exception:  # pragma: no cover
        return 1


def _ranks_torch(job: _RankJob):
    """The torch method: per block of queries, squared distances by matmul on the embeddings'
    device and ``torch.topk`` of k = ``job.k_search``; the metrics of the block computed
    there too. Equal distances are ordered by index, as faiss orders them."""
    import torch

    ref, qry = job.ref, job.qry
    dev = ref.device
    first, rp_out, ap_out = job.outputs()
    ref_ids = torch.as_tensor(job.ref_ids, dtype=torch.int64, device=dev)
    qry_ids = torch.as_tensor(job.qry_ids, dtype=torch.int64, device=dev)
    r_all = torch.as_tensor(job.r_all, dtype=torch.int64, device=dev)
    qry = qry.double()   # distances in float64, rounded to float32 (see _sq_distances)
    qry_norms = (qry * qry).sum(dim=1)
    uniq, inverse = torch.unique(ref, dim=0, return_inverse=True)   # as in _ranks_by_class
    if len(uniq) == len(ref):
        uniq, inverse = ref, None
    uniq = uniq.double()
    uniq_norms = (uniq * uniq).sum(dim=1)
    k, r_max = job.k_search, job.r_max
    queries = torch.as_tensor(np.flatnonzero(job.valid), device=dev)
    block = max(1, _BLOCK_BUDGET_BYTES // (24 * len(ref) + 32 * k))
    steps = torch.arange(1, r_max + 1, device=dev, dtype=torch.float64)
    index = torch.arange(len(ref), device=dev, dtype=torch.int64)[None, :]
    for a in range(0, len(queries), block):
        qb = queries[a:a + block]
        d = torch.addmm(qry_norms[qb][:, None] + uniq_norms[None, :], qry[qb], uniq.T,
                        beta=1.0, alpha=-2.0).float().clamp_min_(0.0)
        if inverse is not None:
            d = d[:, inverse]
        if job.leave_one_out:
            d[torch.arange(len(qb), device=dev), qb] = float("inf")
        # rank on (distance, index): the float bits of a distance >= 0 order like it, so
        # one int64 key per pair gives faiss' order, equal distances by the smaller index
        key = (d.view(torch.int32).clamp_min(0).to(torch.int64) << 32) | index
        del d
        nn = torch.topk(key, k, dim=1, largest=False, sorted=True).values & 0xFFFFFFFF
        del key
        rel = ref_ids[nn] == qry_ids[qb][:, None]
        if job.top is not None:
            job.top[qb.cpu().numpy()] = nn[:, :job.top.shape[1]].cpu().numpy()
        del nn
        hit = rel.any(dim=1)
        fr = torch.where(hit, rel.to(torch.int8).argmax(dim=1) + 1,
                         torch.full_like(qb, _NO_HIT))
        r = r_all[qb]
        rel_r = rel[:, :r_max] & (steps[None, :] <= r[:, None])
        del rel
        cums = torch.cumsum(rel_r, dim=1, dtype=torch.int32)
        prec = torch.where(rel_r, cums, torch.zeros_like(cums)).to(torch.float64)
        rows = qb.cpu().numpy()
        first[rows] = fr.cpu().numpy()
        rp_out[rows] = (rel_r.sum(dim=1).to(torch.float64) / r).cpu().numpy()
        ap_out[rows] = ((prec / steps).sum(dim=1) / r).cpu().numpy()
    return first, rp_out, ap_out


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
    if _on_accelerator(query_embeddings) or _on_accelerator(train_embeddings):
        return _nearest_distances_torch(query_embeddings, train_embeddings)
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


def _nearest_distances_torch(query_embeddings: Any, train_embeddings: Any) -> np.ndarray:
    """``nearest_train_distances`` on the embeddings' device: the nearest training embedding
    by block-wise matmul and argmin (the first of equal distances, as faiss), its distance
    recomputed in float64."""
    import torch

    q = _as_torch_embeddings(query_embeddings, "query_embeddings")
    x = _as_torch_embeddings(train_embeddings, "train_embeddings")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != train dim {x.shape[1]}")
    x = x.to(q.device)
    x_norms = (x * x).sum(dim=1)
    out = []
    block = max(1, _BLOCK_BUDGET_BYTES // (4 * len(x)))
    for a in range(0, len(q), block):
        qb = q[a:a + block]
        d = torch.addmm(x_norms[None, :], qb, x.T, beta=1.0, alpha=-2.0)
        nn = d.argmin(dim=1)
        diff = qb.double() - x[nn].double()
        out.append((diff * diff).sum(dim=1).cpu())
    return torch.cat(out).numpy()


def utilization(query_embeddings: Any, train_embeddings: Any) -> float:
    """Metrix utilization u(Q, X) = (1/|Q|) sum_{q in Q} min_{x in X} ||f(q) - f(x)||^2.

    ``(m, d)`` query (test) embeddings, ``(n, d)`` training embeddings -> float
    (docs/METHODS.md section 3; lower = training set closer to every test example).
    """
    return float(nearest_train_distances(query_embeddings, train_embeddings).mean())
