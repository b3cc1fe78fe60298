"""All of Tango's speed benchmarks in one run, written into docs/BENCHMARKS.md.

Four parts, each a script of its own that can also be run alone:

* ``train``: step time and activation memory of every mixing strategy relative to ``none``
  with the same loss (``bench_train_step.py``: one process, configurations interleaved);
* ``eval``: the same embeddings through Tango's metrics, pytorch-metric-learning's
  AccuracyCalculator (k="max_bin_count" and k=None) and a bare faiss exact search
  (``bench_metrics.py``: equal numbers checked, time ratios, peak memory);
* ``throughput``: images per second of the real training loop against the bare forward +
  backward of the same model on the same batch (``bench_throughput.py``);
* ``app``: time to the first map of the app's embedding explorer in a real browser, on fresh
  and running servers (``bench_app_map.py``; needs Chromium and Playwright, otherwise it times
  the explorer's script alone).

    python benchmarks/bench_speed.py --out docs/BENCHMARKS.md     # the published numbers
    python benchmarks/bench_speed.py --quick                      # small settings, ~1 min

Each part's table is printed and, with ``--out``, replaces the generated block of that part in
the markdown file (prose around the blocks is kept), together with the command, the date, the
machine and the part's wall time.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# each part: (its script in benchmarks/, arguments in full, arguments with --quick)
PARTS: dict[str, tuple[str, list[str], list[str]]] = {
    "train": ("bench_train_step.py", [],
              ["--dataset", "digits", "--classes", "4", "--per-class", "8", "--rounds", "3",
               "--warmup", "1", "--only", "metrix-embed,expansion"]),
    "eval": ("bench_metrics.py", [],
             ["--quick", "--methods", "tango", "pml max_bin", "faiss floor"]),
    "throughput": ("bench_throughput.py", ["--width", "32", "--classes", "16", "--per-class", "4"],
                   ["--dataset", "digits", "--classes", "4", "--per-class", "8", "--steps", "5",
                    "--warmup", "2", "--pairs",
                    "multi-similarity/none,multi-similarity/metrix-embed"]),
    "app": ("bench_app_map.py", ["--repeat", "5"],
            ["--points", "2000", "--repeat", "1", "--no-scratch"]),
}


def run_part(name: str, argv: list[str]) -> tuple[int, str, float]:
    """Run one part's script in its own process (thread settings of one part cannot leak into
    the next), echoing its output; return (exit code, its stdout, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / PARTS[name][0]), *argv],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="train,eval,throughput,app",
                    help="comma-separated subset of: " + ", ".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="small settings (a smoke run)")
    ap.add_argument("--out", help="markdown file to write the tables into")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")

    from dml.report import machine_description, write_section

    command = shlex.join(["python", "benchmarks/bench_speed.py",
                          *(sys.argv[1:] if argv is None else argv)])
    failed = []
    for name in parts:
        part_argv = PARTS[name][2 if args.quick else 1]
        print(f"\n## {name}: {shlex.join(part_argv) or '(defaults)'}\n", flush=True)
        code, text, secs = run_part(name, part_argv)
        if code:
            failed.append(name)
        if args.out:
            alone = shlex.join(["python", f"benchmarks/{PARTS[name][0]}", *part_argv])
            head = (f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command}` (part `{name}`: "
                    f"`{alone}`), {secs / 60:.1f} min.\nMachine: {machine_description()}.\n")
            write_section(args.out, f"speed-{name}", head + "\n" + text.strip())
    if args.out:
        print(f"\nwrote {args.out}", file=sys.stderr)
    if failed:
        print(f"parts that reported a failure: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
