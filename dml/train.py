"""The training loop: sample P x K batches, let the mixing strategy build the loss, step,
evaluate every N epochs, keep the checkpoint that is best on validation, write everything to the
run directory. ``train(config)`` reads top to bottom; helpers below it are small and pure-ish.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import traceback as tb
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from dml.config import ConfigError, RunConfig, batch_shape, resolve_versions, validate
from dml.runs import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, DEFAULT_RUNS_ROOT, Run,
                      RunFormatError, RunWriter, atomic_write_bytes, atomic_write_json,
                      open_run, read_json)


def train(cfg: RunConfig, runs_root: str | os.PathLike = DEFAULT_RUNS_ROOT, *,
          resume: str | os.PathLike | None = None, progress: bool = True,
          on_progress: Callable[[dict[str, Any]], None] | None = None,
          run_id: str | None = None) -> Path:
    """Train one run and return its directory. With ``resume`` continue that run instead.

    ``on_progress`` receives {"epoch", "epochs", "step", "steps", "loss"} after every step (the
    app uses it for its progress bar); "loss" is read from the device every ``LOG_EVERY`` steps
    and at the end of each epoch, and is the last value read in between.
    """
    if resume is not None:
        run = open_run(resume)
        saved = run.config()
        for section in ("loss", "mixing"):   # runs from before versioning: version 1
            if isinstance(saved.get(section), dict):
                saved[section].setdefault("version", 1)
        cfg = RunConfig.from_dict(saved)
    check_config(cfg)             # names, ranges, every parameter: before any data is loaded
    cfg = resolve_versions(cfg)
    t = cfg.train
    device = resolve_device(t.device)
    seed_everything(t.seed, t.deterministic)
    if t.threads:
        torch.set_num_threads(t.threads)

    # ---- data, model, loss, strategy (every name is checked here, before any file is written)
    from dml.data import load_dataset
    from dml.data.sampler import BalancedBatchSampler, RandomBatchSampler
    from dml.data.transforms import make_transform
    from dml.losses import build_loss
    from dml.mixing import build_mixing
    from dml.models import build_model

    ds = load_dataset(cfg.data.name, cfg.data.root, image_size=cfg.data.image_size,
                      val_classes=cfg.data.val_classes, split=cfg.data.split,
                      seed=cfg.data.split_seed)
    train_classes = ds.train.classes()
    train_y = torch.searchsorted(train_classes, ds.train.labels)   # contiguous 0..C-1
    model = build_model(cfg.model.name, ds.channels, ds.image_size, cfg.model.embedding_dim,
                        **_model_params(cfg)).to(device)
    loss_fn = build_loss(cfg.loss.name, num_classes=len(train_classes),
                         embedding_dim=cfg.model.embedding_dim, **cfg.loss.params).to(device)
    strategy = build_mixing(cfg.mixing.name, loss_fn, **cfg.mixing.params)   # wraps the loss
    P, K = batch_shape(cfg.data, len(train_classes))
    if cfg.data.sampler == "random":
        sampler = RandomBatchSampler(train_y, cfg.data.batch_size or P * K,
                                     num_batches=t.iterations_per_epoch, seed=t.seed)
    else:
        sampler = BalancedBatchSampler(train_y, P, K, num_batches=t.iterations_per_epoch,
                                       seed=t.seed)
    train_tf = make_transform(ds, train=True, kind=cfg.data.augment)
    eval_tf = make_transform(ds, train=False)
    optimizer = make_optimizer(t, model, loss_fn, strategy)
    steps_per_epoch = len(sampler)
    total_steps = t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, steps_per_epoch))
    probe_idx = probe_indices(train_y, P, K, seed=t.seed)

    # ---- run directory (new, or the one being resumed)
    start_epoch, step, best = 1, 0, None
    if resume is not None:
        writer = RunWriter.resume(run)
        state = load_training_state(run, model, loss_fn, strategy, optimizer, scheduler)
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best")
        writer.truncate_metrics(state["epoch"])
        if start_epoch > t.epochs:
            writer.set_status("finished", best=best)
            return writer.path
    else:
        writer = RunWriter.create(runs_root, cfg.to_dict(), run_id=run_id)
    if ds.class_names and not (writer.path / "classes.json").is_file():
        writer.write_class_names(ds.class_names)
    model_meta = {"name": cfg.model.name, "in_channels": ds.channels,
                  "image_size": ds.image_size, "embedding_dim": cfg.model.embedding_dim,
                  "params": _model_params(cfg)}

    bar = _progress_bar(total_steps, step, progress, writer.path.name)
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, t.epochs + 1):
            model.train(), loss_fn.train(), strategy.train()
            set_backbone_trainable(model, epoch > t.freeze_backbone_epochs)
            sampler.set_epoch(epoch)
            sums: dict[str, Any] = {}            # loss terms summed on the device, read per epoch
            last_loss = math.nan
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            for i, idx in enumerate(sampler, start=1):
                x = train_tf(ds.train.load(idx)).to(device, non_blocking=True)
                y = train_y[idx].to(device)
                if strategy.needs_model:          # Metrix on the images or a feature map
                    loss = strategy(model, x, y)
                else:
                    emb = model(x)                # (B, D) L2-normalised embeddings
                    loss = strategy(emb, y)       # the loss, with the strategy's mixing
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(_all_params(optimizer), t.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                for k, v in strategy.last_terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                nonfinite |= ~torch.isfinite(loss.detach())
                bar.update(1)
                if i % LOG_EVERY == 0 or i == steps_per_epoch:   # the only host reads
                    if bool(nonfinite):
                        raise FloatingPointError(
                            f"the loss became non-finite in epoch {epoch}, between steps "
                            f"{step - (i - 1) % LOG_EVERY - 1} and {step}; lower train.lr "
                            f"(now {t.lr}) or enable train.grad_clip")
                    last_loss = float(loss.detach())
                    bar.set_postfix(epoch=epoch, loss=f"{last_loss:.4f}", refresh=False)
                prog = {"epoch": epoch, "epochs": t.epochs, "step": step, "steps": total_steps,
                        "loss": last_loss}        # the loss as last read
                writer.set_status("running", progress=prog, min_interval=2.0)
                if on_progress is not None:
                    on_progress(prog)
            train_terms = {k: float(v) / max(steps_per_epoch, 1) for k, v in sums.items()}

            if epoch % t.eval_every == 0 or epoch == t.epochs:
                record = evaluate_epoch(cfg, ds, model, loss_fn, strategy, eval_tf, device,
                                        probe_idx, train_y, writer, epoch)
                record.update(step=step, lr=scheduler.get_last_lr()[0], train=train_terms,
                              elapsed_s=round(time.time() - writer._t0, 2))
                writer.append_metrics(record)
                if is_better(record, best, t.select_metric):
                    best = {"epoch": epoch, "selected_on": _selected_on(record, t.select_metric),
                            "val": record.get("val", {}), "test": record.get("test", {}),
                            "utilization": record.get("utilization")}
                    save_checkpoint(writer.run, "best", model, model_meta, cfg, epoch, step,
                                    best)
            save_checkpoint(writer.run, "last", model, model_meta, cfg, epoch, step, best)
            save_training_state(writer.run, loss_fn, strategy, optimizer, scheduler, epoch,
                                step, best)
            writer.set_status("running", progress={"epoch": epoch, "epochs": t.epochs,
                                                   "step": step, "steps": total_steps},
                              best=best)
    except KeyboardInterrupt:
        bar.close()
        writer.set_status("interrupted", error=f"interrupted during epoch {epoch}; the last "
                          f"complete epoch is kept. Resume with `dml train --resume "
                          f"{writer.path}`", best=best)
        raise
    except BaseException as exc:
        bar.close()
        writer.set_status("failed", error=f"{type(exc).__name__}: {exc}",
                          traceback=tb.format_exc(), best=best)
        raise
    bar.close()
    final = {"epoch": t.epochs, "epochs": t.epochs, "step": step, "steps": total_steps}
    if t.projections != "none" and t.save_embeddings:
        writer.set_status("running", progress=dict(final, phase="projections"), best=best)
        final["projections"] = cache_projections(writer.path, t.projections, t.seed, progress)
    writer.set_status("finished", progress=final, best=best)
    return writer.path


def check_config(cfg: RunConfig) -> None:
    """Everything that needs no data, before the data set is loaded: the names, the value
    ranges, and every loss, model and mixing parameter (by building them on a stand-in of the
    data: 10 classes, 3 channels)."""
    from dml.data import dataset_names
    from dml.losses import build_loss, loss_names
    from dml.mixing import build_mixing, mixing_names
    from dml.models import build_model, model_names

    for what, value, valid in (("dataset", cfg.data.name, dataset_names()),
                               ("loss", cfg.loss.name, loss_names()),
                               ("mixing", cfg.mixing.name, mixing_names()),
                               ("model", cfg.model.name, model_names())):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    validate(cfg)
    try:
        loss = build_loss(cfg.loss.name, num_classes=10, embedding_dim=cfg.model.embedding_dim,
                          **cfg.loss.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.params: {exc}") from None
    try:
        build_mixing(cfg.mixing.name, loss, **cfg.mixing.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"mixing.params: {exc}") from None
    params = dict(cfg.model.params)          # no ImageNet weights are fetched for a check
    try:
        build_model(cfg.model.name, 3, cfg.data.image_size or 32, cfg.model.embedding_dim,
                    **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.params: {exc}") from None


LOG_EVERY = 20   # steps between reads of the loss to the host (progress, finiteness check)


def cache_projections(run_dir: Path, epochs: str, seed: int, verbose: bool) -> str:
    """2-D maps (PCA, UMAP) of the chosen evaluations, cached in the run for the app. Never
    fails the run: without umap-learn (the ``app`` extra) or on an error, says why and goes on."""
    try:
        from dml.projection import precompute_projections
        log = (lambda m: print(f"projections: {m}", file=sys.stderr)) if verbose else None
        precompute_projections(run_dir, epochs, seed=seed, progress=log)
        return "cached"
    except ImportError as exc:
        msg = f"not cached ({exc}); install the app extra: pip install -e '.[app]'"
    except Exception as exc:  # a map is a convenience; the trained run is what matters
        msg = f"not cached ({type(exc).__name__}: {exc})"
    if verbose:
        print(f"projections: {msg}", file=sys.stderr)
    return msg


# --------------------------------------------------------------------------- evaluation

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


def evaluate_epoch(cfg: RunConfig, ds, model, loss_fn, strategy, eval_tf, device, probe_idx,
                   train_y, writer: RunWriter, epoch: int) -> dict[str, Any]:
    """Metrics of one evaluation (val, test, utilization) and its npz of embeddings."""
    from dml.metrics import clustering_metrics, nearest_train_distances, retrieval_metrics

    t = cfg.train
    bs = t.eval_batch_size
    emb = {"train": embed(model, ds.train, eval_tf, device, bs),
           "test": embed(model, ds.test, eval_tf, device, bs)}
    if ds.val is not None:
        emb["val"] = embed(model, ds.val, eval_tf, device, bs)
    if ds.gallery is not None:
        emb["gallery"] = embed(model, ds.gallery, eval_tf, device, bs)
    labels = {k: getattr(ds, k).labels.numpy() for k in emb}

    record: dict[str, Any] = {"epoch": epoch}
    if "val" in emb:
        record["val"] = retrieval_metrics(emb["val"], labels["val"])
    if "gallery" in emb:
        record["test"] = retrieval_metrics(emb["gallery"], labels["gallery"],
                                           query_embeddings=emb["test"],
                                           query_labels=labels["test"])
    else:
        record["test"] = retrieval_metrics(emb["test"], labels["test"])
    if t.clustering:
        record["test"].update(clustering_metrics(emb["test"], labels["test"], seed=t.seed))
    nn_dist = nearest_train_distances(emb["test"], emb["train"])
    record["utilization"] = float(nn_dist.mean())

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


def is_better(record: dict, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    if "val" not in record:          # no validation split: keep the latest
        return True
    return record["val"][metric] > best["val"].get(metric, -math.inf)


def _selected_on(record: dict, metric: str) -> str:
    return f"val {metric}" if "val" in record else "last epoch (no validation split)"


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(run: Run, tag: str, model: nn.Module, model_meta: dict, cfg: RunConfig,
                    epoch: int, step: int, best: dict | None) -> None:
    """Weights as safetensors (never a pickle) plus a JSON side file naming the architecture."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    atomic_write_bytes(run.checkpoint_path(tag), data)
    import hashlib
    atomic_write_json(run.path / "checkpoints" / f"{tag}.json", {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tag": tag,
        "epoch": epoch, "step": step, "model": model_meta, "config": cfg.to_dict(),
        "best": best, "sha256": hashlib.sha256(data).hexdigest()})


class CheckpointError(ValueError):
    """A checkpoint that is not Tango's, is corrupt, or does not fit its architecture."""


def load_checkpoint(weights: str | os.PathLike, meta: str | os.PathLike | dict | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from ``X.safetensors`` and its side file ``X.json`` (or ``meta``).

    Only safetensors are read: nothing is unpickled, no code runs. Everything else raises
    CheckpointError with what was wrong.
    """
    from safetensors.torch import load as st_load

    from dml.models import build_model

    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {str(weights)!r} does not exist")
    raw = weights.read_bytes()
    if raw[:2] == b"\x80\x02" or raw[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{weights} is a pickle/zip (torch.save) file; Tango only opens "
                              f"safetensors checkpoints and never unpickles files")
    if isinstance(meta, dict):
        info = meta
    else:
        meta_path = Path(meta) if meta is not None else weights.with_suffix(".json")
        if not meta_path.is_file():
            raise CheckpointError(f"{weights} has no side file {meta_path.name} naming its "
                                  f"architecture; it is not a Tango checkpoint")
        try:
            info = read_json(meta_path)
        except ValueError as exc:
            raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{weights}: side file is not a {CHECKPOINT_FORMAT!r} file; it is "
                              f"not a Tango checkpoint")
    if info.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{weights}: checkpoint format version {info.get('version')!r}, "
                              f"this Tango reads {CHECKPOINT_VERSION}")
    if info.get("sha256"):
        import hashlib
        if hashlib.sha256(raw).hexdigest() != info["sha256"]:
            raise CheckpointError(f"{weights} does not match the checksum in its side file: "
                                  f"the file is corrupt or was replaced")
    try:
        state = st_load(raw)
    except Exception as exc:  # SafetensorError, or a header that is not JSON
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from exc
    m = info["model"]
    try:
        model = build_model(m["name"], m["in_channels"], m["image_size"], m["embedding_dim"],
                            **m.get("params", {}))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{weights} does not fit the architecture in its side file "
                              f"({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), info


# --------------------------------------------------------------------------- resume state

def save_training_state(run: Run, loss_fn, strategy, optimizer, scheduler, epoch: int,
                        step: int, best: dict | None) -> None:
    """Optimizer, loss (proxies), strategy and RNG state after ``epoch``, to resume from."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in (("loss", loss_fn), ("strategy", strategy)):
        for k, v in _own_state(mod).items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(run.path / "checkpoints" / "last_state.safetensors", save(tensors))
    atomic_write_json(run.path / "checkpoints" / "last_state.json", {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
        "step": step, "best": best, "param_groups": opt["param_groups"],
        "optim_scalars": scalars, "scheduler": scheduler.state_dict()})


def load_training_state(run: Run, model, loss_fn, strategy, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    ck = run.path / "checkpoints"
    if not (ck / "last_state.json").is_file() or not run.checkpoint_path("last").is_file():
        raise RunFormatError(f"run {run.path} has no complete epoch to resume from "
                             f"(checkpoints/last_state.json is missing); start a new run")
    meta = read_json(ck / "last_state.json")
    model_state, _ = load_checkpoint(run.checkpoint_path("last"))
    model.load_state_dict(model_state.state_dict())
    tensors = load_file(ck / "last_state.safetensors")
    for prefix, mod in (("loss", loss_fn), ("strategy", strategy)):
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing, unexpected = mod.load_state_dict(sd, strict=False)
        own_missing = [k for k in missing if k in _own_state(mod)]
        if own_missing or unexpected:
            raise RunFormatError(f"run {run.path}: the saved {prefix} state does not fit "
                                 f"(missing {own_missing[:3]}, unexpected {unexpected[:3]})")
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# --------------------------------------------------------------------------- small helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use 'cpu' "
                         f"or 'auto'")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Train the stages (the backbone) or only the embedding head: the official ``--warm``
    epochs of Metrix and Proxy Synthesis train the new layers (and the loss's proxies) first.
    BatchNorm layers whose affine parameters ``bn_freeze`` froze stay frozen."""
    stages = getattr(model, "stages", None)
    if stages is None:
        return
    for p in stages.parameters():
        p.requires_grad_(trainable)
    if getattr(model, "bn_freeze", False) == "all":
        for bn in model.frozen_batchnorms():
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)


def make_optimizer(t, model: nn.Module, loss_fn: nn.Module, strategy: nn.Module):
    groups = [{"params": list(model.parameters()), "lr": t.lr}]
    loss_params = list(loss_fn.parameters())
    if loss_params:  # proxies learn faster, as in the proxy-loss papers
        groups.append({"params": loss_params, "lr": t.lr * t.proxy_lr_mult, "weight_decay": 0.0})
    own = {id(p) for p in loss_params}
    strat_params = [p for p in strategy.parameters() if id(p) not in own]   # not the wrapped loss
    if strat_params:
        groups.append({"params": strat_params, "lr": t.lr})
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps)


def lr_lambda(t, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``t.warmup_iterations`` steps, then
    cosine decay to 0 over the run, constant, or ``"step"``: ``lr_gamma ** (e // lr_step_epochs)``
    in (0-based) epoch e, e counted up to ``lr_step_stop`` (torch ``StepLR`` stepped per epoch,
    as the official Metrix and Proxy Synthesis code)."""
    warmup, total = t.warmup_iterations, t.epochs * steps_per_epoch

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "step":
            epoch = step // max(steps_per_epoch, 1)
            if t.lr_step_stop is not None:
                epoch = min(epoch, t.lr_step_stop)
            return t.lr_gamma ** (epoch // t.lr_step_epochs)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state without the loss a strategy wraps (saved as the loss's own state)."""
    return {k: v for k, v in module.state_dict().items()
            if not (k.startswith("loss.") and hasattr(module, "bound"))}


def _all_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _model_params(cfg: RunConfig) -> dict[str, Any]:
    params = dict(cfg.model.params)
    if cfg.model.pretrained:
        params["pretrained"] = True
    return params


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc[-40:],
                unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
