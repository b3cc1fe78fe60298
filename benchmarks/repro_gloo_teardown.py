"""How often a two-process gloo run dies at exit, with and without the barrier that
``dml.distributed.teardown(finished=True)`` puts before leaving the process group.

Each trial spawns the two-process step of ``tests/test_distributed.py`` (five loss / strategy
cases, one step each) and counts the trials in which a process ended by a signal (SIGABRT:
"terminate called without an active exception"). The aborts are rare on an idle machine; run
it with the cores busy (e.g. two `yes > /dev/null` beside it), as on a loaded CI machine.

    python benchmarks/repro_gloo_teardown.py --trials 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    from tests.test_distributed import _free_port, _worker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="gloo-")) / "r.pt"
    print("| teardown | trials | a process died by a signal |")
    print("|---|---:|---:|")
    for barrier in (False, True):
        died = 0
        for _ in range(args.trials):
            try:
                mp.spawn(_worker, args=(2, _free_port(), str(out), barrier, False),
                         nprocs=2, join=True)
            except ProcessExitedException:
                died += 1
        print(f"| {'barrier, then leave' if barrier else 'leave at once'} | {args.trials} | "
              f"{died} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
