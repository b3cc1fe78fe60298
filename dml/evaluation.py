"""Evaluation, one definition for the trainer, ``dml eval`` and the checkpoint inspector.

A data set is evaluated on L2-normalised embeddings of its splits (docs/METHODS.md §6):

- ``val``: leave-one-out retrieval (Recall@K, R-Precision, MAP@R), for checkpoint selection;
- ``test``: leave-one-out retrieval on the test split, or, for query/gallery data sets
  (In-Shop), the test split's queries against the gallery; clustering (NMI, F1 of k-means with
  k = number of classes) of the test split's embeddings (the queries);
- ``utilization``: the mean squared distance from a test embedding to its nearest training
  embedding (docs/METHODS.md §3).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dml.runs import DEFAULT_RUNS_ROOT, RunWriter, resolve_run

SPLITS = ("train", "val", "test", "gallery")


@torch.no_grad()
def embed(model: nn.Module, split, transform, device: torch.device,
          batch_size: int = 512) -> np.ndarray:
    """Embeddings (N, D) float32 of every image of a split, in order, model in eval mode."""
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(split)))
        out.append(model(transform(split.load(idx)).to(device)).float().cpu())
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def embed_splits(model: nn.Module, ds, transform, device: torch.device, batch_size: int = 512,
                 splits=SPLITS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Embeddings and labels of the data set's ``splits`` that exist."""
    emb = {k: embed(model, getattr(ds, k), transform, device, batch_size)
           for k in splits if getattr(ds, k, None) is not None}
    return emb, {k: getattr(ds, k).labels.numpy() for k in emb}


def evaluate_embeddings(emb: dict[str, np.ndarray], labels: dict[str, np.ndarray], *,
                        clustering: bool = True, seed: int = 0) -> dict[str, Any]:
    """The evaluation record of embedded splits (see the module doc): {"val": metrics,
    "test": metrics, "utilization": float} for the parts whose splits are given, and
    "test_nn_distance" (per test example, for utilization maps)."""
    from dml.metrics import clustering_metrics, nearest_train_distances, retrieval_metrics

    record: dict[str, Any] = {}
    if "val" in emb:
        record["val"] = retrieval_metrics(emb["val"], labels["val"])
    if "test" in emb:
        if "gallery" in emb:
            record["test"] = retrieval_metrics(emb["gallery"], labels["gallery"],
                                               query_embeddings=emb["test"],
                                               query_labels=labels["test"])
        else:
            record["test"] = retrieval_metrics(emb["test"], labels["test"])
        if clustering:
            record["test"].update(clustering_metrics(emb["test"], labels["test"], seed=seed))
        if "train" in emb:
            nn_dist = nearest_train_distances(emb["test"], emb["train"])
            record["utilization"] = float(nn_dist.mean())
            record["test_nn_distance"] = nn_dist
    return record


def evaluate_epoch(cfg, ds, model, loss_fn, strategy, eval_tf, device, probe_idx, train_y,
                   writer: RunWriter, epoch: int) -> dict[str, Any]:
    """The trainer's evaluation: the record of ``evaluate_embeddings``, the synthetic points the
    strategy makes from the probe batch (and the utilization with them), and the epoch's npz."""
    from dml.metrics import nearest_train_distances

    t = cfg.train
    emb, labels = embed_splits(model, ds, eval_tf, device, t.eval_batch_size)
    record = {"epoch": epoch, **evaluate_embeddings(emb, labels, clustering=t.clustering,
                                                   seed=t.seed)}
    nn_dist = record.pop("test_nn_distance")
    arrays: dict[str, np.ndarray] = {}
    synthetic = strategy_snapshot(strategy, model, loss_fn, ds, eval_tf, device, probe_idx,
                                  train_y)
    if synthetic is not None:
        syn = synthetic.to_numpy(class_ids=ds.train.classes().numpy())
        mixed_X = np.concatenate([emb["train"], syn["embeddings"]])
        record["utilization_mixed"] = float(nearest_train_distances(emb["test"], mixed_X).mean())
        record["synthetic_points"] = len(synthetic)
        arrays.update({f"synthetic_{k}": v for k, v in syn.items()})
        arrays["probe_index"] = probe_idx.numpy()
    if t.save_embeddings:
        for k, e in emb.items():
            arrays[f"{k}_embeddings"] = e.astype(np.float16)
            arrays[f"{k}_labels"] = labels[k].astype(np.int64)
        arrays["test_nn_distance"] = nn_dist.astype(np.float32)
    if arrays:
        writer.save_eval(epoch, **arrays)
    return record


MAX_SNAPSHOT_POINTS = 2048


def strategy_snapshot(strategy, model, loss_fn, ds, eval_tf, device, probe_idx, train_y):
    """Synthetic points the strategy makes from the fixed probe batch (same images each time)."""
    was = model.training
    model.eval()
    try:
        x = eval_tf(ds.train.load(probe_idx)).to(device)
        syn = strategy.synthesize(model, loss_fn, x, train_y[probe_idx].to(device))
        if syn is not None and len(syn) > MAX_SNAPSHOT_POINTS:   # a fixed, seeded subset
            g = torch.Generator().manual_seed(len(syn))
            keep = torch.randperm(len(syn), generator=g)[:MAX_SNAPSHOT_POINTS].sort().values
            syn = syn.subset(keep.to(syn.embeddings.device))
        return syn
    finally:
        model.train(was)


def probe_indices(labels: torch.Tensor, classes: int, per_class: int, seed: int) -> torch.Tensor:
    """A fixed balanced batch of training indices: ``classes`` x ``per_class`` images."""
    g = torch.Generator().manual_seed(10_000 + seed)
    uniq = torch.unique(labels)
    chosen = uniq[torch.randperm(len(uniq), generator=g)[:classes]].sort().values
    out = []
    for c in chosen:
        members = torch.nonzero(labels == c).flatten()
        out.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(out)


def evaluate_run(ref: str, runs_root: str | os.PathLike = DEFAULT_RUNS_ROOT, tag: str = "best",
                 device: str = "auto", dataset: str | None = None,
                 data_root: str | None = None) -> dict[str, Any]:
    """Test metrics of a run's ``best`` (or ``last``) checkpoint, recomputed from its weights.

    ``tag="untrained"`` evaluates the same architecture freshly initialised with the run's seed:
    the reference a trained model has to beat.
    """
    from dml.checkpoints import load_checkpoint, resolve_device
    from dml.data import load_dataset
    from dml.data.transforms import make_transform
    from dml.models import build_model

    run = resolve_run(ref, runs_root)
    dev = resolve_device(device)
    weights = run.checkpoint_path("last" if tag == "untrained" else tag)
    if not weights.is_file():
        raise FileNotFoundError(f"run {run.id} has no {tag} checkpoint yet ({weights})")
    model, info = load_checkpoint(weights, device=dev)
    cfg = run.config()
    if tag == "untrained":
        m = info["model"]
        torch.manual_seed(cfg["train"]["seed"])
        model = build_model(m["name"], m["in_channels"], m["image_size"], m["embedding_dim"],
                            **m.get("params", {})).to(dev).eval()
        info = dict(info, epoch=0)
    d = cfg["data"]
    ds = load_dataset(dataset or d["name"], data_root if dataset else (data_root or d["root"]),
                      image_size=info["model"]["image_size"], val_classes=d["val_classes"],
                      split=d["split"], seed=d["split_seed"])
    if ds.channels != info["model"]["in_channels"]:
        raise ValueError(f"data set {ds.name!r} has {ds.channels} channel(s), the model expects "
                         f"{info['model']['in_channels']}")
    emb, labels = embed_splits(model, ds, make_transform(ds, train=False), dev,
                               cfg["train"]["eval_batch_size"])
    record = evaluate_embeddings(emb, labels, seed=cfg["train"]["seed"])
    out = {"test": {**record["test"], "utilization": record["utilization"]}}
    if "val" in record:
        out["val"] = record["val"]
    return {"run": run.id, "checkpoint": tag, "epoch": info["epoch"], "dataset": ds.name,
            "metrics": out}
