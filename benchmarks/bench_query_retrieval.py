"""What the per-query retrieval of the "Retrieval failures" page costs next to the metrics.

Times ``dml.metrics.query_retrieval`` (AP@R, top-1 and the top-k of every query) against
``dml.metrics.retrieval_metrics`` (the averages only) on clustered, L2-normalised random
embeddings (``bench_metrics.make_data``), leave-one-out, for a data set of few large classes
(the rank method) and one of many small classes (the faiss search); checks that the per-query
values average to the metrics. Prints a markdown table.

    python benchmarks/bench_query_retrieval.py            # 35,000 queries, d = 128
    python benchmarks/bench_query_retrieval.py --n 5000   # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_metrics import make_data  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=35_000, help="queries (leave-one-out)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 3500])
    ap.add_argument("--k", type=int, default=10, help="neighbours kept per query")
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=2,
                    help="time each this many times, alternating; report the fastest")
    args = ap.parse_args(argv)

    import faiss

    from dml.metrics import query_retrieval, retrieval_metrics

    print(f"{args.n:,} queries, d={args.d}, k={args.k}; faiss {faiss.omp_get_max_threads()} "
          f"threads, {os.cpu_count()} CPUs\n")
    print("| classes | max R | metrics s | per query s | ratio | mean AP@R - MAP@R |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for c in args.classes:
        x, y = make_data(args.n, args.d, c, args.noise, seed=0)
        t_metrics = t_query = float("inf")
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            m = retrieval_metrics(x, y, ks=(1,))
            t1 = time.perf_counter()
            q = query_retrieval(x, y, k=args.k)
            t2 = time.perf_counter()
            t_metrics, t_query = min(t_metrics, t1 - t0), min(t_query, t2 - t1)
        diff = max(abs(float(q.ap[q.valid].mean()) - m["map@r"]),
                   abs(float(q.top1[q.valid].mean()) - m["recall@1"]))
        worst = max(worst, diff)
        print(f"| {c:,} | {int(np.bincount(y).max()) - 1:,} | {t_metrics:.2f} | {t_query:.2f} | "
              f"{t_query / t_metrics:.2f} | {diff:.1e} |", flush=True)
    if worst > 1e-12:
        print("\nMISMATCH: the per-query values do not average to the metrics")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
