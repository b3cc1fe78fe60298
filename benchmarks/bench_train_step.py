"""Cost of one training step of every mixing strategy, relative to ``none`` with the same loss.

For one fixed P x K batch (default 32 x 4 = 128 Omniglot images, 28 px; ``--dataset digits`` for
the bundled 8 px digits) and the small CNN, every (strategy, loss) pair of the registry
(``dml.mixing.supported_pairs()``, so strategies added later are measured too) and ``none`` with
each of those losses get their own model (same initial weights), loss and Adam optimizer. All
configurations are timed in ONE process, interleaved: each round runs one step of every
configuration in a fresh random order, so a change of machine load hits all of them alike. A step
is forward + mixing + loss + backward + optimizer step (+ CUDA synchronisation); the table shows
the median over rounds after warm-up.

Memory, one extra step per configuration:

* CUDA: ``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it
  (activations, gradients, optimizer state updates and temporaries).
* CPU (no allocator statistics in torch): the bytes of the tensors autograd saves for backward,
  collected with ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage,
  parameters excluded. All of them are alive when backward starts, so this is the peak of the
  activation memory a step holds; it leaves out short-lived temporaries and gradients (which are
  the same for all strategies of a model).

    python benchmarks/bench_train_step.py                     # Omniglot, 128 images, all pairs
    python benchmarks/bench_train_step.py --dataset digits --rounds 3 --only metrix
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


@dataclass
class Config:
    mixing: str
    loss: str
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    strategy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)       # wall seconds
    cpu_times: list[float] = field(default_factory=list)   # process CPU seconds
    memory: float = float("nan")
    synthetic: int = 0


def fixed_batch(ds, classes: int, per_class: int, seed: int, device: torch.device):
    """A P x K batch of training images (training augmentation applied once) and contiguous
    labels."""
    from dml.data.transforms import make_transform

    g = torch.Generator().manual_seed(seed)
    train_classes = ds.train.classes()
    y_all = torch.searchsorted(train_classes, ds.train.labels)
    counts = torch.bincount(y_all, minlength=len(train_classes))
    eligible = torch.nonzero(counts >= per_class).flatten()
    if len(eligible) < classes:
        raise SystemExit(f"only {len(eligible)} classes have {per_class} images; lower --classes")
    chosen = eligible[torch.randperm(len(eligible), generator=g)[:classes]]
    idx = torch.cat([torch.nonzero(y_all == c).flatten()[
        torch.randperm(int(counts[c]), generator=g)[:per_class]] for c in chosen])
    x = make_transform(ds, train=True)(ds.train.load(idx))
    return x.to(device), y_all[idx].to(device), len(train_classes)


def build(mixing: str, loss: str, args, ds, num_classes: int, device) -> Config:
    from dml.losses import build_loss
    from dml.mixing import build_mixing
    from dml.models import build_model

    torch.manual_seed(args.seed)                      # same initial weights for every config
    model = build_model(args.model, ds.channels, ds.image_size, args.embedding_dim,
                        **({"width": args.width} if args.width else {})).to(device)
    loss_fn = build_loss(loss, num_classes=num_classes, embedding_dim=args.embedding_dim).to(device)
    strategy = build_mixing(mixing, loss_fn)          # wraps the loss, as the trainer does
    groups = [{"params": list(model.parameters())}]
    if list(loss_fn.parameters()):
        groups.append({"params": list(loss_fn.parameters()), "lr": args.lr * 100})
    opt = torch.optim.Adam(groups, lr=args.lr)
    model.train(), loss_fn.train(), strategy.train()
    return Config(mixing, loss, model, loss_fn, strategy, opt)


def train_step(c: Config, x, y, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    c.optimizer.zero_grad(set_to_none=True)
    trainer_loss(c, x, y).backward()
    c.optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if not c.synthetic:                               # counted once, outside the timing
        syn = c.strategy.synthesize(c.model, None, x, y)
        c.synthetic = 0 if syn is None else len(syn)
    return dt, dc


def trainer_loss(c: Config, x, y) -> torch.Tensor:
    """The loss of one step exactly as the trainer computes it (no provenance recorded)."""
    if c.strategy.needs_model:
        return c.strategy(c.model, x, y)
    return c.strategy(c.model(x), y)


def measure_memory(c: Config, x, y, device) -> float:
    """Bytes, see the module docstring."""
    c.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer_loss(c, x, y).backward()
        c.optimizer.step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    params = {p.untyped_storage().data_ptr()
              for m in (c.model, c.loss_fn, c.strategy) for p in m.parameters()}
    out: dict[str, torch.Tensor] = {}
    saved = hooked_saved_bytes(lambda: out.setdefault("loss", trainer_loss(c, x, y)), params)
    out["loss"].backward()
    c.optimizer.step()
    return saved


def hooked_saved_bytes(fn, exclude: set[int] = frozenset()) -> float:
    """Bytes of the tensors autograd saves while ``fn()`` runs, once per storage."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in exclude and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(sum(seen.values()))


def add_batch_and_model_args(ap: argparse.ArgumentParser) -> None:
    """The data set, P x K batch and model options shared with bench_throughput.py."""
    ap.add_argument("--dataset", default="omniglot")
    ap.add_argument("--root", default=None, help="data set folder (default: resolved by dml)")
    ap.add_argument("--classes", type=int, default=32, help="P, classes per batch")
    ap.add_argument("--per-class", type=int, default=4, help="K, images per class")
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--width", type=int, default=None, help="small-cnn width (default 64)")
    ap.add_argument("--embedding-dim", type=int, default=64)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_and_model_args(ap)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: per-step CPU time is then a stable "
                         "measure on a shared machine; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: measure only strategies matching one "
                         "(plus the 'none' baselines of their losses)")
    args = ap.parse_args(argv)

    from dml.data import load_dataset
    from dml.mixing import supported_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = load_dataset(args.dataset, args.root)
    x, y, num_classes = fixed_batch(ds, args.classes, args.per_class, args.seed, device)

    pairs = [(m, l) for m, l in supported_pairs() if m != "none"]
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        pairs = [(m, l) for m, l in pairs if any(k in m for k in keys)]
    losses = sorted({l for _, l in pairs}, key=[l for _, l in supported_pairs()].index)
    configs = [build("none", l, args, ds, num_classes, device) for l in losses]
    configs += [build(m, l, args, ds, num_classes, device) for m, l in pairs]

    rng = random.Random(args.seed)
    total = args.warmup + args.rounds
    t_start = time.perf_counter()
    for r in range(total):
        order = list(configs)
        rng.shuffle(order)
        for c in order:
            dt, dc = train_step(c, x, y, device)
            if r >= args.warmup:
                c.times.append(dt)
                c.cpu_times.append(dc)
        print(f"round {r + 1}/{total} done ({time.perf_counter() - t_start:.0f} s)",
              file=sys.stderr, flush=True)
    for c in configs:
        c.memory = measure_memory(c, x, y, device)

    base = {c.loss: c for c in configs if c.mixing == "none"}
    on_cpu = device.type != "cuda"
    mem_label = "saved-for-backward MB" if on_cpu else "peak CUDA MB"
    print(f"\nTrain step, batch {len(y)} ({args.classes} x {args.per_class}, {args.dataset} "
          f"{ds.image_size} px), {args.model}, device {device}"
          f"{f', {torch.get_num_threads()} threads' if on_cpu else ''}; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up.")
    if on_cpu:
        print("CPU ms = process CPU time of the step (unaffected by other processes sharing the "
              "machine, unlike wall ms); 'x none' compares CPU ms.")
    cols = "| mixing | loss | synthetic pts | wall ms |" + (" CPU ms |" if on_cpu else "")
    print(f"\n{cols} x none | {mem_label} | x none |")
    print("|---|---|---:|---:|" + ("---:|" if on_cpu else "") + "---:|---:|---:|")
    med = lambda v: statistics.median(v) * 1000
    for c in configs:
        b = base[c.loss]
        key = (lambda z: med(z.cpu_times)) if on_cpu else (lambda z: med(z.times))
        cells = [c.mixing, c.loss, str(c.synthetic), f"{med(c.times):.1f}"]
        if on_cpu:
            cells.append(f"{med(c.cpu_times):.1f}")
        cells += [f"{key(c) / key(b):.2f}", f"{c.memory / 2**20:.1f}",
                  f"{c.memory / max(b.memory, 1):.2f}"]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
