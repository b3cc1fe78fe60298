"""The mixing wrappers' cost on embeddings: forward + backward of each embedding-level strategy
around its loss against the bare loss, and the peak memory of one step with SOP-sized label ids.

Two parts, both on random L2-normalised embeddings (no network, so only the mixing and the loss
are timed), one thread, process CPU time, median of ``--rounds`` after warm-up:

* ``time``: batches of 128 and 512 (K = 4 images per class), 128-d and 512-d; each strategy's
  forward + backward against its bare loss's (``x bare``), each case in a fresh process.
* ``memory``: one forward + backward at batch 128 of 512-d embeddings whose label ids are spread
  over 0..11,317 (Stanford Online Products' training classes), each in a fresh process; the
  growth of the process's peak resident memory during the step.

The same script measures the code before the loss wrappers (a checkout whose strategies are
built from a loss name and stepped with ``step(model, loss_fn, images, labels)``, which always
built the synthetic points' provenance): run it there with ``--json before.json``, then here with
``--before before.json`` for the before/after table::

    git worktree add /tmp/before ec9d39c
    (cd /tmp/before && python /path/to/benchmarks/bench_wrappers.py --json /tmp/before.json)
    python benchmarks/bench_wrappers.py --before /tmp/before.json --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())                   # the checkout being measured (see above)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (strategy, loss, strategy parameters)
CASES = [("metrix-embed", "multi-similarity", {}), ("metrix-embed", "proxy-anchor", {}),
         ("embedding-expansion", "triplet", {}), ("symmetrical-synthesis", "triplet", {}),
         ("proxy-synthesis", "proxy-anchor", {}), ("metrix-embed+ee", "multi-similarity", {})]
SOP_CLASSES = 11_318


class Unit(torch.nn.Module):
    def forward(self, x):
        return x


def new_api() -> bool:
    from dml.mixing.base import MixingStrategy
    return hasattr(MixingStrategy, "needs_model")


def make(case, num_classes: int, dim: int):
    """(bare loss, a callable giving the strategy's loss on (emb, labels))."""
    from dml.losses import build_loss
    from dml.mixing import build_mixing

    name, loss_name, params = case
    loss_fn = build_loss(loss_name, num_classes=num_classes, embedding_dim=dim)
    if new_api():
        criterion = build_mixing(name, loss_fn, **params)
        return loss_fn, criterion
    strategy = build_mixing(name, loss_name, **params)       # before: step with provenance
    return loss_fn, lambda e, y: strategy.step(Unit(), loss_fn, e, y).loss


def batch(b: int, dim: int, ids: int | None = None, seed: int = 0):
    """P x K (K = 4) unit embeddings with labels 0..P-1, or P ids drawn from 0..ids-1."""
    g = torch.Generator().manual_seed(seed)
    p = b // 4
    classes = torch.randperm(ids, generator=g)[:p] if ids else torch.arange(p)
    labels = classes.repeat_interleave(4)
    emb = F.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_()
    return emb, labels


def cpu_ms(fn, rounds: int, warmup: int) -> float:
    times = []
    for r in range(warmup + rounds):
        t0 = time.process_time()
        fn()
        if r >= warmup:
            times.append(1000 * (time.process_time() - t0))
    return statistics.median(times)


def time_one(index: int, b: int, dim: int, rounds: int, warmup: int) -> tuple[float, float]:
    """(bare, wrapper) CPU ms of case ``index`` at batch b, dimension dim (this process)."""
    emb, labels = batch(b, dim)
    torch.manual_seed(0)
    loss_fn, criterion = make(CASES[index], b // 4, dim)

    def bare():
        emb.grad = None
        loss_fn(emb, labels).backward()

    def wrapped():
        emb.grad = None
        criterion(emb, labels).backward()

    return cpu_ms(bare, rounds, warmup), cpu_ms(wrapped, rounds, warmup)


def time_part(rounds: int, warmup: int) -> list[dict]:
    """Every case in a fresh process, so that no case inherits another's heap (the CPU
    allocator's reuse of large blocks otherwise moves timings of a few ms by up to 2x)."""
    rows = []
    for b in (128, 512):
        for dim in (128, 512):
            for i, case in enumerate(CASES):
                out = subprocess.run([sys.executable, __file__, "--time-case", str(i), str(b),
                                      str(dim), "--rounds", str(rounds), "--warmup",
                                      str(warmup)], capture_output=True, text=True,
                                     cwd=os.getcwd())
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                t_bare, t_wrap = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"strategy": case[0], "loss": case[1], "batch": b, "dim": dim,
                             "bare_ms": t_bare, "ms": t_wrap})
                print(f"{case[0]:22s} {case[1]:17s} B={b:4d} D={dim:4d}  bare {t_bare:8.2f} ms"
                      f"  wrapper {t_wrap:8.2f} ms  x{t_wrap / t_bare:.2f}", flush=True)
    return rows


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM; unlike getrusage's ru_maxrss it is not
    inherited from the parent process)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_one(index: int) -> float:
    """MiB the peak resident memory grows by during one step of case ``index`` (this process)."""
    torch.manual_seed(0)
    emb, labels = batch(128, 512, ids=SOP_CLASSES)
    loss_fn, criterion = make(CASES[index], SOP_CLASSES, 512)
    loss_fn(emb, labels).backward()                  # allocator and kernels warmed up
    emb.grad = None
    before = peak_rss_kib()
    criterion(emb, labels).backward()
    return (peak_rss_kib() - before) / 1024


def memory_part() -> list[dict]:
    rows = []
    for i, case in enumerate(CASES):
        out = subprocess.run([sys.executable, __file__, "--memory-case", str(i)],
                             capture_output=True, text=True, env=dict(os.environ),
                             cwd=os.getcwd())
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        mib = float(out.stdout.strip().splitlines()[-1])
        rows.append({"strategy": case[0], "loss": case[1], "peak_mib": mib})
        print(f"{case[0]:22s} {case[1]:17s} peak +{mib:.0f} MiB", flush=True)
    return rows


def markdown(now: dict, before: dict | None) -> str:
    key = lambda r: (r["strategy"], r["loss"], r.get("batch"), r.get("dim"))  # noqa: E731
    old = {key(r): r for r in (before or {}).get("time", [])}
    lines = ["| strategy | loss | batch | dim | bare loss ms | before ms (x bare) | "
             "after ms (x bare) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in now["time"]:
        o = old.get(key(r))
        was = f"{o['ms']:.1f} ({o['ms'] / o['bare_ms']:.2f})" if o else "-"
        lines.append(f"| {r['strategy']} | {r['loss']} | {r['batch']} | {r['dim']} | "
                     f"{r['bare_ms']:.1f} | {was} | {r['ms']:.1f} "
                     f"({r['ms'] / r['bare_ms']:.2f}) |")
    old_m = {key(r): r for r in (before or {}).get("memory", [])}
    lines += ["", f"Peak resident memory growth of one forward + backward, batch 128, 512-d, "
              f"label ids spread over 0..{SOP_CLASSES - 1}:", "",
              "| strategy | loss | before MiB | after MiB |", "|---|---|---:|---:|"]
    for r in now["memory"]:
        o = old_m.get(key(r))
        was = f"{o['peak_mib']:.0f}" if o else "-"
        lines.append(f"| {r['strategy']} | {r['loss']} | {was} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--before", help="measurements of the code before the wrappers (--json)")
    ap.add_argument("--out", help="markdown file whose wrappers block gets the table")
    ap.add_argument("--memory-case", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--time-case", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.memory_case is not None:
        print(memory_one(args.memory_case))
        return 0
    if args.time_case is not None:
        print(json.dumps(time_one(*args.time_case, args.rounds, args.warmup)))
        return 0
    t0 = time.time()
    now = {"api": "wrappers" if new_api() else "step", "time": time_part(args.rounds, args.warmup),
           "memory": memory_part()}
    if args.json:
        Path(args.json).write_text(json.dumps(now, indent=1))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    table = markdown(now, before)
    print(table)
    if args.out:
        from dml.report import machine_description, write_section

        cmd = "python benchmarks/bench_wrappers.py " + " ".join(sys.argv[1:])
        write_section(args.out, "speed-wrappers", (
            f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{cmd}`, "
            f"{(time.time() - t0) / 60:.1f} min; before = commit ec9d39c (strategies stepped "
            f"with provenance), after = this checkout.\nMachine: {machine_description()}.\n\n"
            f"CPU ms of forward + backward, one thread, median of {args.rounds} rounds after "
            f"{args.warmup} warm-up, random unit embeddings, K = 4 per class.\n\n" + table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
