"""Benchmark Tango's retrieval metrics against pytorch-metric-learning and bare faiss.

For each configuration (n points, d dims, c classes of random clustered, L2-normalised
embeddings) this times, each in a fresh forked child process (so the peak RSS of each
method can be read back with ``os.wait4``):

* ``tango``        dml.metrics.retrieval_metrics (leave-one-out, default chunking)
* ``pml max_bin``  pml AccuracyCalculator(k="max_bin_count") with precision_at_1,
                   r_precision, mean_average_precision_at_r
* ``pml k=None``   the same with k=None (all n-1 neighbours), skipped when the estimated
                   memory exceeds --mem-limit-gb
* ``faiss floor``  a bare faiss IndexFlatL2 search for the same k + 1 neighbours (in chunks of
                   4096 queries, results discarded): the work every exact method must do

and checks that pml's numbers equal Tango's.  Prints a markdown table.

    python benchmarks/bench_metrics.py --quick          # a few seconds
    python benchmarks/bench_metrics.py                  # 10k/100 classes and 60k/10 classes,
                                                        # d = 128 and 512 (tens of minutes)
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pml's peak memory per neighbour slot (n queries x k columns), on top of torch's ~0.6 GiB,
# measured with this script on pml 2.9 (faiss int64 + float32 outputs, float labels, masks,
# int64 cumsum, float64 precisions); used only to decide what to skip.
PML_BYTES_PER_SLOT = 70.0


def make_data(n: int, d: int, n_classes: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    labels = np.arange(n) % n_classes  # balanced classes (as in Fashion-MNIST)
    rng.shuffle(labels)
    x = centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int64)


# ----------------------------------------------------------------------------- the methods
# Each factory does its imports (untimed: torch alone takes seconds) and returns the timed
# function f(x, y, k) -> {"p@1", "r_precision", "map@r"} or None.
def tango():
    from dml.metrics import retrieval_metrics

    def run(x, y, k):
        m = retrieval_metrics(x, y)
        return {"p@1": m["recall@1"], "r_precision": m["r_precision"], "map@r": m["map@r"]}

    return run


def _pml(k_mode):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k=k_mode,
        device=torch.device("cpu"),
    )

    def run(x, y, k):
        m = calc.get_accuracy(x, y)  # leave-one-out (ref_includes_query=True)
        return {
            "p@1": m["precision_at_1"],
            "r_precision": m["r_precision"],
            "map@r": m["mean_average_precision_at_r"],
        }

    return run


def pml_max_bin():
    return _pml("max_bin_count")


def pml_all():
    return _pml(None)


def faiss_floor():
    import faiss

    def run(x, y, k):
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        for a in range(0, len(x), 4096):
            index.search(x[a : a + 4096], k + 1)
        return None

    return run


METHODS = {
    "tango": tango,
    "pml max_bin": pml_max_bin,
    "pml k=None": pml_all,
    "faiss floor": faiss_floor,
}


def in_child(factory, *args):
    """Run factory()(*args) in a forked child, timing only the call.

    Returns (seconds, result, peak RSS GiB of the child, error message or None).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            fn = factory()
            t0 = time.perf_counter()
            res = fn(*args)
            payload = ("ok", time.perf_counter() - t0, res)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            payload = ("error", 0.0, f"{type(e).__name__}: {e}")
        with os.fdopen(w, "wb") as f:
            pickle.dump(payload, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status, rusage = os.wait4(pid, 0)
    peak_gib = rusage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    if not data or status != 0:
        return None, None, peak_gib, f"child died (status {status}; out of memory?)"
    kind, secs, res = pickle.loads(data)
    if kind == "error":
        return None, None, peak_gib, res
    return secs, res, peak_gib, None


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 10],
                    help="number of classes, one per size")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--noise", type=float, default=1.5, help="noise std around class centres")
    ap.add_argument("--repeats", type=int, default=1, help="report the fastest of N runs")
    ap.add_argument("--mem-limit-gb", type=float, default=10.0,
                    help="skip a pml run whose estimated peak memory exceeds this")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--quick", action="store_true",
                    help="small sizes only (3000 and 6000 points, d=64/128): a few seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.classes, args.dims = [3000, 6000], [30, 6], [64, 128]
    if len(args.classes) != len(args.sizes):
        ap.error("--classes needs one value per --sizes value")

    import faiss

    # versions without importing torch in the parent (every method runs in a forked child)
    from importlib import metadata

    try:
        pml_version = metadata.version("pytorch-metric-learning")
    except metadata.PackageNotFoundError:
        pml_version = None
        args.methods = [m for m in args.methods if not m.startswith("pml")]
    print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"pytorch-metric-learning {pml_version}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs\n")

    rows, notes = [], []
    for n, c in zip(args.sizes, args.classes):
        for d in args.dims:
            x, y = make_data(n, d, c, args.noise, args.seed)
            k = int(np.bincount(y).max()) - 1  # max R = pml's k="max_bin_count"
            results = {}
            for name in args.methods:
                slots = n * (n - 1 if name == "pml k=None" else k)
                if name.startswith("pml"):
                    est_gb = slots * PML_BYTES_PER_SLOT / 1e9
                    if est_gb > args.mem_limit_gb:
                        notes.append(f"n={n} d={d}: skipped {name}: estimated "
                                     f"{est_gb:.0f} GB > --mem-limit-gb {args.mem_limit_gb:g}")
                        continue
                best = None
                for _ in range(args.repeats):
                    secs, res, peak, err = in_child(METHODS[name], x, y, k)
                    if err is not None:
                        notes.append(f"n={n} d={d}: {name} failed: {err}")
                        best = None
                        break
                    if best is None or secs < best[0]:
                        best = (secs, res, peak)
                if best is not None:
                    results[name] = best
                    print(f"  n={n} d={d} classes={c} k={k}: {name:12s} {best[0]:8.2f} s",
                          flush=True)
            floor = results.get("faiss floor", (None,))[0]
            tango = results.get("tango")
            for name, (secs, res, peak) in results.items():
                diff = ""
                if res is not None and tango is not None and name != "tango":
                    diff = max(abs(res[m] - tango[1][m]) for m in res)
                    diff = f"{diff:.1e}"
                rows.append([
                    f"{n:,}", str(d), str(c), str(k), name, f"{secs:.2f}",
                    f"{secs / floor:.2f}" if floor else "",
                    f"{secs / tango[0]:.2f}" if tango else "",
                    f"{peak:.2f}", diff,
                    f"{res['map@r']:.4f}" if res else "",
                ])

    header = ["n", "d", "classes", "k (max R)", "method", "time s", "x faiss floor",
              "x tango", "peak RSS GiB", "max |diff| vs tango", "MAP@R"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nPeak RSS is per method, measured in a fresh forked child; the pml rows include "
          "~0.6 GiB for importing torch.")
    for note in notes:
        print(f"Note: {note}")
    mismatches = [r for r in rows if r[9] and float(r[9]) > 1e-6]
    if mismatches:
        print("\nMISMATCH: some pml numbers differ from Tango's by more than 1e-6")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
