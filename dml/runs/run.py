"""Reading a run folder: ``Run`` (its files, status, metrics, evaluations, lock), finding and
listing runs (see :mod:`dml.runs` for the layout)."""

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

try:
    import fcntl
except ImportError:   # not POSIX: no run lock; statuses fall back to the PID check
    fcntl = None

from dml.atomic import read_json
from dml.runs.errors import LOCK_FILE, RunFileError, RunFormatError


RUN_FORMAT = "tango-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "tango-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_RUNS_ROOT = os.path.join("data", "runs")
STATES = ("running", "finished", "failed", "interrupted")
EVAL_SPLITS = ("train", "val", "test", "gallery")   # the splits an evaluation file may hold
LOCK_WAIT_S = 0.3             # how long a writer retries a lock a reader may be testing
TMP_MIN_AGE_S = 60.0          # a younger temporary file may still be in flight: kept
_TMP_NAME = re.compile(r"^\..+\.tmp$")   # dml.atomic's temporaries: .<name>.<random>.tmp


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


def _read_json_object(f: Path, run: Path) -> dict[str, Any]:
    """The JSON object in ``f``; RunFileError (naming ``f`` and the error) for anything else."""
    try:
        obj = read_json(f)
    except FileNotFoundError as exc:
        raise RunFileError(f, "the file is missing", run=run) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFileError(f, f"not valid JSON ({exc})", run=run) from exc
    except OSError as exc:
        raise RunFileError(f, f"cannot be read ({exc.strerror or exc})", run=run) from exc
    if not isinstance(obj, dict):
        raise RunFileError(f, f"holds a JSON {type(obj).__name__}, not an object", run=run)
    return obj


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
        """run.json, after checking that it is a Tango run of this format version (else
        RunFormatError)."""
        f = self.path / "run.json"
        if not f.is_file():
            raise RunFormatError(f"{self.path} is not a Tango run: run.json is missing",
                                 run=self.path, file=f)
        try:
            info = read_json(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFormatError(f"{f} is not valid JSON ({exc})", run=self.path,
                                 file=f) from exc
        except OSError as exc:
            raise RunFileError(f, f"cannot be read ({exc.strerror or exc})",
                               run=self.path) from exc
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
            raise RunFormatError(f"{self.path} is not a Tango run (run.json has no "
                                 f"format={RUN_FORMAT!r})", run=self.path, file=f)
        if info.get("version") != RUN_VERSION:
            raise RunFormatError(
                f"{self.path} was written in run format version {info.get('version')!r}; this "
                f"Tango reads version {RUN_VERSION}. Open it with the Tango version that wrote "
                f"it (dml version {info.get('dml_version', '?')}).", run=self.path, file=f)
        return info

    def config(self) -> dict[str, Any]:
        """config.json (the resolved RunConfig as a dict); RunFileError when it cannot be read."""
        return _read_json_object(self.path / "config.json", self.path)

    def status(self) -> dict[str, Any]:
        """The status record (status.json); RunFileError when it cannot be read.

        A 'running' status is checked against the run lock: when no process holds the lock
        (the writer was killed, or crashed without saying so) the run reads as 'interrupted',
        whatever process now has the PID recorded in the file. A run without a lock file
        (written before the lock, or by a writer that closed) falls back to checking that PID.
        The 'error' of such an interrupted run says what to do: resume it from its last
        complete epoch, or, when it completed none, start a new run."""
        f = self.path / "status.json"
        if not f.is_file():
            return {"state": "unknown", "error": "status.json is missing"}
        st = _read_json_object(f, self.path)
        if st.get("state") != "running":
            return st
        held = self.is_locked()
        if held is None:               # no lock to test: the PID check of older runs
            if process_alive(st.get("host"), st.get("pid")):
                return st
        elif held:
            return st
        else:                          # the writer may have just finished: read it again
            st = _read_json_object(f, self.path) if f.is_file() else st
            if st.get("state") != "running":
                return st
        return dict(st, state="interrupted", error=st.get("error") or self._interrupted_text())

    def _interrupted_text(self) -> str:
        """The error of a 'running' run whose training process is gone."""
        return f"the training process is gone (killed or crashed); {self.resume_hint()}"

    def last_complete_epoch(self) -> int | None:
        """The last epoch the run can be resumed after, from its checkpoints without loading
        them (no torch): the newest resume point ``checkpoints/resume/epoch_NNNN/`` holding its
        state.json (written last), or the earlier layout's ``checkpoints/last_state.json`` with
        last.safetensors; None when no epoch was completed. -1 when a complete epoch exists but
        its number cannot be read."""
        ck = self.path / "checkpoints"
        points = ck / "resume"
        if points.is_dir():
            epochs = [int(m.group(1)) for q in points.iterdir()
                      if (m := re.fullmatch(r"epoch_(\d+)", q.name))
                      and (q / "state.json").is_file()]
            if epochs:
                return max(epochs)
        if (ck / "last_state.json").is_file() and self.checkpoint_path("last").is_file():
            try:
                epoch = read_json(ck / "last_state.json").get("epoch")
                return int(epoch)
            except (OSError, ValueError, TypeError, AttributeError):
                return -1
        return None

    def resume_hint(self) -> str:
        """What to do with a run that stopped before its end, as the tail of a message:
        'epoch 3 is the last complete one; resume with `dml train --resume RUN`' when it saved
        a complete epoch (``last_complete_epoch``), else 'no epoch was completed, so there is
        nothing to resume; start a new run with the same settings:
        `dml train --config RUN/config.json`'."""
        epoch = self.last_complete_epoch()
        if epoch is not None:
            kept = f"epoch {epoch} is the last complete one; " if epoch >= 0 else ""
            return f"{kept}resume with `dml train --resume {self.path}`"
        return ("no epoch was completed, so there is nothing to resume; start a new run with "
                f"the same settings: `dml train --config {self.path / 'config.json'}`")

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, one per evaluation ([] without the file);
        RunFileError naming the line when one is not a JSON object."""
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return []
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RunFileError(f, f"not valid UTF-8 text ({exc})", run=self.path) from exc
        except OSError as exc:
            raise RunFileError(f, f"cannot be read ({exc.strerror or exc})",
                               run=self.path) from exc
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunFileError(f, f"line {n} is not valid JSON ({exc})",
                                   run=self.path) from exc
            if not isinstance(record, dict):
                raise RunFileError(f, f"line {n} holds a JSON {type(record).__name__}, not an "
                                   "object", run=self.path)
            out.append(record)
        return out

    # ---- the writer's lock
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def is_locked(self) -> bool | None:
        """Whether a process holds the run's lock (a writer is at work): True or False; None
        when the run has no lock file (written before the lock, or its writer closed) or the
        lock cannot be tested here (no flock on this system or file system)."""
        return lock_held(self.lock_path)

    def lock_holder(self) -> dict[str, Any] | None:
        """What the lock's last holder recorded: {'host', 'pid', 'since', 'since_ts'}; None
        without a lock file or when it holds no record (yet). Whether it still holds the lock
        is ``is_locked()``."""
        try:
            holder = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

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

    def _config_value(self, cfg: dict[str, Any], key: str) -> Any:
        value: Any = cfg
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise RunFileError(self.path / "config.json", f"has no {key}", run=self.path)
            value = value[part]
        return value

    def summary(self) -> dict[str, Any]:
        """One row of a runs table: config essentials, status, best and last metrics.
        RunFormatError (RunFileError naming the file) when a file it needs cannot be read."""
        cfg = self.config()
        essentials = {k: self._config_value(cfg, key) for k, key in (
            ("dataset", "data.name"), ("model", "model.name"), ("loss", "loss.name"),
            ("mixing", "mixing.name"), ("seed", "train.seed"))}
        st = self.status()
        ms = self.metrics()
        best = st.get("best") if isinstance(st.get("best"), dict) else {}
        last = ms[-1] if ms else {}
        return {
            "id": self.id,
            "name": cfg.get("name"),
            **essentials,
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
            "maps": self.maps_status(),
        }

    def maps_status(self) -> dict[str, Any] | None:
        """Its maps made after training, in the background (see :mod:`dml.maps`)."""
        from dml.maps import maps_status

        return maps_status(self.path)


def lock_held(path: str | os.PathLike) -> bool | None:
    """Whether a process holds an flock on the file ``path``: True or False; None when the file
    does not exist or the lock cannot be tested here (no flock on this system or file system).

    The test takes a shared, non-blocking lock on a new open file description and drops it at
    once; flock locks belong to open file descriptions, so this sees a lock held by this very
    process too."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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
    """A Run after checking that ``path`` holds a readable Tango run: run.json of this format,
    config.json a JSON object (else RunFormatError; RunFileError naming a bad file)."""
    p = Path(path)
    if not p.is_dir():
        raise RunFormatError(f"run directory {str(p)!r} does not exist", run=p)
    run = Run(p)
    run.info()
    if not (p / "config.json").is_file():
        raise RunFormatError(f"{p} is not a complete Tango run: config.json is missing",
                             run=p, file=p / "config.json")
    run.config()
    return run


def iter_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> Iterator[Run | RunFormatError]:
    """Runs under ``root`` (newest first); a run folder that ``open_run`` refuses (run.json or
    config.json unreadable, another format version) comes back as its RunFormatError, with
    ``run`` set to the folder."""
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
            if exc.run is None:
                exc.run = p
            yield exc


def list_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> list[Run]:
    """The readable runs under ``root`` (newest first); see ``iter_runs`` for the others."""
    return [r for r in iter_runs(root) if isinstance(r, Run)]


def summarize_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT
                   ) -> tuple[list[dict[str, Any]], list[RunFormatError]]:
    """(``Run.summary()`` of every readable run under ``root``, newest first; one
    RunFormatError per run that cannot be read, ``run`` set to its folder and, for one bad file,
    ``file`` to that file). A broken run (garbage config.json, status.json or metrics.jsonl)
    never hides the others; ``RunFormatError.parts()`` makes it a table row. A run folder
    removed while listing is left out."""
    summaries: list[dict[str, Any]] = []
    errors: list[RunFormatError] = []
    for r in iter_runs(root):
        if isinstance(r, RunFormatError):
            errors.append(r)
            continue
        try:
            summaries.append(r.summary())
        except RunFormatError as exc:
            if exc.run is None:
                exc.run = r.path
            errors.append(exc)
        except OSError as exc:
            if r.path.is_dir():
                f = getattr(exc, "filename", None)
                errors.append(RunFileError(f, f"cannot be read ({exc.strerror or exc})",
                                           run=r.path) if f else
                              RunFormatError(f"{r.path}: {exc}", run=r.path))
    return summaries, errors


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
