"""The claims benchmark: train a grid of (loss, mixing) cells over several seeds with identical
data, schedule and seeds per cell, select checkpoints on validation, and compare each mixing cell
with the same loss's baseline by a paired confidence interval over seeds.

The grid is resumable: a cell-seed whose finished run (same resolved config) is already under the
runs root is not trained again, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml.config import RunConfig, resolve_versions
from dml.runs import Run, list_runs
from dml.stats import mean_sd, paired_interval, run_key, significant

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
            if r.status().get("state") == "finished":
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


# --------------------------------------------------------------------------- report

def _pct(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _delta(d: tuple[float, float, float] | None) -> str:
    if d is None:
        return ""
    mean, lo, hi = d
    if math.isnan(lo):
        return f"{100 * mean:+.1f}"
    mark = " *" if significant(lo, hi) else ""
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def results_table(rows: list[dict[str, Any]]) -> str:
    head = ("| loss | mixing | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R | NMI | utilization "
            "| ΔR@1 [95% CI] | ΔMAP@R [95% CI] |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        u = r.get("utilization")
        lines.append(
            f"| {r['loss']} | {r['mixing']} | {r['seeds']} | "
            + " | ".join(_pct(r.get(m)) for m in METRICS)
            + f" | {'-' if u is None else f'{u[0]:.3g} ± {u[1]:.2g}'} | "
            f"{_delta(r.get('delta_recall@1'))} | {_delta(r.get('delta_map@r'))} |")
    return "\n".join(lines)


def machine_description() -> str:
    import torch

    dev = (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else f"CPU only, {os.cpu_count()} cores")
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {dev}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Replace (or append) the generated block ``name`` of a markdown file, keeping the prose
    around it: the block lies between ``<!-- tango:NAME:begin -->`` and ``<!-- tango:NAME:end -->``."""
    from dml.atomic import atomic_write_bytes

    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.is_file() else ""
    begin, end = f"<!-- tango:{name}:begin -->", f"<!-- tango:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    atomic_write_bytes(p, text.encode("utf-8"))


def validation_curves(result: GridResult, metric: str = "recall@1",
                      points: int = 8) -> dict[Cell, dict[int, float]]:
    """Per cell, the validation ``metric`` averaged over seeds at (up to) ``points`` evenly spaced
    evaluated epochs, always including the last one."""
    per_cell: dict[Cell, dict[int, list[float]]] = {}
    for it in result.runs:
        if it.run is None:
            continue
        for rec in it.run.metrics():
            if metric in rec.get("val", {}):
                per_cell.setdefault(it.cell, {}).setdefault(rec["epoch"], []).append(
                    float(rec["val"][metric]))
    out = {}
    for cell, by_epoch in per_cell.items():
        epochs = sorted(by_epoch)
        step = max(1, math.ceil(len(epochs) / points))
        keep = sorted(set(epochs[::-1][::step]))[-points:]
        out[cell] = {e: sum(by_epoch[e]) / len(by_epoch[e]) for e in keep}
    return out


def curves_table(result: GridResult, metric: str = "recall@1") -> str:
    """Markdown: validation ``metric`` (%) per cell at evenly spaced epochs, and the mean epoch
    of the checkpoint chosen on validation."""
    curves = validation_curves(result, metric)
    if not curves:
        return ""
    epochs = sorted({e for c in curves.values() for e in c})
    best: dict[Cell, list[float]] = {}
    for it in result.runs:
        epoch = run_metrics(it.run).get("epoch") if it.run is not None else None
        if epoch is not None:
            best.setdefault(it.cell, []).append(float(epoch))
    lines = ["| loss | mixing | " + " | ".join(f"ep {e}" for e in epochs) + " | chosen epoch |",
             "|---|---|" + "---:|" * (len(epochs) + 1)]
    for cell, c in curves.items():
        b = best.get(cell)
        lines.append(f"| {cell.loss} | {cell.label} | "
                     + " | ".join(f"{100 * c[e]:.1f}" if e in c else "-" for e in epochs)
                     + (f" | {sum(b) / len(b):.1f} |" if b else " | - |"))
    return "\n".join(lines)


def training_seconds(result: GridResult) -> float:
    """Training time summed over the grid's runs, read from the run directories (so a grid
    finished over several invocations, or reusing another grid's runs, still reports it)."""
    return sum(float(it.run.status().get("elapsed_s") or 0.0)
               for it in result.runs if it.run is not None)


def timing(result: GridResult) -> str:
    n = sum(it.run is not None for it in result.runs)
    total = training_seconds(result)
    now = (f"this invocation trained {result.trained} runs in {result.wall_s / 60:.0f} min "
           f"of wall time and reused {n - result.trained}" if result.trained else
           f"this invocation trained nothing and reused all {n} runs")
    return (f"Training time: {total / 3600:.2f} h summed over the grid's {n} runs (about "
            f"{total / result.jobs / 60:.0f} min of wall time with {result.jobs} parallel "
            f"job{'s' if result.jobs > 1 else ''}); {now}.")


def utilization_vs_retrieval(rows: list[dict[str, Any]]) -> str:
    """Does utilization track retrieval across the grid's cells? Spearman rank correlations
    (scipy.stats.spearmanr) of utilization with Recall@1 over all cells, and of the change of
    utilization with the paired change of Recall@1 over the mixing cells (each against its own
    loss's baseline, since utilization is only comparable within a loss)."""
    from scipy import stats

    def corr(xs: list[float], ys: list[float]) -> str:
        if len(xs) < 3:
            return f"n = {len(xs)} cells, too few"
        res = stats.spearmanr(xs, ys)
        return f"rho = {res.statistic:+.2f} (p = {res.pvalue:.2g}, n = {len(xs)} cells)"

    cells = [r for r in rows if "utilization" in r and "recall@1" in r]
    base = {r["cell"]: r for r in cells if r["cell"].mixing == "none"}
    mixed = [(r["utilization"][0] - base[r["cell"].baseline()]["utilization"][0],
              r["delta_recall@1"][0]) for r in cells
             if r["cell"].mixing != "none" and r["cell"].baseline() in base
             and "delta_recall@1" in r]
    return ("Utilization against retrieval, Spearman rank correlation: utilization vs R@1 over "
            f"all cells {corr([r['utilization'][0] for r in cells], [r['recall@1'][0] for r in cells])}"
            "; change of utilization vs paired ΔR@1 over the mixing cells, each against its "
            f"loss's baseline: {corr([m[0] for m in mixed], [m[1] for m in mixed])}.")


def seeds_for_half_width(sd: float, half_width: float, conf: float = 0.95,
                         max_seeds: int = 1000) -> int | None:
    """Fewest seeds n >= 2 whose paired t-interval, at a paired standard deviation ``sd``, has a
    half-width of at most ``half_width`` (None if more than ``max_seeds``)."""
    from scipy import stats

    for n in range(2, max_seeds + 1):
        if stats.t.ppf(0.5 + conf / 2, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def resolution(rows: list[dict[str, Any]], metric: str = "recall@1",
               target: float = 0.01) -> str:
    """What the grid can resolve: the 95% half-widths of the paired differences of ``metric``,
    the paired standard deviations behind them, and the seeds a ``target`` half-width needs."""
    from scipy import stats

    half, sds = [], []
    for r in rows:
        d = r.get(f"delta_{metric}")
        if d is None or math.isnan(d[1]) or r["seeds"] < 2:
            continue
        h = (d[2] - d[1]) / 2
        half.append(h)
        sds.append(h * math.sqrt(r["seeds"]) / stats.t.ppf(0.975, r["seeds"] - 1))
    if not half:
        return ""
    med_sd = sorted(sds)[len(sds) // 2]
    need = seeds_for_half_width(med_sd, target)
    return (f"Resolution: 95% half-widths of Δ{metric} from {100 * min(half):.1f} to "
            f"{100 * max(half):.1f} points (paired sd over seeds {100 * min(sds):.1f} to "
            f"{100 * max(sds):.1f}, median {100 * med_sd:.1f}); a half-width of "
            f"{100 * target:.0f} point at the median sd needs {need or 'over 1000'} seeds.")


def report(result: GridResult, grid: str, dataset: str, seeds: list[int], base: list[str]) -> str:
    rows = summarize(result)
    curves = curves_table(result)
    return "\n".join([
        f"Grid `{grid}` on `{dataset}`, seeds {seeds}; generated {time.strftime('%Y-%m-%d %H:%M')}"
        f" by `{result.command}`",
        f"Machine: {machine_description()}. {timing(result)}",
        f"Shared settings: `{' '.join(base) or 'defaults'}`.",
        "",
        "Test metrics (%) of the checkpoint chosen on validation, mean ± sd over seeds; Δ is the "
        "paired difference to the same loss without mixing with its 95% t-interval over seeds; "
        "`*` marks an interval that excludes 0.",
        "",
        results_table(rows),
        "",
        utilization_vs_retrieval(rows),
        "",
        resolution(rows),
        "",
        "The same runs at their last evaluation (no checkpoint selection, so none of the noise "
        "of choosing an epoch on a small validation split):",
        "",
        results_table(summarize(result, "last")),
        *(["", "Validation Recall@1 (%) during training, mean over seeds (the curves behind the "
           "checkpoint choice; a falling curve means the run overfits its training classes):",
           "", curves] if curves else []),
    ])
