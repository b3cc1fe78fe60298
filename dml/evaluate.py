"""Evaluate a saved checkpoint: rebuild the model from safetensors, embed a data set, measure."""

from __future__ import annotations

import os
from typing import Any

from dml.runs import DEFAULT_RUNS_ROOT, resolve_run


def evaluate_run(ref: str, runs_root: str | os.PathLike = DEFAULT_RUNS_ROOT, tag: str = "best",
                 device: str = "auto", dataset: str | None = None,
                 data_root: str | None = None) -> dict[str, Any]:
    """Test metrics of a run's ``best`` (or ``last``) checkpoint, recomputed from its weights.

    ``tag="untrained"`` evaluates the same architecture freshly initialised with the run's seed:
    the reference a trained model has to beat.
    """
    from dml.data import load_dataset
    from dml.data.transforms import make_transform
    from dml.metrics import clustering_metrics, retrieval_metrics, utilization
    from dml.train import embed, load_checkpoint, resolve_device

    import torch

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
    tf = make_transform(ds, train=False)
    bs = cfg["train"]["eval_batch_size"]
    test = embed(model, ds.test, tf, dev, bs)
    if ds.gallery is not None:
        gallery = embed(model, ds.gallery, tf, dev, bs)
        metrics = retrieval_metrics(gallery, ds.gallery.labels.numpy(), query_embeddings=test,
                                    query_labels=ds.test.labels.numpy())
    else:
        metrics = retrieval_metrics(test, ds.test.labels.numpy())
    metrics.update(clustering_metrics(test, ds.test.labels.numpy(), seed=cfg["train"]["seed"]))
    metrics["utilization"] = utilization(test, embed(model, ds.train, tf, dev, bs))
    out = {"test": metrics}
    if ds.val is not None:
        out["val"] = retrieval_metrics(embed(model, ds.val, tf, dev, bs), ds.val.labels.numpy())
    return {"run": run.id, "checkpoint": tag, "epoch": info["epoch"], "dataset": ds.name,
            "metrics": out}
