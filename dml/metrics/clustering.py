"""Clustering metrics: k-means (faiss) assignments, NMI and pairwise F1."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from dml.metrics.arrays import _as_labels, _to_numpy, as_embeddings


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
