"""Images per second of the training data path for a path-backed (JPEG) data set: the old
in-process path against ``dml.data.loader.train_batches`` with 0, 1, 2, ... worker processes.

A CUB-shaped tree (default 3000 JPEGs of ~300 x 300 px in 100 class folders, smooth random
content so the files have the size of photos, not of noise) is written to a temporary folder
(or ``--root``, reused when already there), then for P x K balanced batches of the training
augmentation (``resized_crop``), resized by the loader to ``--image-size``:

* ``old``: ``transform(split.load(idx)).to(device)`` in the training process (``ImageSplit.load``
  decodes with its thread pool), what dml/train.py did;
* ``workers=N``: ``train_batches(split, sampler, transform, device, N)``: N decoding processes,
  augmentation on the device in the training process (N = 0: decoding in process, as ``old``).

Each path runs alone (``loading``) and with a training step of a small model after every batch
(``+ small-cnn``, ``--width`` channels: forward, a scalar of the embeddings, backward, Adam
step), where decoding in workers can overlap the step; ``step only`` is that step on one fixed
batch with no loading, the ceiling. All paths run in this one process, interleaved round by
round (a change of machine load hits all alike); each number is the median over rounds of one epoch of ``--batches`` batches,
after one warm-up epoch (which also starts the workers, once, as the trainer does). ``trainer CPU``
is the training process's own CPU time per batch (workers excluded): what loading still costs
the process that feeds the device. Files are in the page cache (just written): decoding, not the
disk, is measured.

    python benchmarks/bench_data_path.py                          # 3000 JPEGs, 64 px, 8 x 4
    python benchmarks/bench_data_path.py --image-size 128 --workers 0 1 2 3 --rounds 5
    python benchmarks/bench_data_path.py --threads 1              # on a shared (loaded) machine
    python benchmarks/bench_data_path.py --quick                  # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def make_tree(root: Path, images: int, classes: int, side: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """``images`` JPEGs in ``classes`` CUB-style folders (``001.Class_1/...``), sides around
    ``side`` px; written once (an existing complete tree is reused)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels, paths = [], []
    for i in range(images):
        c = i % classes
        path = root / f"{c + 1:03d}.Class_{c + 1}" / f"img_{i:05d}.jpg"
        labels.append(c)
        paths.append(str(path))
        if path.is_file():
            continue
        w, h = (int(side * s) for s in rng.uniform(0.8, 1.3, size=2))
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return labels, paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DataPath:
    """One data path (old or train_batches with N workers), optionally with a model step."""

    def __init__(self, name, split, transform, device, workers, args, step=None):
        from dml.data import BalancedBatchSampler
        from dml.data.loader import train_batches

        self.name, self.split, self.transform, self.device, self.step = name, split, transform, device, step
        self.sampler = BalancedBatchSampler(split.labels, args.P, args.K, num_batches=args.batches, seed=0)
        self.batches = None if workers is None else train_batches(split, self.sampler, transform, device, workers)
        self.epoch, self.walls, self.cpus = 0, [], []

    def _iterate(self):
        if self.batches is None:           # the old path of dml/train.py
            for idx in self.sampler:
                yield idx, self.transform(self.split.load(idx)).to(self.device, non_blocking=True)
        else:
            yield from self.batches

    def epoch_once(self, timed: bool) -> None:
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _, x in self._iterate():
            if self.step is not None:
                self.step(x)
        _sync(self.device)
        if timed:
            self.walls.append(time.perf_counter() - wall)
            self.cpus.append(time.process_time() - cpu)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


def model_step(image_size: int, width: int, device: torch.device):
    from dml.models import build_model

    model = build_model("small-cnn", 3, image_size, 64, width=width).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    w = torch.randn(64, device=device)

    def step(x):
        loss = (model(x) * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--source-size", type=int, default=300, help="side of the JPEG files, px")
    ap.add_argument("--image-size", type=int, default=64, help="side the loader resizes to, px")
    ap.add_argument("--P", type=int, default=8, help="classes per batch")
    ap.add_argument("--K", type=int, default=4, help="images per class")
    ap.add_argument("--batches", type=int, default=30, help="batches per timed epoch")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per path (median)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads of the training process (default: torch's)")
    ap.add_argument("--width", type=int, default=16,
                    help="small-cnn width (16: a step about as long as loading a batch on 2 CPU cores)")
    ap.add_argument("--no-model", action="store_true", help="loading only, no small-cnn step")
    ap.add_argument("--root", type=Path, help="where the JPEG tree goes (kept); default a temp dir")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: 200 images, few batches")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.classes, args.source_size, args.batches, args.rounds = 200, 10, 96, 3, 1
        args.image_size = min(args.image_size, 32)

    from dml.data.images import path_split
    from dml.data.loader import default_workers
    from dml.distributed import cores_given
    from dml.data.transforms import BatchTransform

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None if args.root else Path(tempfile.mkdtemp(prefix="dml-bench-data-"))
    root = args.root or tmp
    try:
        t0 = time.perf_counter()
        labels, paths = make_tree(root, args.images, args.classes, args.source_size)
        made = time.perf_counter() - t0
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        split = path_split(labels, paths, args.image_size)
        tf = BatchTransform((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "resized_crop")
        step = None if args.no_model else model_step(args.image_size, args.width, device)

        paths_ = [DataPath("old: transform(split.load(idx)) in process", split, tf, device, None, args)]
        paths_ += [DataPath(f"train_batches, workers={n}", split, tf, device, n, args) for n in args.workers]
        if step is not None:
            paths_ += [DataPath(p.name, split, tf, device, None if p.batches is None else p.batches.workers,
                             args, step) for p in paths_]
        for p in paths_:
            p.epoch_once(timed=False)                  # warm-up: starts the workers
        for _ in range(args.rounds):
            for p in paths_:
                p.epoch_once(timed=True)
        step_walls = []
        if step is not None:
            fixed = tf(split.load(torch.arange(args.P * args.K))).to(device)
            for i in range(args.batches + 3):
                _sync(device)
                t = time.perf_counter()
                step(fixed)
                _sync(device)
                if i >= 3:
                    step_walls.append(time.perf_counter() - t)
        for p in paths_:
            p.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    B = args.P * args.K
    cmd = "python benchmarks/bench_data_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n`{cmd.strip()}`\n")
    print(f"{args.images} JPEGs ({mb:.0f} MiB, ~{args.source_size} px, {args.classes} classes, "
          f"written in {made:.0f} s) -> {args.image_size} px, batches of {args.P} x {args.K} = {B}, "
          f"resized_crop augmentation, small-cnn width {args.width}, device {device}; {cores_given()} usable cores "
          f"(default_workers = {default_workers(split)}), {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} at the end; median of {args.rounds} epochs of "
          f"{args.batches} batches.\n")
    print("| path | loading: images/s | trainer CPU ms/batch | + small-cnn step: images/s | trainer CPU ms/batch |")
    print("|---|---:|---:|---:|---:|")
    n = 1 + len(args.workers)
    for i in range(n):
        row = [paths_[i]] + ([paths_[n + i]] if step is not None else [])
        cells = []
        for p in row:
            wall, cpu = statistics.median(p.walls), statistics.median(p.cpus)
            cells += [f"{args.batches * B / wall:.0f}", f"{1000 * cpu / args.batches:.1f}"]
        cells += ["-", "-"] * (2 - len(row))
        print(f"| {paths_[i].name} | " + " | ".join(cells) + " |")
    if step_walls:
        print(f"| step only (one fixed batch, no loading) | - | - | "
              f"{B / statistics.median(step_walls):.0f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
