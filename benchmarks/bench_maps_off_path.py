"""When is a run finished, and when are its maps there? Trains one short run per data set with
``train.map_mode=background`` (the default: the run is finished when training is, a background
process makes the maps) and with ``inline`` (maps before ``dml train`` returns), and prints the
time until ``dml train`` returns and until the maps are cached.

    python benchmarks/bench_maps_off_path.py --dataset omniglot --data-root ../shared/data/omniglot
    python benchmarks/bench_maps_off_path.py --dataset fashion-mnist
    python benchmarks/bench_maps_off_path.py --quick        # digits, a few steps (the test)

Run it on a machine whose UMAP code is already compiled (any earlier map), as the app's users
have it; the first UMAP of a machine also compiles numba code (about a minute).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(dataset: str, mode: str, root: Path, extra: list[str]) -> dict:
    from dml.maps import maps_status

    runs = root / f"{dataset}-{mode}"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "dml.cli", "train", "--dataset", dataset,
                          "--runs-dir", str(runs), "--quiet", "--set", f"train.map_mode={mode}",
                          *extra], capture_output=True, text=True)
    returned = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"dml train failed:\n{out.stderr[-2000:]}")
    run = Path(out.stdout.strip().splitlines()[-1])
    state = json.loads((run / "status.json").read_text())["state"]
    maps_at, st = returned, maps_status(run)
    while st is not None and st["state"] not in ("done", "failed"):
        time.sleep(0.2)
        st = maps_status(run)
    if st is not None:
        maps_at = st["finished_ts"] - t0
    return {"dataset": dataset, "mode": mode, "state": state, "returned_s": round(returned, 1),
            "maps_s": round(maps_at, 1), "maps": sorted(p.name for p in
                                                        (run / "evals").glob("*.*.npz"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="omniglot")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="digits, 3 steps (for the tests)")
    ap.add_argument("--set", action="append", default=[], help="more config overrides")
    args = ap.parse_args(argv)
    extra = [f"--epochs={args.epochs}"]
    if args.quick:
        args.dataset = "digits"
        extra += ["--set", "train.iterations_per_epoch=3", "--set", "model.params.width=8"]
    if args.data_root:
        extra += ["--data-root", args.data_root]
    for s in args.set:
        extra += ["--set", s]
    root = Path(tempfile.mkdtemp(prefix="bench-maps-"))
    try:
        print("| data set | map mode | `dml train` returns (s) | maps cached (s) | maps |")
        print("|---|---|---:|---:|---|")
        for mode in ("background", "inline"):
            r = measure(args.dataset, mode, root, extra)
            assert r["state"] == "finished", r
            print(f"| {r['dataset']} | {mode} | {r['returned_s']} | {r['maps_s']} | "
                  f"{', '.join(r['maps'])} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
