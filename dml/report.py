"""The claims benchmark's report: markdown tables of a grid's results (mean +- sd over seeds,
paired differences to the baseline), validation curves, timing, utilization against retrieval,
how many seeds a difference needs, and writing a named section of docs/RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from dml.claims import Cell, GridResult, metric_names, run_metrics, summarize
from dml.stats import significant


def fmt_mean_sd(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def fmt_delta(d: tuple[float, float, float] | None) -> str:
    if d is None:
        return ""
    mean, lo, hi = d
    if math.isnan(lo):
        return f"{100 * mean:+.1f}"
    mark = " *" if significant(lo, hi) else ""
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def metric_header(metric: str) -> str:
    """Column title of a metric: 'recall@K' -> 'R@K' (whatever K the grid's metrics name),
    'map@r' -> 'MAP@R', 'nmi' -> 'NMI'."""
    if metric.startswith("recall@"):
        return "R@" + metric.split("@", 1)[1]
    return {"map@r": "MAP@R", "r_precision": "R-Precision"}.get(metric, metric.upper())


def results_table(rows: list[dict[str, Any]]) -> str:
    names = metric_names(rows)
    head = ("| loss | mixing | seeds | " + " | ".join(metric_header(m) for m in names)
            + " | utilization | ΔR@1 [95% CI] | ΔMAP@R [95% CI] |\n|"
            + "---|" * (len(names) + 6))
    lines = [head]
    for r in rows:
        u = r.get("utilization")
        lines.append(
            f"| {r['loss']} | {r['mixing']} | {r['seeds']} | "
            + " | ".join(fmt_mean_sd(r.get(m)) for m in names)
            + f" | {'-' if u is None else f'{u[0]:.3g} ± {u[1]:.2g}'} | "
            f"{fmt_delta(r.get('delta_recall@1'))} | {fmt_delta(r.get('delta_map@r'))} |")
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
        f"Machine: {machine_description()}"
        + (f"; runs trained {result.extra['backend']}" if result.extra.get("backend") else "")
        + f". {timing(result)}",
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
