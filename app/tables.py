"""Pure table logic of the app: the runs table, metric series per evaluation, grouping runs by
configuration with mean and spread over seeds, and the significance mark against the baseline.
No Streamlit here; every function is unit-tested."""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

# Display names of the metrics the trainer records (split prefix added where relevant).
METRIC_LABELS = {
    "recall@1": "Recall@1", "recall@2": "Recall@2", "recall@4": "Recall@4",
    "recall@8": "Recall@8", "r_precision": "R-Precision", "map@r": "MAP@R", "nmi": "NMI",
    "f1": "F1", "utilization": "utilization", "utilization_mixed": "utilization (with mixed)",
}

# Config keys that do not change what a run is (seed varies inside a group; the rest is
# bookkeeping or hardware).
_NOT_CONFIGURATION = (("train", "seed"), ("name",), ("train", "device"), ("train", "threads"),
                      ("data", "root"), ("train", "eval_batch_size"), ("train", "deterministic"))


def metric_label(key: str) -> str:
    """'test.map@r' -> 'test MAP@R'; 'train.loss' -> 'train loss'."""
    if "." in key:
        split, name = key.split(".", 1)
        return f"{split} {METRIC_LABELS.get(name, name)}"
    return METRIC_LABELS.get(key, key)


def progress_fraction(progress: dict[str, Any] | None) -> float | None:
    p = progress or {}
    if p.get("steps"):
        return max(0.0, min(1.0, float(p.get("step", 0)) / float(p["steps"])))
    if p.get("epochs"):
        return max(0.0, min(1.0, float(p.get("epoch", 0)) / float(p["epochs"])))
    return None


def status_text(state: str | None, progress: dict[str, Any] | None) -> str:
    frac = progress_fraction(progress)
    p = progress or {}
    if state == "running" and p.get("phase") == "projections":
        return "running: computing maps for the app"
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
            "status": status_text(s.get("state"), s.get("progress")),
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
        pos = list(METRIC_LABELS).index(name) if name in METRIC_LABELS else 99
        return (group, pos, k)
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


# --------------------------------------------------------------------------- configurations

def _drop(cfg: dict[str, Any], path: tuple[str, ...]) -> None:
    node = cfg
    for k in path[:-1]:
        node = node.get(k)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def configuration(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without the seed and bookkeeping keys: runs that differ only by seed share it."""
    c = copy.deepcopy(cfg)
    for path in _NOT_CONFIGURATION:
        _drop(c, path)
    return c


def config_key(cfg: dict[str, Any]) -> str:
    return json.dumps(configuration(cfg), sort_keys=True, default=str)


def baseline_key(cfg: dict[str, Any]) -> str:
    """The key of the same configuration without mixing."""
    c = configuration(cfg)
    c["mixing"] = {"name": "none", "params": {}}
    return json.dumps(c, sort_keys=True, default=str)


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


def intervals_overlap(m1: float, s1: float, m2: float, s2: float) -> bool:
    """Whether [m1 - s1, m1 + s1] and [m2 - s2, m2 + s2] overlap."""
    return (m1 - s1) <= (m2 + s2) and (m2 - s2) <= (m1 + s1)


def group_runs(rows: list[dict[str, Any]], metrics: Iterable[str]) -> pd.DataFrame:
    """Group finished runs by configuration; mean and spread (sample std) over seeds of each
    metric, and whether each configuration differs from its baseline (same configuration with
    mixing 'none') by more than their spreads.

    rows: {'id', 'config' (dict), 'values' ({metric: float})}. Returns one row per
    configuration with columns: configuration, mixing, seeds, runs, '<m> mean', '<m> std',
    '<m> vs baseline' for each metric (text: 'baseline', 'significant', 'not significant',
    'needs >= 2 seeds' or 'no baseline').
    """
    metrics = list(metrics)
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = config_key(r["config"])
        g = groups.setdefault(key, {"config": r["config"], "runs": [], "seeds": [],
                                    "values": {m: [] for m in metrics}})
        g["runs"].append(r["id"])
        g["seeds"].append(r["config"].get("train", {}).get("seed"))
        for m in metrics:
            v = (r.get("values") or {}).get(m)
            if v is not None and math.isfinite(v):
                g["values"][m].append(float(v))
    diff = differing_keys([g["config"] for g in groups.values()])
    stats = {}
    for key, g in groups.items():
        stats[key] = {m: (float(np.mean(v)) if v else math.nan,
                          float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan, len(v))
                      for m, v in g["values"].items()}
    out = []
    for key, g in groups.items():
        row: dict[str, Any] = {
            "configuration": config_label(g["config"], diff),
            "mixing": g["config"].get("mixing", {}).get("name", "none"),
            "seeds": ", ".join(str(s) for s in sorted(g["seeds"], key=str)),
            "runs": len(g["runs"]),
        }
        bkey = baseline_key(g["config"])
        is_base = key == bkey
        for m in metrics:
            mean, std, n = stats[key][m]
            row[f"{m} mean"] = mean
            row[f"{m} std"] = std
            if is_base:
                mark = "baseline"
            elif bkey not in stats:
                mark = "no baseline"
            else:
                bm, bs, bn = stats[bkey][m]
                if n < 2 or bn < 2 or math.isnan(mean) or math.isnan(bm):
                    mark = "needs >= 2 seeds"
                elif intervals_overlap(mean, std, bm, bs):
                    mark = "not significant"
                else:
                    mark = "significant"
            row[f"{m} vs baseline"] = mark
        out.append(row)
    df = pd.DataFrame(out)
    if len(df):
        df = df.sort_values(["mixing", "configuration"],
                            key=lambda s: s.map(lambda v: (v != "none", str(v)))
                            if s.name == "mixing" else s).reset_index(drop=True)
    return df
