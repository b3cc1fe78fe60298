"""Retrieval metrics (Recall@K, R-Precision, MAP@R) and, per query, what they average
(``query_retrieval``); which references a split's queries rank against. The ranking itself is
in :mod:`dml.metrics.ranking`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dml.metrics.arrays import (_as_labels, _as_torch_embeddings, _on_accelerator, _to_numpy,
                               as_embeddings)
from dml.metrics.neighbours import knn
from dml.metrics.ranking import (RANK_MIN_K, _NO_HIT, _RankJob, _ranks_by_class, _ranks_faiss,
                                _ranks_torch)


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
        n = len(_to_numpy(embeddings if query_embeddings is None else query_embeddings))
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
