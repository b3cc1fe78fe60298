"""The one exact nearest-neighbour search of Tango (faiss ``IndexFlatL2``), in query chunks
sized to a memory budget."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np


# Memory budget for one chunk of queries: the (chunk, k+1) faiss outputs plus the per-chunk
# temporaries of the metric computation are about 40 bytes per neighbour slot.
_BYTES_PER_SLOT = 40
_DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30  # 1 GiB

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
