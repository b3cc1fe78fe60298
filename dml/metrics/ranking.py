"""The exact ranking behind the retrieval metrics, three ways: a faiss search, a per-class
rank count that needs no search (large classes), and block-wise matmul + ``torch.topk`` for
embeddings on a GPU. All order equal distances by reference index, as faiss does."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from dml.metrics.neighbours import _query_chunks, _search


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


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = [0, None]   # threads inside _one_blas_thread, and the limiter they share


@contextlib.contextmanager
def _one_blas_thread():
    """A context in which BLAS libraries run single-threaded (threadpoolctl, which
    scikit-learn brings; without it, nothing changes). The limit is process-wide: overlapping
    users (two sessions of the app) share one limiter, and the last one out restores BLAS."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with _BLAS_LOCK:
        if _BLAS_USERS[0] == 0:
            _BLAS_USERS[1] = threadpool_limits(limits=1, user_api="blas")
        _BLAS_USERS[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS[0] -= 1
            if _BLAS_USERS[0] == 0:
                _BLAS_USERS[1].restore_original_limits()
                _BLAS_USERS[1] = None


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
