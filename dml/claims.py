"""The claims benchmark: train a grid of (loss, mixing) cells over several seeds with identical
data, schedule and seeds per cell, select checkpoints on validation, and compare each mixing cell
with the same loss's baseline by a paired confidence interval over seeds.

The grid is resumable: a cell-seed whose finished run (same resolved config) is already under the
runs root is not trained again, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml.config import RunConfig, resolve_versions
from dml.runs import Run, RunFormatError, list_runs
from dml.stats import mean_sd, paired_interval, run_key

METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: a loss, a strategy and extra ``section.key=value`` keys."""

    loss: str
    mixing: str = "none"
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        def short(value: str) -> str:   # 0.043478260869565216 -> 0.0434783 (labels only)
            try:
                return f"{float(value):.6g}" if "." in value else value
            except ValueError:
                return value

        extra = ", ".join(o.split("=", 1)[0].split(".")[-1] + "=" + short(o.split("=", 1)[1])
                          for o in self.overrides)
        return f"{self.mixing}" + (f" ({extra})" if extra else "")

    def baseline(self) -> "Cell":
        keep = tuple(o for o in self.overrides if not o.startswith("mixing."))
        return Cell(self.loss, "none", keep)


def _cells(loss: str, mixings: list[str], overrides: tuple[str, ...] = ()) -> list[Cell]:
    return [Cell(loss, m, overrides) for m in mixings]


# official multi-similarity (Metrix main.py: alpha 17.97, beta 75.66, base 0.77, miner epsilon
# 0.39), with Metrix mixing the miner's pairs as the official code; official Norm-SoftMax scale 23
OFFICIAL_MS = ("loss.params.alpha=17.97", "loss.params.beta=75.66", "loss.params.base=0.77",
               "loss.params.epsilon=0.39")
OFFICIAL_METRIX_MS = ("mixing.params.mined=true", "mixing.params.first_parents=hardest")
OFFICIAL_NORM_SOFTMAX = (f"loss.params.temperature={1 / 23!r}",)
# the official HPHN triplet: euclidean distances, margin 1e-5 (EE main.py), consecutive pairs
OFFICIAL_HPHN = ("loss.params.distance=euclidean", "loss.params.margin=1e-05")

GRIDS: dict[str, list[Cell]] = {
    # the papers' claims (issue: "Evidence")
    "claims": (
        _cells("contrastive", ["none", "metrix-input", "metrix-feature", "metrix-embed"])
        + _cells("multi-similarity", ["none", "metrix-input", "metrix-feature", "metrix-embed",
                                      "embedding-expansion", "symmetrical-synthesis"])
        + _cells("triplet", ["none", "embedding-expansion", "symmetrical-synthesis"])
        + _cells("proxy-anchor", ["none", "metrix-embed", "proxy-synthesis"])
    ),
    # Metrix alpha x w, Embedding Expansion n
    "sensitivity": (
        [Cell("multi-similarity")]
        + [Cell("multi-similarity", "metrix-embed",
                (f"mixing.params.alpha={a}", f"mixing.params.w={w}"))
           for a in (0.5, 1.0, 2.0, 4.0) for w in (0.1, 0.4, 1.0)]
        + [Cell("triplet")]
        + [Cell("triplet", "embedding-expansion", (f"mixing.params.n={n}",)) for n in (1, 2, 4, 8)]
    ),
    # a longer schedule (run with a larger train.epochs): does mixing regularise once the
    # baseline overfits?
    "long": _cells("multi-similarity", ["none", "metrix-input", "metrix-embed",
                                        "embedding-expansion"]),
    # a follow-up of the sensitivity grid's one significant cell, with more seeds
    "followup": [Cell("multi-similarity", "metrix-embed",
                      ("mixing.params.alpha=4.0", "mixing.params.w=1.0"))],
    # the papers' own protocols (docs/METHODS.md §9): multi-similarity with the official
    # hyperparameters and its miner, Metrix mixing the miner's pairs (first positive x mined
    # negatives); frozen BatchNorm with input- and feature-level Metrix; the official HPHN
    # triplet with Embedding Expansion on consecutive pairs; Proxy Synthesis with Norm-SoftMax
    # at the official scale, on P x K batches and on one image per class
    "official": (
        [Cell("multi-similarity", "none", OFFICIAL_MS),
         Cell("multi-similarity", "metrix-embed", OFFICIAL_MS + OFFICIAL_METRIX_MS)]
        + _cells("multi-similarity", ["none", "metrix-input", "metrix-feature"],
                 ("model.params.bn_freeze=true",))
        + [Cell("triplet", "none", OFFICIAL_HPHN),
           Cell("triplet", "embedding-expansion", OFFICIAL_HPHN + ("mixing.params.pairing=consecutive",))]
        + _cells("normalized-softmax", ["none", "proxy-synthesis"], OFFICIAL_NORM_SOFTMAX)
        + _cells("normalized-softmax", ["none", "proxy-synthesis"],
                 OFFICIAL_NORM_SOFTMAX + ("data.classes_per_batch=64",
                                          "data.samples_per_class=1"))
    ),
    # Embedding Expansion's number of synthetic points per pair with batch-hard (HPHN) triplet
    "ee-n": ([Cell("triplet")]
             + [Cell("triplet", "embedding-expansion", (f"mixing.params.n={n}",))
                for n in (1, 2, 4, 8)]),
    # a tiny grid for tests and smoke checks
    "smoke": [Cell("contrastive"), Cell("contrastive", "none", ("loss.params.neg_margin=0.4",))],
}


def cell_config(cell: Cell, dataset: str, seed: int, base: list[str]) -> RunConfig:
    """The run config of a cell and seed, with this Tango's method versions (so a run trained
    with an earlier version of a method is never reused for it)."""
    return resolve_versions(RunConfig().with_overrides([
        f"data.name={dataset}", f"loss.name={cell.loss}", f"mixing.name={cell.mixing}",
        f"train.seed={seed}", *base, *cell.overrides]))


@dataclass
class GridRun:
    cell: Cell
    seed: int
    config: RunConfig
    run: Run | None = None


@dataclass
class GridResult:
    runs: list[GridRun]
    wall_s: float
    trained: int
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1


def find_grid(cells: list[Cell], dataset: str, seeds: list[int], runs_root: str | os.PathLike,
              base: list[str] = ()) -> list[GridRun]:
    """Every (cell, seed) of the grid, the baselines of its mixing cells included, with the
    finished run of the same configuration under ``runs_root`` where there is one (else
    ``run=None``)."""
    wanted = list(dict.fromkeys([c.baseline() for c in cells] + list(cells)))
    items = [GridRun(c, s, cell_config(c, dataset, s, list(base))) for c in wanted for s in seeds]
    existing = {}
    for r in list_runs(runs_root) if Path(runs_root).is_dir() else []:
        try:
            existing.setdefault(run_key(r.config()), []).append(r)
        except (OSError, ValueError):
            continue
    for it in items:
        for r in existing.get(run_key(it.config.to_dict()), []):
            try:
                finished = r.status().get("state") == "finished"
            except RunFormatError:             # an unreadable status.json: not reused
                finished = False
            if finished:
                it.run = r
                break
    return items


def run_grid(cells: list[Cell], dataset: str, seeds: list[int], runs_root: str | os.PathLike,
             base: list[str] = (), jobs: int = 1, log=print) -> GridResult:
    """Train every (cell, seed) not already finished under ``runs_root``; return all runs."""
    t0 = time.time()
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    items = find_grid(cells, dataset, seeds, root, base)
    todo = [it for it in items if it.run is None]
    wanted = list(dict.fromkeys(it.cell for it in items))
    log(f"grid: {len(items)} runs ({len(wanted)} cells x {len(seeds)} seeds), "
        f"{len(items) - len(todo)} already finished, {len(todo)} to train with {jobs} job(s)")

    def work(it: GridRun) -> GridRun:
        it.run = _train_subprocess(it.config, root, threads=max(1, (os.cpu_count() or 1) // jobs))
        return it

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(work, it) for it in todo]
        for fut in as_completed(futures):
            it = fut.result()
            done += 1
            el = time.time() - t0
            best = it.run.status().get("best") or {}
            log(f"[{done}/{len(todo)}] {it.cell.loss} / {it.cell.label} seed {it.seed}: test "
                f"R@1 {100 * best.get('test', {}).get('recall@1', float('nan')):.1f}  "
                f"({el:.0f}s elapsed, ~{el / done * (len(todo) - done):.0f}s left)")
    return GridResult(items, time.time() - t0, len(todo), jobs=max(1, jobs))


def _train_subprocess(cfg: RunConfig, root: Path, threads: int) -> Run:
    """One run in its own process (isolates threads and memory); raises with its stderr tail."""
    cfg = cfg.with_overrides([f"train.threads={threads}"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg.to_dict(), fh)
        path = fh.name
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-m", "dml.cli", "train", "--config", path,
                              "--runs-dir", str(root), "--quiet"], capture_output=True,
                             text=True, env=env)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(f"training failed ({cfg.loss.name} / {cfg.mixing.name}, seed "
                           f"{cfg.train.seed}):\n{out.stderr[-2000:]}")
    return Run(Path(out.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- statistics

def run_metrics(run: Run, checkpoint: str = "best") -> dict[str, float]:
    """Test metrics and utilization of the checkpoint chosen on validation (``"best"``) or of
    the last evaluation (``"last"``)."""
    if checkpoint == "last":
        records = run.metrics()
        rec = records[-1] if records else {}
    else:
        rec = run.status().get("best") or {}
    out = {k: float(v) for k, v in (rec.get("test") or {}).items()}
    if rec.get("utilization") is not None:
        out["utilization"] = float(rec["utilization"])
    out["epoch"] = rec.get("epoch")
    return out


def summarize(result: GridResult, checkpoint: str = "best") -> list[dict[str, Any]]:
    """One row per cell: mean/sd over seeds and paired differences to the loss's baseline, for
    the checkpoint chosen on validation (``"best"``) or the last evaluation (``"last"``)."""
    by_cell: dict[Cell, dict[int, dict[str, float]]] = {}
    for it in result.runs:
        if it.run is not None:
            by_cell.setdefault(it.cell, {})[it.seed] = run_metrics(it.run, checkpoint)
    rows = []
    for cell, per_seed in by_cell.items():
        seeds = sorted(per_seed)
        row: dict[str, Any] = {"loss": cell.loss, "mixing": cell.label, "cell": cell,
                               "seeds": len(seeds)}
        for m in METRICS + ("utilization",):
            vals = [per_seed[s][m] for s in seeds if m in per_seed[s]]
            if vals:
                row[m] = mean_sd(vals)
        base = by_cell.get(cell.baseline())
        if cell.mixing != "none" and base:
            common = [s for s in seeds if s in base]
            for m in ("recall@1", "map@r"):
                row[f"delta_{m}"] = paired_interval([per_seed[s][m] for s in common],
                                              [base[s][m] for s in common])
        rows.append(row)
    return rows
