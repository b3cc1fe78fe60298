"""The run directory: the only contract between training and the app. Imports no torch.

Layout of ``<runs_root>/<run_id>/``::

    run.json              format "tango-run", version, id, created, dml version
    config.json           the resolved RunConfig
    status.json           state (running / finished / failed / interrupted), progress, error
    metrics.jsonl         one JSON object per evaluation
    classes.json          {"names": {class id: name}} of the data set (so readers need not load it)
    checkpoints/
        best.safetensors  model weights chosen on validation (+ best.json: epoch, metrics, model)
        last.safetensors  latest weights (+ last.json), and last_state.safetensors / .json to resume
    evals/
        epoch_0003.npz    embeddings of that evaluation (+ synthetic points, projections)

Every file is written to a temporary name in the same folder and renamed, so a killed run never
leaves a torn file; readers never see half a JSON or half an npz.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dml.atomic import (_json_default, atomic_save_npz, atomic_write_bytes, atomic_write_json,
                        read_json)

RUN_FORMAT = "tango-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "tango-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_RUNS_ROOT = os.path.join("data", "runs")
STATES = ("running", "finished", "failed", "interrupted")


def upgrade_eval(ev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An evaluation written before the synthetic points' ``ratio`` became ``weight`` (the
    weight of parent 0; NaN for a reflection), read in today's layout: ``synthetic_ratio`` is
    renamed, and a Symmetrical Synthesis point, stored then as parents (i, j) with a flag (1: the
    reflection of i, 0: of j), gets parents (the reflected point, the axis) and weight NaN."""
    if "synthetic_ratio" not in ev or "synthetic_weight" in ev:
        return ev
    ev = dict(ev)
    weight = ev.pop("synthetic_ratio").astype(np.float32)
    if "synthetic_kind" in ev and "synthetic_parents" in ev:
        sym = ev["synthetic_kind"] == "symmetrical"
        if sym.any():
            parents = ev["synthetic_parents"].copy()
            swap = sym & (weight == 0)
            parents[swap] = parents[swap][:, ::-1]
            ev["synthetic_parents"] = parents
            weight[sym] = np.nan
    ev["synthetic_weight"] = weight
    return ev


class RunFormatError(ValueError):
    """A folder that is not a Tango run, or one written by a format this version cannot read."""


# --------------------------------------------------------------------------- run objects

def make_run_id(config: dict[str, Any], now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    parts = [config.get("data", {}).get("name", "data"), config.get("loss", {}).get("name", "loss"),
             config.get("mixing", {}).get("name", "none"),
             f"s{config.get('train', {}).get('seed', 0)}"]
    slug = "-".join(re.sub(r"[^A-Za-z0-9+]+", "", p) for p in parts)
    return f"{stamp}-{slug}"


@dataclass
class Run:
    """A run directory. Reading methods never import torch."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    # ---- identity and format
    @property
    def id(self) -> str:
        return self.path.name

    def info(self) -> dict[str, Any]:
        f = self.path / "run.json"
        if not f.is_file():
            raise RunFormatError(f"{self.path} is not a Tango run: run.json is missing")
        try:
            info = read_json(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFormatError(f"{f} is not valid JSON ({exc})") from exc
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
            raise RunFormatError(f"{self.path} is not a Tango run (run.json has no "
                                 f"format={RUN_FORMAT!r})")
        if info.get("version") != RUN_VERSION:
            raise RunFormatError(
                f"{self.path} was written in run format version {info.get('version')!r}; this "
                f"Tango reads version {RUN_VERSION}. Open it with the Tango version that wrote "
                f"it (dml version {info.get('dml_version', '?')}).")
        return info

    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")

    def status(self) -> dict[str, Any]:
        """The status record; a 'running' run whose process is gone reads as 'interrupted'."""
        f = self.path / "status.json"
        if not f.is_file():
            return {"state": "unknown", "error": "status.json is missing"}
        st = read_json(f)
        if st.get("state") == "running" and not process_alive(st.get("host"), st.get("pid")):
            st = dict(st, state="interrupted",
                      error=st.get("error") or "the training process is gone; resume with "
                      f"`dml train --resume {self.path}`")
        return st

    def metrics(self) -> list[dict[str, Any]]:
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return []
        out = []
        for line in f.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out

    def class_names(self) -> dict[int, str]:
        """{class id: name} written at the start of training ({} for runs without the file)."""
        f = self.path / "classes.json"
        try:
            names = read_json(f).get("names", {}) if f.is_file() else {}
            return {int(k): str(v) for k, v in names.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError):
            return {}

    # ---- evaluations
    def eval_epochs(self) -> list[int]:
        d = self.path / "evals"
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := re.fullmatch(r"epoch_(\d+)\.npz", p.name)))

    def eval_path(self, epoch: int) -> Path:
        return self.path / "evals" / f"epoch_{epoch:04d}.npz"

    def load_eval(self, epoch: int) -> dict[str, np.ndarray]:
        p = self.eval_path(epoch)
        if not p.is_file():
            raise FileNotFoundError(f"run {self.id} has no evaluation for epoch {epoch}; "
                                    f"available: {self.eval_epochs()}")
        with np.load(p, allow_pickle=False) as z:
            return upgrade_eval({k: z[k] for k in z.files})

    # ---- checkpoints
    def checkpoint_path(self, tag: str = "best") -> Path:
        return self.path / "checkpoints" / f"{tag}.safetensors"

    def checkpoint_meta(self, tag: str = "best") -> dict[str, Any] | None:
        p = self.path / "checkpoints" / f"{tag}.json"
        return read_json(p) if p.is_file() else None

    def summary(self) -> dict[str, Any]:
        """One row of a runs table: config essentials, status, best and last metrics."""
        cfg = self.config()
        st = self.status()
        ms = self.metrics()
        best = st.get("best") or {}
        last = ms[-1] if ms else {}
        return {
            "id": self.id,
            "name": cfg.get("name"),
            "dataset": cfg["data"]["name"],
            "model": cfg["model"]["name"],
            "loss": cfg["loss"]["name"],
            "mixing": cfg["mixing"]["name"],
            "seed": cfg["train"]["seed"],
            "state": st.get("state"),
            "progress": st.get("progress", {}),
            "best_epoch": best.get("epoch"),
            "val": best.get("val", {}),
            "test": best.get("test", {}),
            "last_test": last.get("test", {}),
            "evaluations": len(ms),
            "elapsed_s": st.get("elapsed_s"),
            "error": st.get("error"),
            "created": self.info().get("created"),
        }


def process_alive(host: str | None, pid: int | None) -> bool:
    """Whether process ``pid`` of ``host`` still runs (another host: assumed alive)."""
    if pid is None:
        return False
    if host and host != socket.gethostname():
        return True  # another machine: cannot tell, trust the file
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_run(path: str | os.PathLike) -> Run:
    """A Run after checking that ``path`` holds a readable Tango run (else RunFormatError)."""
    p = Path(path)
    if not p.is_dir():
        raise RunFormatError(f"run directory {str(p)!r} does not exist")
    run = Run(p)
    run.info()
    if not (p / "config.json").is_file():
        raise RunFormatError(f"{p} is not a complete Tango run: config.json is missing")
    return run


def iter_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> Iterator[Run | RunFormatError]:
    """Runs under ``root`` (newest first); unreadable run folders come back as errors."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted((q for q in root.iterdir() if q.is_dir() and not q.name.startswith(".")),
                    key=lambda q: q.name, reverse=True):
        if not (p / "run.json").exists():
            continue
        try:
            yield open_run(p)
        except RunFormatError as exc:
            yield exc


def list_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> list[Run]:
    return [r for r in iter_runs(root) if isinstance(r, Run)]


def resolve_run(ref: str, root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> Run:
    """A run from a path, or from an id (or unique id prefix) under ``root``."""
    if os.path.isdir(ref):
        return open_run(ref)
    candidates = [r for r in list_runs(root) if r.id == ref] or \
                 [r for r in list_runs(root) if r.id.startswith(ref)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise RunFormatError(f"no run {ref!r}: not a directory, and no run id under {root} "
                             f"starts with it (see `dml runs --runs-dir {root}`)")
    raise RunFormatError(f"{ref!r} matches several runs: {[r.id for r in candidates]}")


# --------------------------------------------------------------------------- writing

class RunWriter:
    """Creates a run directory and writes its files atomically (used by the trainer)."""

    def __init__(self, run: Run):
        self.run = run
        self._t0 = time.time()
        self._last_status = 0.0

    @classmethod
    def create(cls, runs_root: str | os.PathLike, config: dict[str, Any],
               run_id: str | None = None) -> "RunWriter":
        from dml import __version__

        root = Path(runs_root)
        root.mkdir(parents=True, exist_ok=True)
        base = run_id or make_run_id(config)
        path, n = root / base, 1
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:
                n += 1
                path = root / f"{base}-{n}"
        atomic_write_json(path / "config.json", config)
        atomic_write_json(path / "run.json", {
            "format": RUN_FORMAT, "version": RUN_VERSION, "id": path.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dml_version": __version__})
        w = cls(Run(path))
        w.set_status("running", progress={})
        return w

    @classmethod
    def resume(cls, run: Run) -> "RunWriter":
        w = cls(run)
        st = run.status()
        w._t0 = time.time() - float(st.get("elapsed_s") or 0.0)
        return w

    @property
    def path(self) -> Path:
        return self.run.path

    def set_status(self, state: str, progress: dict[str, Any] | None = None,
                   error: str | None = None, traceback: str | None = None,
                   best: dict[str, Any] | None = None, min_interval: float = 0.0) -> None:
        """Write status.json; with ``min_interval`` skip writes closer together than that."""
        assert state in STATES, state
        now = time.time()
        if min_interval and now - self._last_status < min_interval:
            return
        self._last_status = now
        old = {}
        f = self.path / "status.json"
        if f.is_file():
            try:
                old = read_json(f)
            except (json.JSONDecodeError, OSError):
                old = {}
        st = {
            "state": state,
            "progress": progress if progress is not None else old.get("progress", {}),
            "error": error,
            "traceback": traceback,
            "best": best if best is not None else old.get("best"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(now - self._t0, 2),
        }
        atomic_write_json(f, st)

    def write_class_names(self, names: dict[int, str]) -> None:
        atomic_write_json(self.path / "classes.json",
                          {"names": {str(int(k)): str(v) for k, v in names.items()}})

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one evaluation's record (the whole file is rewritten atomically)."""
        f = self.path / "metrics.jsonl"
        old = f.read_text(encoding="utf-8") if f.is_file() else ""
        line = json.dumps(record, default=_json_default)
        atomic_write_bytes(f, (old + line + "\n").encode("utf-8"))

    def truncate_metrics(self, max_epoch: int) -> None:
        """Drop records after ``max_epoch`` (used when resuming from an older checkpoint)."""
        keep = [m for m in self.run.metrics() if m.get("epoch", 0) <= max_epoch]
        atomic_write_bytes(self.path / "metrics.jsonl",
                           "".join(json.dumps(m) + "\n" for m in keep).encode("utf-8"))

    def save_eval(self, epoch: int, **arrays: np.ndarray) -> Path:
        p = self.run.eval_path(epoch)
        atomic_save_npz(p, **arrays)
        return p
