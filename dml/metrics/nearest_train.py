"""The Metrix "utilization" of the embedding space (docs/METHODS.md section 3): the mean
squared distance of each test embedding to its nearest training embedding."""

from __future__ import annotations

from typing import Any

import numpy as np

from dml.metrics.arrays import _as_torch_embeddings, _on_accelerator, as_embeddings
from dml.metrics.neighbours import knn
from dml.metrics.ranking import _BLOCK_BUDGET_BYTES


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
