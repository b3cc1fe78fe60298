"""Evaluation, one definition for the trainer, ``dml eval`` and the checkpoint inspector.

A data set is evaluated on L2-normalised embeddings of its splits (docs/METHODS.md §6):

- ``val``: leave-one-out retrieval (Recall@K, R-Precision, MAP@R), for checkpoint selection;
- ``test``: leave-one-out retrieval on the test split, or, for query/gallery data sets
  (In-Shop), the test split's queries against the gallery; clustering (NMI, F1 of k-means with
  k = number of classes) of the test split's embeddings (the queries);
- ``utilization``: the mean squared distance from a test embedding to its nearest training
  embedding (docs/METHODS.md §3).

Recall@K is reported for the K of the data set's literature (``dml.data.registry.recall_at``:
1, 2, 4, 8; SOP 1, 10, 100, 1000; In-Shop 1, 10, 20, 30, 40, 50) unless ``train.recall_at``
names others.

What an evaluation costs. The trainer embeds the validation and test splits and, for utilization
and the maps only, a fixed subsample of the training split (``train.train_embed_max``, default
10,000 images: seeded by ``data.split_seed`` and stratified by class, the same images at every
evaluation and for every seed of a configuration; ``record["utilization_on"]`` says how many of
how many). Retrieval ranks exactly what the metrics need (``dml.metrics.retrieval_metrics``):
max K neighbours, and R = class size - 1 for MAP@R, by a per-class rank count when R is large.
On a GPU the embeddings stay there and the ranking runs there too.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dml.runs import DEFAULT_RUNS_ROOT, EVAL_SPLITS, RunWriter, resolve_run

SPLITS = EVAL_SPLITS
# On the CPU a batch goes through the network in chunks of at most this many images, whose
# activations stay in the caches, and through a channels_last copy of the network, whose
# convolutions oneDNN runs faster (small-cnn, 28 px, one thread: 1,800 images/s in batches of
# 512, 8,000 so). Neither changes what is computed, only float rounding.
CPU_FORWARD_CHUNK = 64


@torch.no_grad()
def embed(model: nn.Module, split, transform, device: torch.device, batch_size: int = 512,
          index: torch.Tensor | None = None, keep_on_device: bool = False):
    """Embeddings (N, D) float32 of the images of a split, in order (only ``index``, in its
    order, when given), model in eval mode: a numpy array, or a tensor on ``device`` when
    ``keep_on_device``."""
    was = model.training
    model.eval()
    cpu = torch.device(device).type == "cpu"
    net = _cpu_inference_copy(model) if cpu else model
    n = len(split) if index is None else len(index)
    out = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        if index is not None:
            idx = index[idx]
        x = transform(split.load(idx)).to(device)
        if cpu:
            if net is not model and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            e = torch.cat([net(c) for c in x.split(CPU_FORWARD_CHUNK)]).float()
        else:
            e = net(x).float()
        out.append(e if keep_on_device else e.cpu())
    model.train(was)
    if keep_on_device:
        return torch.cat(out) if out else torch.zeros((0, 0), device=device)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _cpu_inference_copy(model: nn.Module) -> nn.Module:
    """A channels_last copy of a convolutional network in eval mode, for embedding on the CPU
    (see ``CPU_FORWARD_CHUNK``); the training model itself is never touched. Networks without
    4-D weights are used as they are."""
    if not any(p.dim() == 4 for p in model.parameters()):
        return model
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return net.eval()


def train_subsample(labels: torch.Tensor, max_images: int | None, seed: int = 0
                    ) -> torch.Tensor | None:
    """Sorted indices of a fixed, class-stratified random subsample of at most ``max_images``
    training images (each class keeps its share, rounded by largest remainder, at least one
    image per class while there is room), or None when all are used (``max_images`` None or
    not smaller than the split). The same for a given ``labels`` and ``seed``."""
    n = len(labels)
    if max_images is None or n <= max_images:
        return None
    classes, counts = torch.unique(labels, return_counts=True)
    from dml.stats import stratified_quota

    counts = counts.numpy().astype(np.int64)
    quota = stratified_quota(counts, max_images)
    rng = np.random.default_rng([seed, 0x7A3])
    keep = []
    lab = labels.numpy()
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = np.flatnonzero(lab == c)
        keep.append(rng.choice(members, size=min(q, len(members)), replace=False))
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def embed_splits(model: nn.Module, ds, transform, device: torch.device, batch_size: int = 512,
                 splits=SPLITS, train_index: torch.Tensor | None = None,
                 keep_on_device: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Embeddings and labels of the data set's ``splits`` that exist (of the training split,
    only the images ``train_index`` when given)."""
    emb, labels = {}, {}
    for k in splits:
        split = getattr(ds, k, None)
        if split is None:
            continue
        index = train_index if k == "train" else None
        emb[k] = embed(model, split, transform, device, batch_size, index=index,
                       keep_on_device=keep_on_device)
        y = split.labels if index is None else split.labels[index]
        labels[k] = y.numpy()
    return emb, labels


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def evaluate_embeddings(emb: dict[str, Any], labels: dict[str, np.ndarray], *,
                        clustering: bool = True, seed: int = 0,
                        ks=(1, 2, 4, 8)) -> dict[str, Any]:
    """The evaluation record of embedded splits (see the module doc): {"val": metrics,
    "test": metrics, "utilization": float} for the parts whose splits are given, and
    "test_nn_distance" (per test example, for utilization maps). Embeddings are numpy arrays or
    torch tensors (on a GPU the ranking runs there); ``ks``: the K of Recall@K."""
    from dml.metrics import (clustering_metrics, nearest_train_distances, retrieval_metrics,
                             split_retrieval_args)

    record: dict[str, Any] = {}
    if "val" in emb:
        record["val"] = retrieval_metrics(**split_retrieval_args(emb, labels, "val"), ks=ks)
    if "test" in emb:   # leave-one-out, or the queries against the gallery (In-Shop)
        record["test"] = retrieval_metrics(**split_retrieval_args(emb, labels, "test"), ks=ks)
        if clustering:
            record["test"].update(clustering_metrics(_numpy(emb["test"]), labels["test"],
                                                     seed=seed))
        if "train" in emb:
            nn_dist = nearest_train_distances(emb["test"], emb["train"])
            record["utilization"] = float(nn_dist.mean())
            record["test_nn_distance"] = nn_dist
    return record


def evaluate_epoch(cfg, ds, model, loss_fn, strategy, eval_tf, device, probe_idx, train_y,
                   writer: RunWriter, epoch: int) -> dict[str, Any]:
    """The trainer's evaluation: the record of ``evaluate_embeddings`` (on the training
    subsample of ``train.train_embed_max``), the synthetic points the strategy makes from the
    probe batch (and the utilization with them), and the epoch's npz as
    ``train.save_embeddings`` says."""
    from dml.config import recall_ks
    from dml.metrics import nearest_train_distances

    t = cfg.train
    train_index = train_subsample(ds.train.labels, t.train_embed_max, seed=cfg.data.split_seed)
    on_gpu = torch.device(device).type == "cuda"
    emb, labels = embed_splits(model, ds, eval_tf, device, t.eval_batch_size,
                               train_index=train_index, keep_on_device=on_gpu)
    record = {"epoch": epoch, **evaluate_embeddings(emb, labels, clustering=t.clustering,
                                                   seed=t.seed, ks=recall_ks(cfg))}
    if "train" in emb:
        record["utilization_on"] = {"train_images": len(labels["train"]), "of": len(ds.train)}
    nn_dist = record.pop("test_nn_distance", None)
    emb = {k: _numpy(e) for k, e in emb.items()}
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
        arrays["probe_labels"] = ds.train.labels[probe_idx].numpy().astype(np.int64)
    if t.save_embeddings != "none":
        for k, e in emb.items():
            arrays[f"{k}_embeddings"] = e.astype(np.float16)
            arrays[f"{k}_labels"] = labels[k].astype(np.int64)
        if train_index is not None and "train" in emb:   # which training images these are
            arrays["train_index"] = train_index.numpy().astype(np.int64)
        if nn_dist is not None:
            arrays["test_nn_distance"] = nn_dist.astype(np.float32)
    if arrays:
        writer.save_eval(epoch, **arrays)
    if t.save_embeddings == "best+last":
        prune_evals(writer, epoch, record, t.select_metric)
    return record


def prune_evals(writer: RunWriter, epoch: int, record: dict[str, Any], metric: str) -> list[int]:
    """``train.save_embeddings="best+last"``: delete the evaluation files (and their cached
    maps) of every epoch but this one (the last) and the best one, decided as the trainer
    decides (``dml.train.is_better`` against the best recorded in status.json). Returns the
    epochs deleted."""
    from dml.train import is_better

    try:
        best = json.loads((writer.path / "status.json").read_text(encoding="utf-8")).get("best")
    except (OSError, ValueError, AttributeError):
        best = None
    keep = {epoch}
    if isinstance(best, dict) and not is_better(record, best, metric) \
            and best.get("epoch") is not None:
        keep.add(int(best["epoch"]))
    run = writer.run
    gone = [e for e in run.eval_epochs() if e not in keep]
    for e in gone:
        for f in run.eval_path(e).parent.glob(f"epoch_{e:04d}.*npz"):
            f.unlink(missing_ok=True)
    return gone


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
    the reference a trained model has to beat. The run's own data set is rebuilt with the
    splits it was trained on (its split version); utilization uses the run's training
    subsample (``train.train_embed_max``; all training images for runs from before it).
    """
    from dml.checkpoints import load_checkpoint, resolve_device
    from dml.data.registry import canonical_name, dataset_for_config, recall_at
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
    d, tr = cfg["data"], cfg["train"]
    ds = dataset_for_config(d, name=dataset, root=data_root,
                            image_size=info["model"]["image_size"])
    if ds.channels != info["model"]["in_channels"]:
        raise ValueError(f"data set {ds.name!r} has {ds.channels} channel(s), the model expects "
                         f"{info['model']['in_channels']}")
    own = dataset is None or canonical_name(dataset) == canonical_name(d["name"])
    ks = tuple(sorted(recall_at(ds.name, tr.get("recall_at") if own else None)))
    train_index = train_subsample(ds.train.labels, tr.get("train_embed_max"),
                                  seed=d.get("split_seed", 0))
    emb, labels = embed_splits(model, ds, make_transform(ds, train=False), dev,
                               tr["eval_batch_size"], train_index=train_index,
                               keep_on_device=dev.type == "cuda")
    record = evaluate_embeddings(emb, labels, seed=tr["seed"], ks=ks)
    out = {"test": {**record["test"], "utilization": record["utilization"]}}
    if "val" in record:
        out["val"] = record["val"]
    return {"run": run.id, "checkpoint": tag, "epoch": info["epoch"], "dataset": ds.name,
            "metrics": out}
