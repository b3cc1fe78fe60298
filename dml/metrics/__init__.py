"""Evaluation metrics for deep metric learning (docs/METHODS.md sections 3 and 6).

Modules: ``retrieval`` (the metrics and per-query retrieval), ``ranking`` (the exact ranking
they read, three ways), ``neighbours`` (the one kNN, ``knn``), ``clustering``,
``nearest_train`` (utilization) and ``arrays`` (input conversion). Everything public is
importable from ``dml.metrics``.

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

from dml.metrics.arrays import as_embeddings
from dml.metrics.clustering import clustering_metrics, kmeans_assign, pairwise_f1
from dml.metrics.neighbours import knn
from dml.metrics.ranking import RANK_MIN_K
from dml.metrics.retrieval import (QueryRetrieval, query_retrieval, reference_split,
                                   retrieval_metrics, split_retrieval_args)
from dml.metrics.nearest_train import nearest_train_distances, utilization

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
    "knn",
    "as_embeddings",
    "RANK_MIN_K",
]
