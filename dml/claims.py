"""The claims benchmark: train a grid of (loss, mixing) cells over several seeds with identical
data, schedule and seeds per cell, select checkpoints on validation, and compare each mixing cell
with the same loss's baseline by a paired confidence interval over seeds.

The grid is resumable: a cell-seed whose finished run (same resolved config) is already under the
runs root is not trained again, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dml.config import RunConfig, resolve_versions
from dml.runs import Run, RunFormatError, list_runs
from dml.stats import mean_sd, paired_interval, run_key

def metric_names(records) -> tuple[str, ...]:
    """The metrics of a grid's tables: the Recall@K its runs recorded (each data set's K, e.g.
    1/2/4/8 or SOP's 1/10/100/1000, in order of K), MAP@R and NMI."""
    ks = sorted({int(k.split("@", 1)[1]) for r in records for k in r
                 if k.startswith("recall@") and k.split("@", 1)[1].isdigit()})
    return tuple(f"recall@{k}" for k in ks) + ("map@r", "nmi")


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
    failed: list[tuple[GridRun, str]] = field(default_factory=list)   # (run, error) per failure


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


class BackendError(ValueError):
    """A one-line error of a grid backend: an unknown backend, a bad Ray address or resource
    request, Ray missing or unreachable."""


def run_grid(cells: list[Cell], dataset: str, seeds: list[int], runs_root: str | os.PathLike,
             base: list[str] = (), jobs: int = 1, log=print, backend=None) -> GridResult:
    """Train every (cell, seed) not already finished under ``runs_root`` with ``backend`` (a
    ``LocalBackend(jobs)`` when None, or a ``RayBackend``); return all runs. A run that fails is
    logged and listed in ``GridResult.failed``; the others go on."""
    t0 = time.time()
    backend = backend or LocalBackend(jobs)
    root = Path(runs_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    items = find_grid(cells, dataset, seeds, root, base)
    todo = [it for it in items if it.run is None]
    wanted = list(dict.fromkeys(it.cell for it in items))
    log(f"grid: {len(items)} runs ({len(wanted)} cells x {len(seeds)} seeds), "
        f"{len(items) - len(todo)} already finished, {len(todo)} to train {backend.describe()}")
    result = GridResult(items, 0.0, len(todo), jobs=backend.jobs)
    if not todo:
        result.wall_s = time.time() - t0
        return result
    backend.start(log)
    result.jobs = backend.jobs
    if backend.name != "local":
        result.extra["backend"] = backend.describe()
    done = 0
    try:
        with contextlib.closing(backend.train(todo, root)) as finished:
            for it, run, error in finished:
                done += 1
                el = time.time() - t0
                head = f"[{done}/{len(todo)}] {it.cell.loss} / {it.cell.label} seed {it.seed}: "
                eta = f"({el:.0f}s elapsed, ~{el / done * (len(todo) - done):.0f}s left)"
                if error is not None:
                    result.failed.append((it, error))
                    log(head + f"FAILED {eta}\n    " + error.rstrip().replace("\n", "\n    "))
                    continue
                it.run = run
                best = run.status().get("best") or {}
                log(head + f"test R@1 "
                    f"{100 * best.get('test', {}).get('recall@1', float('nan')):.1f}  {eta}")
    finally:
        backend.stop()
    result.trained = len(todo) - len(result.failed)
    result.wall_s = time.time() - t0
    return result


def train_cell(cfg: RunConfig, root: str | os.PathLike, threads: int,
               env: dict[str, str] | None = None, cwd: str | None = None) -> Run:
    """Train one cell-seed in its own process (isolates threads and memory), its run directory
    under ``root``: the one piece of code behind every backend. ``threads`` (torch and OpenMP CPU
    threads) applies unless the config sets ``train.threads``; ``env`` adds environment
    variables; ``cwd`` is the process's folder (relative paths of the config) where it exists.
    Raises RuntimeError with the process's stderr tail."""
    threads = cfg.train.threads or threads
    cfg = cfg.with_overrides([f"train.threads={threads}"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg.to_dict(), fh)
        path = fh.name
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   **(env or {}))
        out = subprocess.run([sys.executable, "-m", "dml.cli", "train", "--config", path,
                              "--runs-dir", str(root), "--quiet"], capture_output=True,
                             text=True, env=env,
                             cwd=cwd if cwd and os.path.isdir(cwd) else None)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(f"training failed ({cfg.loss.name} / {cfg.mixing.name}, seed "
                           f"{cfg.train.seed}):\n{out.stderr[-2000:]}")
    return Run(Path(out.stdout.strip().splitlines()[-1]))


class LocalBackend:
    """Runs trained as processes of this machine, ``jobs`` at a time, each with an equal share
    of the cores as threads (unless the config sets ``train.threads``)."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise BackendError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs

    def describe(self) -> str:
        return f"with {self.jobs} job(s)"

    def start(self, log=print) -> None:
        pass

    def stop(self) -> None:
        pass

    def train(self, items: list[GridRun], root: Path
              ) -> Iterator[tuple[GridRun, Run | None, str | None]]:
        """(item, run, None) or (item, None, error) for each item, as they finish."""
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {pool.submit(train_cell, it.config, root, threads): it for it in items}
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result(), None
                except Exception as exc:          # reported; the other runs go on
                    yield futures[fut], None, str(exc)


RAY_INSTALL = "pip install -e '.[cluster]'"
_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9][A-Za-z0-9._-]*:(\d{1,5})")


def check_ray_address(address: str | None) -> str:
    """The address ``RayBackend`` connects to: ``local`` (a new Ray instance on this machine,
    also for None or ""), ``auto`` (the running cluster this machine belongs to),
    ``ray://HOST:PORT`` (Ray Client, the head node's port 10001 by default) or ``HOST:PORT``
    (a cluster's GCS address); anything else is a BackendError."""
    if not address or address in ("local", "auto"):
        return address or "local"
    m = _ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise BackendError(f"bad Ray address {address!r}: use local, auto, ray://HOST:PORT "
                           "(Ray Client, port 10001 on the head node) or HOST:PORT (the "
                           "cluster's GCS address)")
    return address


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BackendError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}"
                           ) from None
    return ray


def _ray_train_cell(cfg: RunConfig, root: str, threads: int, env: dict[str, str],
                    cwd: str) -> str:
    """The Ray task of one cell-seed: ``train_cell`` on a worker; the run directory's path."""
    return str(train_cell(cfg, root, threads, env=env, cwd=cwd).path)


class RayBackend:
    """Runs trained as Ray tasks, each reserving ``cpus_per_run`` CPUs (its threads) and
    ``gpus_per_run`` GPUs (0: the run sees no GPU), as many at a time as the cluster fits.
    Every task runs ``train_cell`` and writes its run directory under the runs root, which the
    workers must reach at the same path: trivially on one machine, a shared file system on a
    cluster (where every node also needs the same Tango installed). An already connected Ray
    (``ray.init`` called in this process) is used as it is and left connected."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1,
                 gpus_per_run: float = 0):
        self.address = check_ray_address(address)
        if not cpus_per_run > 0:
            raise BackendError(f"--cpus-per-run must be positive, got {cpus_per_run:g}")
        if not gpus_per_run >= 0:
            raise BackendError(f"--gpus-per-run must be 0 or more, got {gpus_per_run:g}")
        self.cpus, self.gpus = float(cpus_per_run), float(gpus_per_run)
        self.jobs = 1                       # runs at a time, known once connected
        self._ray = _import_ray()
        self._owned = False
        self._where = ""

    def describe(self) -> str:
        where = f", {self._where}" if self._where else ""
        return (f"on Ray ({self.address}{where}; {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s) "
                f"per run)")

    def start(self, log=print) -> None:
        ray = self._ray
        if not ray.is_initialized():
            m = _ADDRESS.fullmatch(self.address)
            if m is not None:                   # Ray itself retries an absent head for minutes
                host = self.address.removeprefix("ray://").rsplit(":", 1)[0]
                try:
                    socket.create_connection((host, int(m.group(2))), timeout=10).close()
                except OSError as exc:
                    raise BackendError(f"cannot connect to Ray at {self.address}: "
                                       f"{host}:{m.group(2)} does not answer "
                                       f"({exc.strerror or exc})") from None
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
            if self.address == "local":
                kwargs["include_dashboard"] = False
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BackendError(f"cannot connect to Ray at {self.address}: {first}") from None
            self._owned = True
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        fits = [min(int(r.get("CPU", 0) // self.cpus),
                    int(r.get("GPU", 0) // self.gpus) if self.gpus else 1 << 30) for r in nodes]
        self.jobs = sum(fits)
        have = (f"{len(nodes)} node(s), {sum(r.get('CPU', 0) for r in nodes):g} CPUs, "
                f"{sum(r.get('GPU', 0) for r in nodes):g} GPUs")
        self._where = f"{have}, up to {self.jobs} run(s) at a time"
        if self.jobs == 0:
            msg = (f"no node of the Ray cluster has {self.cpus:g} CPU(s) and {self.gpus:g} "
                   f"GPU(s) for one run ({have})")
            if self.address == "local":
                self.stop()
                raise BackendError(msg + "; lower --cpus-per-run / --gpus-per-run")
            log(f"warning: {msg}; the runs wait until such a node joins")
            self.jobs = 1
        log(f"ray: connected to {self.address}: {self._where}")

    def stop(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False

    def train(self, items: list[GridRun], root: Path
              ) -> Iterator[tuple[GridRun, Run | None, str | None]]:
        """(item, run, None) or (item, None, error) for each item, as the tasks finish."""
        ray = self._ray
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_ray_train_cell)
        env = {} if self.gpus else {"CUDA_VISIBLE_DEVICES": ""}
        threads = max(1, int(self.cpus))
        pending = {task.remote(it.config, str(root), threads, env, os.getcwd()): it
                   for it in items}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                it = pending.pop(ready[0])
                try:
                    yield it, Run(Path(ray.get(ready[0]))), None
                except Exception as exc:          # reported; the other runs go on
                    cause = getattr(exc, "cause", None)
                    yield it, None, str(cause if isinstance(cause, RuntimeError) else exc)
        finally:
            for ref in pending:                   # interrupted: stop the runs not yet done
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

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
    names = metric_names(r for per_seed in by_cell.values() for r in per_seed.values())
    rows = []
    for cell, per_seed in by_cell.items():
        seeds = sorted(per_seed)
        row: dict[str, Any] = {"loss": cell.loss, "mixing": cell.label, "cell": cell,
                               "seeds": len(seeds)}
        for m in names + ("utilization",):
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
