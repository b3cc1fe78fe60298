"""Training throughput of the real trainer at the papers' scale: ResNet-50 at 224 px on a
generated CUB-shaped tree of JPEGs, with ``none`` and each mixing strategy, in fp32 and bf16,
and the share of each step spent waiting for data.

Every cell is one ``dml.train.train`` run (so the data path, autocast, the strategies and the
optimizer are the ones users get); the numbers are the ``speed`` record of its last epoch
(images per second of the global batch, ``data_wait_share``: the host waiting for the next batch
against the epoch's training time), after a first epoch that warms up the workers, cuDNN and the
allocator. A GPU is the point; without one, ``--quick`` runs the same cells on the CPU with a
small model at 32 px, which is what the test checks.

    python benchmarks/bench_gpu.py                       # on a GPU: ResNet-50, 224 px, batch 64
    python benchmarks/bench_gpu.py --precisions bf16 --mixings none metrix-embed
    python benchmarks/bench_gpu.py --quick               # CPU smoke run (a minute)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# strategy -> the loss it is benchmarked with (a pair loss, or a proxy loss for Proxy Synthesis)
CELLS = {"none": "multi-similarity", "metrix-input": "multi-similarity",
         "metrix-feature": "multi-similarity", "metrix-embed": "multi-similarity",
         "embedding-expansion": "triplet", "symmetrical-synthesis": "triplet",
         "proxy-synthesis": "proxy-anchor"}


def make_cub_tree(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> Path:
    """A CUB_200_2011-layout tree of photo-sized JPEGs (``bench_data_path.make_tree``):
    ``classes`` classes, the first half the training pool (ids 1..), the rest the test set
    (ids 101..), ``per_class`` images each. Reused when present."""
    from bench_data_path import make_tree

    if (root / "images.txt").is_file():
        return root
    labels, paths = make_tree(root / "images", classes * per_class, classes, side, seed)
    half = classes // 2
    ids = [c + 1 if c < half else 101 + c - half for c in labels]
    rel = [str(Path(q).relative_to(root / "images")) for q in paths]
    folders = sorted({(i, r.split("/")[0]) for i, r in zip(ids, rel)})
    (root / "image_class_labels.txt").write_text(
        "".join(f"{k} {i}\n" for k, i in enumerate(ids, start=1)))
    (root / "classes.txt").write_text("".join(f"{i} {f}\n" for i, f in folders))
    (root / "images.txt").write_text(                    # last: the tree is complete
        "".join(f"{k} {r}\n" for k, r in enumerate(rel, start=1)))
    return root


def run_cell(root: Path, runs: Path, mixing: str, precision: str, args) -> dict:
    """One training run of the cell; its last epoch's speed record."""
    from dml.config import RunConfig
    from dml.runs import open_run
    from dml.train import train

    over = ["data.name=cub200", f"data.root={root}", f"data.image_size={args.image_size}",
            f"model.name={args.model}", "model.pretrained=false",
            f"model.embedding_dim={args.dim}", f"loss.name={CELLS[mixing]}",
            f"mixing.name={mixing}", f"train.precision={precision}", f"train.device={args.device}",
            "train.epochs=2", f"train.iterations_per_epoch={args.steps}",
            f"data.classes_per_batch={args.batch // 4}", "data.samples_per_class=4",
            "train.projections=none", "train.clustering=false",
            "data.augment=resized_crop", f"train.eval_batch_size={args.batch * 2}"]
    if args.workers is not None:
        over.append(f"train.workers={args.workers}")
    if args.threads:
        over.append(f"train.threads={args.threads}")
    cfg = RunConfig().with_overrides(over + list(args.set or []))
    path = train(cfg, runs, progress=False)
    return open_run(path).metrics()[-1]["speed"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="global batch (P x 4)")
    p.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    p.add_argument("--classes", type=int, default=40)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--side", type=int, default=350, help="JPEG side, px")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="train.workers (default: sized "
                   "to the cores)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--mixings", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--root", type=Path, help="where the JPEG tree is written (reused)")
    p.add_argument("--set", action="append", help="extra section.key=value for every cell")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: small-cnn, 32 px, batch 16, 2 steps, 2 strategies")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.dim, args.batch, args.steps = "small-cnn", 32, 32, 16, 2
        args.classes, args.per_class, args.side, args.device = 16, 6, 64, "cpu"
        args.precisions = args.precisions if argv and "--precisions" in argv else ["fp32", "bf16"]
        args.mixings = args.mixings if argv and "--mixings" in argv else ["none", "metrix-embed"]
        args.set = list(args.set or []) + ["model.params.width=8", "train.threads=1"]

    import torch

    from dml.checkpoints import resolve_device

    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory(prefix="bench_gpu.") as tmp:
        root = make_cub_tree(args.root or Path(tmp) / "cub", args.classes, args.per_class,
                             args.side)
        rows = []
        for mixing in args.mixings:
            for precision in args.precisions:
                t0 = time.perf_counter()
                speed = run_cell(root, Path(tmp) / "runs", mixing, precision, args)
                rows.append({"mixing": mixing, "loss": CELLS[mixing], "precision": precision,
                             **speed, "cell_s": round(time.perf_counter() - t0, 1)})
                print(f"{mixing} / {precision}: {speed['images_per_s']} img/s, waiting for data "
                      f"{100 * speed['data_wait_share']:.0f} %", file=sys.stderr, flush=True)
    base = {r["precision"]: r["images_per_s"] for r in rows if r["mixing"] == "none"}
    print(f"{args.model} at {args.image_size} px, global batch {args.batch} (P x 4), "
          f"{args.steps} steps per epoch, last of 2 epochs; device: {gpu}; torch "
          f"{torch.__version__}\n")
    print("| mixing | loss | precision | images/s | vs none | waiting for data |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = (f"{r['images_per_s'] / base[r['precision']]:.2f}x"
               if base.get(r["precision"]) else "")
        print(f"| {r['mixing']} | {r['loss']} | {r['precision']} | {r['images_per_s']:.1f} | "
              f"{rel} | {100 * r['data_wait_share']:.1f} % |")
    print(f"\n`python benchmarks/bench_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
