"""Comparing runs: which runs are the same configuration, and the paired test of a configuration
against its baseline. ``dml bench claims`` and the app's Compare page use these, and only these.

Configuration identity. Two runs are the same configuration when their resolved configs agree
after dropping what says where and how fast a run ran, not what it computed
(``NOT_CONFIGURATION``: seed, name, device, threads, data root, evaluation batch size,
determinism flag, and what is kept for viewing: saved embeddings, maps and their settings), and after filling in the loss's and the strategy's default parameters (an
explicit ``alpha=2`` is the default run; 50 and 50.0 are the same value). Method versions stay
(docs/METHODS.md §12): runs of a method before and after a change of its results differ.

Paired test. Runs of two configurations are paired by seed; the difference of a metric is
reported as its mean over the common seeds with a 95% t-interval (n - 1 degrees of freedom), and
it is *significant* when that interval excludes 0.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

NOT_CONFIGURATION = (("train", "seed"), ("name",), ("train", "device"), ("train", "threads"),
                     ("data", "root"), ("train", "eval_batch_size"), ("train", "deterministic"),
                     # what is kept for viewing, not what is trained or measured
                     ("train", "save_embeddings"), ("train", "projections"),
                     ("train", "map_fit_max"), ("train", "map_mode"))


def _drop(d: dict, path: tuple[str, ...]) -> None:
    for k in path[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def _number(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def configuration(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as a configuration: without ``NOT_CONFIGURATION``, with the loss's and
    strategy's parameters completed by their defaults. Unknown loss or strategy names (a run of
    another Tango) are compared as written. ``mixing.version`` of ``none`` is dropped: without
    mixing there is no mixing computation, so every baseline has the same key."""
    from dml.losses import loss_defaults
    from dml.mixing import mixing_params

    c = copy.deepcopy(cfg)
    for path in NOT_CONFIGURATION:
        _drop(c, path)
    for section, defaults in (("loss", loss_defaults), ("mixing", mixing_params)):
        part = c.get(section)
        if not isinstance(part, dict):
            continue
        try:
            merged = {**defaults(part.get("name")), **(part.get("params") or {})}
        except (KeyError, ValueError, TypeError):
            continue
        part["params"] = {k: _number(v) for k, v in merged.items()}
    if isinstance(c.get("mixing"), dict) and c["mixing"].get("name", "none") == "none":
        c["mixing"].pop("version", None)
    return c


def configuration_key(cfg: dict[str, Any]) -> str:
    """The identity of a run's configuration (seeds of one configuration share it)."""
    return json.dumps(configuration(cfg), sort_keys=True, default=str)


def baseline_key(cfg: dict[str, Any]) -> str:
    """The key of the same configuration without mixing."""
    c = copy.deepcopy(cfg)
    c["mixing"] = {"name": "none", "params": {}}
    return configuration_key(c)


def run_key(cfg: dict[str, Any]) -> str:
    """The identity of a run: its configuration and its seed (a grid reuses a finished run of
    the same key instead of training it again)."""
    return json.dumps([configuration_key(cfg), (cfg.get("train") or {}).get("seed")])


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def paired_interval(a: list[float], b: list[float], conf: float = 0.95
                    ) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its t confidence interval (n - 1 d.o.f.);
    the interval is (nan, nan) for a single pair."""
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError("paired_interval needs two equally long, non-empty lists")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + conf / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _seed_order(seed: Any) -> tuple:
    """Seeds in numeric order (2 before 10), anything else after them as text."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, seed, "")
    return (1, 0, str(seed))


def paired_difference(values: dict[Any, float], baseline: dict[Any, float]
                      ) -> tuple[float, float, float, int]:
    """Paired difference of a metric to the baseline over the seeds both have ({seed: value}
    each): (mean, low, high, pairs). No common seed: (nan, nan, nan, 0)."""
    seeds = sorted(set(values) & set(baseline), key=_seed_order)
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    mean, low, high = paired_interval([values[s] for s in seeds], [baseline[s] for s in seeds])
    return mean, low, high, len(seeds)


def significant(low: float, high: float) -> bool:
    """Whether a paired interval excludes 0 (False without an interval)."""
    return not (math.isnan(low) or math.isnan(high)) and (low > 0 or high < 0)


def stratified_quota(counts, total: int):
    """How many of each group to keep so that ``total`` are kept in all: each group its share
    of ``total`` (``counts`` (G,) group sizes), rounded by largest remainder (ties: the group
    listed first), at least one per group while there is room. Returns (G,) int64."""
    import numpy as np

    counts = np.asarray(counts, np.int64)
    share = counts * (total / counts.sum())
    quota = np.floor(share).astype(np.int64)
    if total >= len(counts):
        quota = np.maximum(quota, 1)
    rest = total - int(quota.sum())
    if rest > 0:   # largest remainders first
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        order = order[quota[order] < counts[order]]
        quota[order[:rest]] += 1
    while quota.sum() > total:   # floors of 1 over budget: take from the largest
        quota[int(np.argmax(quota))] -= 1
    return quota
