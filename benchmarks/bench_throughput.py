"""Throughput of the real training loop against the bare forward + backward of the same model.

For one data set and one P x K batch shape, this times:

* ``bare forward+backward``: the model alone on one fixed batch already in memory: forward,
  a trivial scalar (the sum of the embeddings), backward and the optimizer step. Nothing else.
* ``data only``: the trainer's sampler, image loading and training augmentation for the same
  batches, without the model.
* ``trainer <loss> / <mixing>``: iterations of ``dml.train.train`` itself (sampler, loading,
  augmentation, the strategy with its loss, backward, gradient clipping, optimizer and
  scheduler steps, status file), timed between consecutive ``on_progress`` callbacks, so
  exactly what a user's run does per step.

Every configuration runs in this one process, one after the other, with the same thread count;
each time is the median over steps after warm-up steps, as process CPU time (stable on a shared
machine when threads = 1) and wall time. Images per second = batch size / CPU seconds per step.

    python benchmarks/bench_throughput.py                      # Omniglot 28 px, 32 x 4
    python benchmarks/bench_throughput.py --dataset digits --steps 10 --warmup 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

#: (loss, mixing) pairs timed through the trainer by default
PAIRS = [("multi-similarity", "none"), ("multi-similarity", "metrix-input"),
         ("multi-similarity", "metrix-feature"), ("multi-similarity", "metrix-embed"),
         ("multi-similarity", "embedding-expansion"),
         ("multi-similarity", "symmetrical-synthesis"),
         ("proxy-anchor", "none"), ("proxy-anchor", "proxy-synthesis")]


def base_config(args):
    from dml.config import RunConfig

    return RunConfig().with_overrides([
        f"data.name={args.dataset}", f"data.classes_per_batch={args.classes}",
        f"data.samples_per_class={args.per_class}", f"model.name={args.model}",
        f"model.embedding_dim={args.embedding_dim}", f"train.threads={args.threads}",
        f"train.seed={args.seed}", "train.device=cpu", "train.clustering=false",
        "train.save_embeddings=false", "train.projections=none",
        *([f"data.root={args.root}"] if args.root else []),
        *([f"model.params.width={args.width}"] if args.width else [])])


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def time_trainer(cfg, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of each trainer step after ``warmup`` steps."""
    from dml.train import train

    stamps: list[tuple[float, float]] = []
    cfg = cfg.with_overrides(["train.epochs=1", f"train.iterations_per_epoch={warmup + steps + 1}"])
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp, progress=False,
              on_progress=lambda _: stamps.append((time.perf_counter(), time.process_time())))
    # stamps[i] is the end of step i; step i (i >= 1) lasted stamps[i] - stamps[i - 1]
    pairs = list(zip(stamps[warmup:], stamps[warmup + 1:]))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def time_data(cfg, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """The trainer's data path alone: sampler -> load -> augmentation."""
    from dml.config import batch_shape
    from dml.data.registry import dataset_for_config
    from dml.data.sampler import BalancedBatchSampler
    from dml.data.transforms import make_transform

    ds = dataset_for_config(cfg.data)
    y = torch.searchsorted(ds.train.classes(), ds.train.labels)
    p, k = batch_shape(cfg.data, len(ds.train.classes()))
    sampler = BalancedBatchSampler(y, p, k, num_batches=warmup + steps, seed=cfg.train.seed)
    tf = make_transform(ds, train=True, kind=cfg.data.augment)
    walls, cpus = [], []
    it = iter(sampler)
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = next(it)
        x = tf(ds.train.load(idx))
        _ = y[idx], x.shape
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return walls, cpus


def time_bare(cfg, steps: int, warmup: int) -> tuple[list[float], list[float], int]:
    """Forward, sum, backward, optimizer step of the same model on one fixed batch."""
    from bench_train_step import fixed_batch

    from dml.config import batch_shape
    from dml.data.registry import dataset_for_config
    from dml.models import build_model
    from dml.train import _model_params

    ds = dataset_for_config(cfg.data)
    p, k = batch_shape(cfg.data, len(ds.train.classes()))
    x, _, _ = fixed_batch(ds, p, k, cfg.train.seed, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, ds.channels, ds.image_size, cfg.model.embedding_dim,
                        **_model_params(cfg))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    walls, cpus = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return walls, cpus, len(x)


def main(argv: list[str] | None = None) -> int:
    from bench_train_step import add_batch_and_model_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_and_model_args(ap)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default=None,
                    help="comma-separated loss/mixing pairs (default: the built-in list)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = ([tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else PAIRS)

    cfg = base_config(args)
    rows = []
    w, c, batch = time_bare(cfg, args.steps, args.warmup)
    rows.append(("bare forward+backward (model only, fixed batch)", w, c))
    print(f"bare: {_median_ms(c):.1f} ms", file=sys.stderr, flush=True)
    w, c = time_data(cfg, args.steps, args.warmup)
    rows.append(("data only (sampler, load, augmentation)", w, c))
    print(f"data: {_median_ms(c):.1f} ms", file=sys.stderr, flush=True)
    for loss, mixing in pairs:
        w, c = time_trainer(cfg.with_overrides([f"loss.name={loss}", f"mixing.name={mixing}"]),
                            args.steps, args.warmup)
        rows.append((f"trainer: {loss} / {mixing}", w, c))
        print(f"{loss}/{mixing}: {_median_ms(c):.1f} ms", file=sys.stderr, flush=True)

    bare_ms = _median_ms(rows[0][2])
    print(f"Throughput, batch {batch} ({args.classes} x {args.per_class}, {args.dataset}), "
          f"{args.model}{f' width {args.width}' if args.width else ''}, CPU, {args.threads} "
          f"thread(s); median over {args.steps} steps after {args.warmup} warm-up.\n")
    print("| what is timed | CPU ms / step | wall ms / step | images / s (CPU) | x bare |")
    print("|---|---:|---:|---:|---:|")
    for name, walls, cpus in rows:
        ms = _median_ms(cpus)
        print(f"| {name} | {ms:.1f} | {_median_ms(walls):.1f} | {batch / ms * 1000:,.0f} | "
              f"{ms / bare_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
