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
from dml import distributed, precision
from dml.checkpoints import (load_training_state, resolve_device, rng_states, save_checkpoint,
                             save_training_state)
from dml.evaluation import evaluate_epoch, probe_indices
from dml.runs import DEFAULT_RUNS_ROOT, RunWriter, open_run


def train(cfg: RunConfig, runs_root: str | os.PathLike = DEFAULT_RUNS_ROOT, *,
          progress: bool = True, on_progress: Callable[[dict[str, Any]], None] | None = None,
          run_id: str | None = None) -> Path:
    """Train a new run of ``cfg`` under ``runs_root`` and return its directory.

    ``on_progress`` receives {"epoch", "epochs", "step", "steps", "loss"} after every step (the
    app uses it for its progress bar); "loss" is read from the device every ``LOG_EVERY`` steps
    and at the end of each epoch, and is the last value read in between.
    """
    return _train(cfg, runs_root, None, progress, on_progress, run_id)


def resume(run_dir: str | os.PathLike, *, progress: bool = True,
           on_progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Continue an interrupted run from its last complete epoch, with its own config."""
    run = open_run(run_dir)
    saved = run.config()
    for section in ("loss", "mixing"):   # runs from before method versions: version 1
        if isinstance(saved.get(section), dict):
            saved[section].setdefault("version", 1)
    if isinstance(saved.get("data"), dict):   # runs from before split versions: the old split
        saved["data"].setdefault("split_version", 1)
    return _train(RunConfig.from_dict(saved), run.path.parent, run, progress, on_progress, None)


def _train(cfg: RunConfig, runs_root, run, progress, on_progress, run_id) -> Path:
    """The loop, for a new run (``run`` None) or the continuation of ``run``; one process, or
    one rank of a ``torchrun`` job (see :mod:`dml.distributed`)."""
    check_config(cfg)             # names, ranges, every parameter: before any data is loaded
    cfg = resolve_versions(cfg)
    dctx = distributed.from_env()
    device = distributed.device_for(dctx, resolve_device(cfg.train.device))
    distributed.setup(dctx, device)
    try:
        path = _train_on(cfg, runs_root, run, progress, on_progress, run_id, dctx, device)
    except BaseException:
        distributed.teardown(dctx)
        raise
    distributed.teardown(dctx, finished=True)
    return path


def _train_on(cfg: RunConfig, runs_root, run, progress, on_progress, run_id,
              dctx: distributed.Context, device: torch.device) -> Path:
    t = cfg.train
    main = dctx.is_main           # rank 0 writes the run and evaluates; the others train
    seed_everything(t.seed, t.deterministic)
    torch.set_num_threads(t.threads or distributed.default_threads(dctx))
    precision.enable_tf32(device, t.deterministic)

    # ---- data, model, loss, strategy (every name is checked here, before any file is written)
    from dml.data.loader import train_batches
    from dml.data.registry import dataset_for_config
    from dml.data.sampler import BalancedBatchSampler, RandomBatchSampler
    from dml.data.transforms import make_transform
    from dml.losses import build_loss
    from dml.maps import SUPPORTED as maps_in_background
    from dml.mixing import build_mixing
    from dml.models import build_model

    ds = dataset_for_config(cfg.data)   # its split version too
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
    if dctx.active:
        _check_distributable(cfg, strategy, P * K, dctx)
        model = distributed.sync_batchnorm(model, device)
        sampler = distributed.RankShare(sampler, dctx)
    net = precision.for_training(model, t.precision, device)   # autocast; fp32 embeddings
    scaler = precision.grad_scaler(t.precision, device)
    train_tf = make_transform(ds, train=True, kind=cfg.data.augment)
    eval_tf = make_transform(ds, train=False)
    optimizer = make_optimizer(t, model, loss_fn, strategy)
    steps_per_epoch = len(sampler)
    total_steps = t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, steps_per_epoch))
    probe_idx = probe_indices(train_y, P, K, seed=t.seed)
    train_y_dev = train_y.to(device)              # labels indexed on the device, no host sync

    # ---- run directory (new, or the one being resumed): rank 0's
    start_epoch, step, best = 1, 0, None
    writer: Any = _NoWriter()
    if run is not None:
        failure = None
        if main:
            writer = RunWriter.resume(run)    # one writer per run: refused while another runs
            try:
                state = load_training_state(run, model, loss_fn, strategy, optimizer,
                                            scheduler, device=device)
            except BaseException as exc:
                writer.close()
                failure = exc
        if distributed.broadcast(dctx, None if failure is None else str(failure)) is not None:
            if failure is not None:
                raise failure
            raise RuntimeError("rank 0 could not resume the run; see its error")
        if not main:                          # after rank 0 settled the run's files
            state = load_training_state(run, model, loss_fn, strategy, optimizer, scheduler,
                                        rank=dctx.rank, device=device, readonly=True)
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best")
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        run_path = run.path
    else:
        if main:
            writer = RunWriter.create(runs_root, cfg.to_dict(), run_id=run_id)
        run_path = Path(distributed.broadcast(dctx, str(writer.path) if main else None))
    step_fn = _step_fn(model, net, loss_fn, strategy, dctx, device)
    bar = _progress_bar(total_steps, step, progress and main, run_path.name)
    epoch = start_epoch - 1
    try:
        if start_epoch > 1:
            writer.truncate_metrics(start_epoch - 1)   # records of an epoch that was redone
        if ds.class_names and not (run_path / "classes.json").is_file():
            writer.write_class_names(ds.class_names)
        model_meta = {"name": cfg.model.name, "in_channels": ds.channels,
                      "image_size": ds.image_size, "embedding_dim": cfg.model.embedding_dim,
                      "params": _model_params(cfg)}
        augment: dict[str, Callable] = {}             # this epoch's training transform
        with _sigterm_as_interrupt(), train_batches(
                ds.train, sampler, lambda images: augment["now"](images), device,
                t.workers) as batches:               # worker processes decode image files
            for epoch in range(start_epoch, t.epochs + 1):
                model.train(), loss_fn.train(), strategy.train()
                set_backbone_trainable(model, epoch > t.freeze_backbone_epochs)
                sampler.set_epoch(epoch)
                augment["now"] = _augmentation(train_tf, dctx, t.seed, epoch)
                sums: dict[str, Any] = {}    # loss terms summed on the device, read per epoch
                last_loss = math.nan
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)
                clock = _EpochClock()
                for i, (idx, x) in enumerate(clock.batches(batches), start=1):
                    y = train_y_dev[idx.to(device, non_blocking=True)]
                    clock.ready(len(idx))
                    loss = step_fn(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if t.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(_all_params(optimizer), t.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
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
                speed = clock.summary(dctx.world)    # after the host read above: synced

                if main and (epoch % t.eval_every == 0 or epoch == t.epochs):
                    record = evaluate_epoch(cfg, ds, model, loss_fn, strategy, eval_tf, device,
                                            probe_idx, train_y, writer, epoch)
                    record.update(step=step, lr=scheduler.get_last_lr()[0], train=train_terms,
                                  speed=speed, elapsed_s=round(time.time() - writer._t0, 2))
                    writer.append_metrics(record)
                    if is_better(record, best, t.select_metric):
                        best = {"epoch": epoch,
                                "selected_on": _selected_on(record, t.select_metric),
                                "val": record.get("val", {}), "test": record.get("test", {}),
                                "utilization": record.get("utilization")}
                        save_checkpoint(writer.run, "best", model, model_meta, cfg, epoch, step,
                                        best)
                # generator states, read once: this process's under plain keys (what a
                # one-process resume reads) and, of a multi-process run, every rank's
                rng = rng_states(device)
                if dctx.active:
                    for r, states in enumerate(distributed.gather_objects(dctx, rng)):
                        rng.update({f"rank{r}.{k}": v for k, v in states.items()})
                if main:
                    save_training_state(writer.run, model, model_meta, cfg, loss_fn, strategy,
                                        optimizer, scheduler, epoch, step, best,   # one unit
                                        rng=rng,
                                        scaler=scaler.state_dict() if scaler.is_enabled()
                                        else None, world_size=dctx.world)
                writer.set_status("running", progress={"epoch": epoch, "epochs": t.epochs,
                                                       "step": step, "steps": total_steps},
                                  best=best)
            final = {"epoch": t.epochs, "epochs": t.epochs, "step": step, "steps": total_steps}
            if dctx.active:
                final["processes"] = dctx.world
            bar.close()
        # the loader's worker processes are gone; the maps (also after a resume) follow
        maps = main and t.projections != "none" and t.save_embeddings != "none"
        if maps and (t.map_mode == "inline" or not maps_in_background):   # (no flock here)
            writer.set_status("running", progress=dict(final, phase="projections"), best=best)
            final["projections"] = cache_projections(writer.path, t.projections, t.seed,
                                                     progress)
        elif maps:
            final["projections"] = "background"     # see dml.maps; started below
        writer.set_status("finished", progress=final, best=best)
    except KeyboardInterrupt as exc:
        bar.close()
        what = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        where = (f"during epoch {epoch}" if epoch < t.epochs or step < total_steps
                 else "while caching the maps")
        if main:
            writer.set_status("interrupted",
                              error=f"{what} {where}; {writer.run.resume_hint()}", best=best)
        raise
    except BaseException as exc:
        bar.close()
        writer.set_status("failed", error=f"{type(exc).__name__}: {exc}",
                          traceback=tb.format_exc(), best=best)
        raise
    finally:
        writer.close()                    # the run's lock is released on every way out
    if final.get("projections") == "background":
        background_maps(run_path, t.projections, t.seed, progress)
    return run_path


def _step_fn(model, net, loss_fn, strategy, dctx, device) -> Callable:
    """``step_fn(images, labels)``: the training loss of a batch. One process: the strategy
    on the network's embeddings (or on the network, for Metrix inside it). Several: the
    embeddings of the global batch (:mod:`dml.distributed`), through DDP, whose wrapper is
    rebuilt when the trainable parameters change (frozen-backbone epochs)."""
    if not dctx.active:
        if strategy.needs_model:                  # Metrix on the images or a feature map
            return lambda x, y: strategy(net, x, y)
        return lambda x, y: strategy(net(x), y)   # embeddings (B, D), the strategy's loss
    module = distributed.StepModule(model, loss_fn, strategy, dctx, embed=net)
    held: dict[str, Any] = {"trainable": None, "ddp": None}

    def step(x, y):
        trainable = tuple(p.requires_grad for p in module.parameters())
        if trainable != held["trainable"]:
            held["trainable"], held["ddp"] = trainable, distributed.wrap(module, device)
        return held["ddp"](x, y)
    return step


def _check_distributable(cfg: RunConfig, strategy, batch: int,
                         dctx: distributed.Context) -> None:
    if strategy.needs_model:
        raise ConfigError(f"mixing {cfg.mixing.name!r} mixes inside the network, which is not "
                          f"supported with more than one process yet; train it with one "
                          f"process (or use metrix-embed)")
    size = cfg.data.batch_size or batch if cfg.data.sampler == "random" else batch
    if size % dctx.world:
        raise ConfigError(f"the global batch of {size} images cannot be shared equally by "
                          f"{dctx.world} processes; choose data.classes_per_batch x "
                          f"data.samples_per_class (or data.batch_size) divisible by "
                          f"{dctx.world}")


def _augmentation(train_tf, dctx: distributed.Context, seed: int, epoch: int) -> Callable:
    """The training transform. One process: from torch's generator, as always. Several: each
    rank from its own generator, seeded by (seed, rank, epoch), so ranks never draw the same
    random crops (and a resume at an epoch boundary draws them again exactly)."""
    if not dctx.active:
        return train_tf
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
        [seed, dctx.rank, epoch, 0xA06]).generate_state(1)[0]))
    return lambda x: train_tf(x, generator=gen)


class _EpochClock:
    """Where an epoch's time goes: ``data_wait_s``, the host waiting for the next batch (reading,
    decoding, the copy and augmentation being queued), against the epoch's training time; and
    the images per second of the global batch. Read once per epoch, after the epoch's loss terms
    were copied to the host (so the device's queued work is included)."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def batches(self, batches):
        for item in batches:
            yield item
            self.mark = time.perf_counter()      # the step is done; the next fetch starts

    def ready(self, n: int) -> None:
        self.wait += time.perf_counter() - self.mark
        self.images += n

    def summary(self, world: int = 1) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {"train_s": round(seconds, 3),
                "images_per_s": round(self.images * world / seconds, 1),
                "data_wait_share": round(self.wait / seconds, 4)}


class _NoWriter:
    """Ranks other than 0 write nothing: the run's writer calls are no-ops there."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


class Terminated(KeyboardInterrupt):
    """SIGTERM received while training: handled as an interruption (status, kept epochs)."""


class _sigterm_as_interrupt:
    """While training in the main thread, SIGTERM raises :class:`Terminated` (so the run is
    marked interrupted and can be resumed) instead of ending the process silently."""

    def __enter__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise Terminated()
            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def check_config(cfg: RunConfig) -> None:
    """Everything that needs no data, before the data set is loaded: the names, the value
    ranges, and every loss, model and mixing parameter (by building them on a stand-in of the
    data: 10 classes, 3 channels)."""
    from dml.data import list_datasets
    from dml.losses import build_loss, list_losses
    from dml.mixing import build_mixing, list_mixings
    from dml.models import build_model, list_models

    for what, value, valid in (("dataset", cfg.data.name, list_datasets()),
                               ("loss", cfg.loss.name, list_losses()),
                               ("mixing", cfg.mixing.name, list_mixings()),
                               ("model", cfg.model.name, list_models())):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    validate(cfg)
    from dml.losses import LOSSES

    if cfg.data.sampler == "balanced" and cfg.data.samples_per_class == 1 \
            and not getattr(LOSSES.get(cfg.loss.name), "uses_proxies", False):
        raise ConfigError(f"data.samples_per_class=1: loss {cfg.loss.name!r} compares pairs of "
                          f"images of one class, and batches of one image per class have none "
                          f"(the loss would be 0 and nothing would train); use >= 2, or a proxy "
                          f"loss")
    try:
        loss = build_loss(cfg.loss.name, num_classes=10, embedding_dim=cfg.model.embedding_dim,
                          **cfg.loss.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.params: {exc}") from None
    try:
        build_mixing(cfg.mixing.name, loss, **cfg.mixing.params)
    except (TypeError, ValueError) as exc:
        where = "mixing" if "does not support loss" in str(exc) else "mixing.params"
        raise ConfigError(f"{where}: {exc}") from None
    params = dict(cfg.model.params)          # no ImageNet weights are fetched for a check
    try:
        build_model(cfg.model.name, 3, cfg.data.image_size or 32, cfg.model.embedding_dim,
                    **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.params: {exc}") from None


LOG_EVERY = 20   # steps between reads of the loss to the host (progress, finiteness check)


def background_maps(run_dir: Path, epochs: str, seed: int, verbose: bool) -> None:
    """Queue a finished run's maps for the background map process (:mod:`dml.maps`). Never
    fails the run: says why when the process cannot be started (the app then computes a map
    when it is opened)."""
    from dml.maps import LOG_FILE, STATUS_FILE, enqueue

    try:
        st = enqueue(run_dir, epochs, seed)
    except Exception as exc:
        msg = (f"not started ({type(exc).__name__}: {exc}); make them with "
               f"`python -m dml.projection {run_dir}`")
    else:
        msg = (f"{len(st['todo'])} map(s) computing in the background "
               f"(progress in {run_dir / STATUS_FILE}, log {run_dir / LOG_FILE}); the app "
               f"shows them as they arrive") if st["todo"] else "all cached already"
    if verbose:
        print(f"projections: {msg}", file=sys.stderr)


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


# --------------------------------------------------------------------------- small helpers

def is_better(record: dict, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    if "val" not in record:          # no validation split: keep the latest
        return True
    return record["val"][metric] > best["val"].get(metric, -math.inf)


def _selected_on(record: dict, metric: str) -> str:
    return f"val {metric}" if "val" in record else "last epoch (no validation split)"



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
