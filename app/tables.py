"""Pure table logic of the app: the runs table, metric series per evaluation, grouping runs by
configuration with mean and spread over seeds, the significance mark and the paired difference
(by seed) against the baseline, and how a missing value is shown. No Streamlit here; every
function is unit-tested."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from dml.maps import maps_text
from dml.stats import (NOT_CONFIGURATION, _drop, _seed_order, baseline_key, configuration_key,
                       paired_difference, significant)

config_key = configuration_key   # the one configuration identity (dml.stats)

# Display names of the metrics the trainer records (split prefix added where relevant).
METRIC_LABELS = {
    "recall@1": "Recall@1", "recall@2": "Recall@2", "recall@4": "Recall@4",
    "recall@8": "Recall@8", "r_precision": "R-Precision", "map@r": "MAP@R", "nmi": "NMI",
    "f1": "F1", "utilization": "utilization", "utilization_mixed": "utilization (with mixed)",
}

# Config keys that do not change what a run is (seed varies inside a group; the rest is
# bookkeeping or hardware).


# What every table of the app shows for a missing value (never "None" or "nan").
MISSING = "—"


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (a scalar; lists and arrays are never "missing")."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def value_text(value: Any, fmt: str = "{}") -> str:
    """A value as cell or caption text: ``MISSING`` when missing, else ``fmt.format(value)``."""
    return MISSING if is_missing(value) else fmt.format(value)


def fill_missing(df: pd.DataFrame) -> pd.DataFrame:
    """The table as shown when the grid cannot draw its own placeholder: every missing cell is
    ``MISSING`` (a column that has one becomes text; the others keep their type)."""
    out = df.copy()
    for col in out.columns:
        miss = out[col].map(is_missing)
        if miss.any():
            out[col] = [MISSING if m else str(v) for v, m in zip(out[col], miss)]
    return out


def _name_label(name: str) -> str:
    """A metric's display name: 'map@r' -> 'MAP@R', any 'recall@K' -> 'Recall@K' (the K are
    the data set's: 1, 2, 4, 8; SOP 1, 10, 100, 1000; ...)."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    k = recall_k(name)
    return name if k is None else f"Recall@{k}"


def recall_k(name: str) -> int | None:
    """K of a 'recall@K' metric name, else None."""
    m = re.fullmatch(r"recall@(\d+)", name)
    return int(m.group(1)) if m else None


def metric_label(key: str) -> str:
    """'test.map@r' -> 'test MAP@R'; 'train.loss' -> 'train loss'."""
    if "." in key:
        split, name = key.split(".", 1)
        return f"{split} {_name_label(name)}"
    return _name_label(key)


def progress_fraction(progress: dict[str, Any] | None) -> float | None:
    p = progress or {}
    if p.get("steps"):
        return max(0.0, min(1.0, float(p.get("step", 0)) / float(p["steps"])))
    if p.get("epochs"):
        return max(0.0, min(1.0, float(p.get("epoch", 0)) / float(p["epochs"])))
    return None


def status_text(state: str | None, progress: dict[str, Any] | None,
                maps: dict[str, Any] | None = None) -> str:
    """A run's state in words; ``maps``: its background maps (``Run.maps_status()``)."""
    frac = progress_fraction(progress)
    p = progress or {}
    if state == "running" and p.get("phase") == "projections":
        return "running: computing maps for the app"
    if state == "finished" and maps_text(maps):
        return f"finished · {maps_text(maps)}"
    if state == "running" and p.get("epochs"):
        return f"running: epoch {p.get('epoch', 0)}/{p['epochs']}" + (
            f" ({100 * frac:.0f}%)" if frac is not None else "")
    return state or "unknown"


def runs_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run (``Run.summary()`` dicts): data set, loss, strategy, seed, status,
    progress, best validation and test metrics, time."""
    rows = []
    for s in summaries:
        val, test = s.get("val") or {}, s.get("test") or {}
        rows.append({
            "name": s.get("name") or s["id"],
            "dataset": s.get("dataset"),
            "loss": s.get("loss"),
            "mixing": s.get("mixing"),
            "seed": s.get("seed"),
            "status": status_text(s.get("state"), s.get("progress"), s.get("maps")),
            "progress": progress_fraction(s.get("progress")),
            "best epoch": s.get("best_epoch"),
            "val R@1": val.get("recall@1"),
            "val MAP@R": val.get("map@r"),
            "test R@1": test.get("recall@1"),
            "test MAP@R": test.get("map@r"),
            "test NMI": test.get("nmi"),
            "time (s)": s.get("elapsed_s"),
            "run": s["id"],
            "error": s.get("error") or "",
        })
    cols = ["name", "dataset", "loss", "mixing", "seed", "status", "progress",
            "test R@1", "test MAP@R", "test NMI", "val R@1", "val MAP@R", "best epoch",
            "time (s)", "run", "error"]
    return pd.DataFrame(rows, columns=cols)


def unreadable_table(errors: Iterable[Any]) -> pd.DataFrame:
    """One row per run that cannot be read (``dml.runs.RunFormatError``s, as
    ``dml.runs.summarize_runs`` returns them, or their ``parts()`` dicts): the run's id, the
    file at fault relative to the run (empty when the error is the whole folder's) and the
    error, e.g. ``config.json`` / ``not valid JSON (Expecting value: line 1 column 1 (char 0))``.
    """
    rows = []
    for e in errors:
        part = e if isinstance(e, dict) else e.parts()
        rows.append({"run": part.get("run") or MISSING, "file": part.get("file") or "",
                     "error": part.get("error") or ""})
    return pd.DataFrame(rows, columns=["run", "file", "error"])


def unreadable_text(error: Any) -> str:
    """One unreadable run as a line: 'run-id: config.json: not valid JSON (...)'."""
    part = error if isinstance(error, dict) else error.parts()
    return ": ".join(x for x in (part.get("run"), part.get("file"), part.get("error")) if x)


# --------------------------------------------------------------------------- metric series

def flatten_record(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record -> {'val.recall@1': .., 'test.nmi': .., 'train.loss': ..,
    'utilization': .., 'utilization_mixed': ..} (numbers only)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{k}.{kk}"] = float(vv)
        elif k in ("utilization", "utilization_mixed") and isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def metric_keys(records_per_run: Iterable[list[dict[str, Any]]]) -> list[str]:
    """Every metric key present in any record, in a stable, readable order: loss terms
    (train.*), retrieval and clustering (val.*, test.*), then utilization."""
    keys: set[str] = set()
    for records in records_per_run:
        for r in records:
            keys |= set(flatten_record(r))

    def order(k: str) -> tuple:
        group = {"train": 0, "val": 1, "test": 2}.get(k.split(".")[0], 3)
        name = k.split(".", 1)[-1]
        rk = recall_k(name)
        if rk is not None:              # every Recall@K first, by K (1, 2, 4, 8 or 1, 10, 100)
            return (group, 0, rk, k)
        pos = list(METRIC_LABELS).index(name) if name in METRIC_LABELS else 99
        return (group, pos, 0, k)
    return sorted(keys, key=order)


def metric_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one metric over a run's evaluations (missing values skipped)."""
    xs, ys = [], []
    for r in records:
        v = flatten_record(r).get(key)
        if v is not None and math.isfinite(v):
            xs.append(int(r.get("epoch", len(xs) + 1)))
            ys.append(v)
    return xs, ys


def mean_series(series: Iterable[tuple[list[int], list[float]]]
                ) -> tuple[list[int], list[float], list[float], list[int]]:
    """Several runs' (epochs, values) of one metric, per epoch over the runs that have it:
    (epochs, mean, standard deviation (n - 1 in the denominator; 0 for a single run), n)."""
    by_epoch: dict[int, list[float]] = {}
    for xs, ys in series:
        for x, y in zip(xs, ys):
            by_epoch.setdefault(int(x), []).append(float(y))
    epochs = sorted(by_epoch)
    vals = [np.asarray(by_epoch[e]) for e in epochs]
    return (epochs, [float(v.mean()) for v in vals],
            [float(v.std(ddof=1)) if len(v) > 1 else 0.0 for v in vals], [len(v) for v in vals])


# --------------------------------------------------------------------------- configurations

def configuration(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as written, without the keys that do not change a result (for labels and for
    the keys that differ between configurations; identity is ``dml.stats``)."""
    c = copy.deepcopy(cfg)
    for path in NOT_CONFIGURATION:
        _drop(c, path)
    return c


def _params_text(params: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items()))


def config_label(cfg: dict[str, Any], differing: Iterable[str] = ()) -> str:
    """Short human label: 'digits / contrastive / metrix-embed (alpha=2)' (+ other keys that
    differ between the compared configurations)."""
    mix = cfg.get("mixing", {})
    label = f"{cfg['data']['name']} / {cfg['loss']['name']} / {mix.get('name', 'none')}"
    if mix.get("params"):
        label += f" ({_params_text(mix['params'])})"
    extra = []
    flat = _flatten_config(configuration(cfg))
    for key in differing:
        if key.startswith(("mixing.", "data.name", "loss.name")):
            continue
        if key in flat:
            extra.append(f"{key}={flat[key]}")
    return label + (f" [{', '.join(extra)}]" if extra else "")


def has_seed_marker(name: str, seed: Any) -> bool:
    """Whether a run name already says its seed: 's1', 'seed1', 'seed-1' or 'seed=1' standing
    alone ('t-none-s1' yes; 'runs1' and 't-s10' not for seed 1)."""
    if seed is None or not name:
        return False
    return re.search(rf"(?<![A-Za-z0-9])(?:s|seed[-_= ]?){re.escape(str(seed))}(?![0-9])",
                     str(name), re.IGNORECASE) is not None


def seed_label(head: str, seed: Any) -> str:
    """``head`` with ' s{seed}' appended unless it already names the seed (or there is none)."""
    if seed is None or has_seed_marker(head, seed):
        return head
    return f"{head} s{seed}"


def curve_label(cfg: dict[str, Any], differing: Iterable[str] = ()) -> str:
    """A run's curve label on the compare page, with its seed exactly once: the run's name when
    it has one (' s{seed}' added unless the name already says it), else its configuration
    label + ' s{seed}'."""
    seed = (cfg.get("train") or {}).get("seed")
    return seed_label(cfg.get("name") or config_label(cfg, differing), seed)


def _flatten_config(c: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in c.items():
        if isinstance(v, dict):      # an empty table adds no key
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str) if isinstance(v, (dict, list)) else v
    return out


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Flattened config keys whose values differ between configurations."""
    flats = [_flatten_config(configuration(c)) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def group_runs(rows: list[dict[str, Any]], metrics: Iterable[str],
               paired: Iterable[str] = ()) -> pd.DataFrame:
    """Group finished runs by configuration (``dml.stats.configuration_key``); mean and spread
    (sample std) over seeds of each metric, and its paired difference to the baseline (the same
    configuration with mixing 'none'), run by run matched on the seed, with the 95% t-interval
    of ``dml.stats`` (the statistic of ``dml bench claims``).

    rows: {'id', 'config' (dict), 'values' ({metric: float})}. Returns one row per
    configuration with columns: configuration, mixing, seeds, runs, role ('baseline',
    'compared' or 'no baseline'), '<m> mean', '<m> std', '<m> vs baseline' for each metric
    (text: 'baseline', 'significant' when the paired interval excludes 0, 'not significant',
    'needs >= 2 seeds' or 'no baseline'), and '<m> Δ', '<m> Δ low', '<m> Δ high' (nan for a
    baseline, without one, or with fewer than two pairs for the interval) and '<m> pairs' for
    each ``paired`` metric. Several runs of one seed are averaged before pairing.
    """
    metrics, paired = list(metrics), list(paired)
    every = list(dict.fromkeys(metrics + paired))
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = config_key(r["config"])
        g = groups.setdefault(key, {"config": r["config"], "runs": [], "seeds": [],
                                    "values": {m: [] for m in metrics},
                                    "by_seed": {m: {} for m in every}})
        seed = r["config"].get("train", {}).get("seed")
        g["runs"].append(r["id"])
        g["seeds"].append(seed)
        for m in every:
            v = (r.get("values") or {}).get(m)
            if v is None or not math.isfinite(v):
                continue
            if m in g["values"]:
                g["values"][m].append(float(v))
            g["by_seed"][m].setdefault(seed, []).append(float(v))
    diff = differing_keys([g["config"] for g in groups.values()])
    for g in groups.values():
        g["per_seed"] = {m: {s: float(np.mean(v)) for s, v in d.items()}
                         for m, d in g["by_seed"].items()}
    out = []
    for key, g in groups.items():
        row: dict[str, Any] = {
            "configuration": config_label(g["config"], diff),
            "mixing": g["config"].get("mixing", {}).get("name", "none"),
            "seeds": ", ".join(value_text(s) for s in sorted(set(g["seeds"]), key=_seed_order)),
            "runs": len(g["runs"]),
        }
        bkey = baseline_key(g["config"])
        is_base = key == bkey
        base = groups.get(bkey)
        row["role"] = "baseline" if is_base else ("compared" if base else "no baseline")
        for m in every:
            d = (math.nan, math.nan, math.nan, 0)
            if not is_base and base:
                d = paired_difference(g["per_seed"][m], base["per_seed"][m])
            if m in metrics:
                v = g["values"][m]
                row[f"{m} mean"] = float(np.mean(v)) if v else math.nan
                row[f"{m} std"] = float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan
                row[f"{m} vs baseline"] = (
                    "baseline" if is_base else "no baseline" if not base
                    else "needs >= 2 seeds" if d[3] < 2
                    else "significant" if significant(d[1], d[2]) else "not significant")
            if m in paired:
                row[f"{m} Δ"], row[f"{m} Δ low"], row[f"{m} Δ high"], row[f"{m} pairs"] = d
        out.append(row)
    df = pd.DataFrame(out)
    if len(df):
        df = df.sort_values(["mixing", "configuration"],
                            key=lambda s: s.map(lambda v: (v != "none", str(v)))
                            if s.name == "mixing" else s).reset_index(drop=True)
    return df


# Short names of the paired differences in the compare page's final table.
DELTA_LABELS = {"test.recall@1": "ΔR@1", "test.map@r": "ΔMAP@R"}


def delta_label(metric: str) -> str:
    """'test.recall@1' -> 'ΔR@1 vs baseline [95% CI], paired by seed'."""
    short = DELTA_LABELS.get(metric, f"Δ{metric_label(metric)}")
    return f"{short} vs baseline [95% CI], paired by seed"


def delta_text(mean: float, low: float, high: float, pairs: int, role: str = "compared") -> str:
    """A paired difference as text: '+0.0123 [-0.0040, +0.0286]', with ' *' when the interval
    excludes 0 (as in the benchmark report); the ``role`` ('baseline', 'no baseline') of a
    configuration that has nothing to pair with."""
    if role in ("baseline", "no baseline"):
        return role
    if pairs == 0:
        return "no seed pair with the baseline"
    if is_missing(mean):
        return MISSING
    if is_missing(low) or is_missing(high):
        return f"{mean:+.4f} (1 seed pair: no interval)"
    star = " *" if significant(low, high) else ""
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]{star}"


def mean_std_text(mean: float, std: float) -> str:
    """'0.5123 ± 0.0100'; the mean alone for one seed; ``MISSING`` without a value."""
    if is_missing(mean):
        return MISSING
    return f"{mean:.4f}" if is_missing(std) else f"{mean:.4f} ± {std:.4f}"


def final_table(df: pd.DataFrame, metrics: Iterable[str], paired: Iterable[str] = ()
                ) -> pd.DataFrame:
    """The compare page's final table from ``group_runs``: configuration, seeds, the paired
    difference of each ``paired`` metric, then mean ± std and the spread mark of each metric."""
    show = pd.DataFrame({"configuration": df["configuration"], "seeds": df["seeds"]})
    for m in paired:
        show[delta_label(m)] = [
            delta_text(d, lo, hi, int(n), role) for d, lo, hi, n, role in zip(
                df[f"{m} Δ"], df[f"{m} Δ low"], df[f"{m} Δ high"], df[f"{m} pairs"],
                df["role"])]
    for m in metrics:
        show[metric_label(m)] = [mean_std_text(a, b)
                                 for a, b in zip(df[f"{m} mean"], df[f"{m} std"])]
        show[f"{metric_label(m)}: vs baseline"] = df[f"{m} vs baseline"]
    return show
