"""The run directory: the only contract between training and the app. Imports no torch.

Layout of ``<runs_root>/<run_id>/``::

    run.json              format "tango-run", version, id, created, dml version
    config.json           the resolved RunConfig
    status.json           state (running / finished / failed / interrupted), progress, error
    metrics.jsonl         one JSON object per evaluation
    classes.json          {"names": {class id: name}} of the data set (so readers need not load it)
    maps.json, maps.log   its 2-D maps made in the background after training (see dml.maps)
    checkpoints/
        best.safetensors  model weights chosen on validation (+ best.json: epoch, metrics, model)
        last.safetensors  latest weights (+ last.json), and last_state.safetensors / .json to resume
    evals/
        epoch_0003.npz    embeddings of that evaluation (+ synthetic points, projections)
    lock                  while a writer works on the run: its exclusive lock (see RunWriter)

Every file is written to a temporary name in the same folder and renamed, so a killed run never
leaves a torn file; readers never see half a JSON or half an npz.

One writer per run: ``RunWriter.create`` and ``RunWriter.resume`` take an exclusive OS lock
(``flock``) on ``<run>/lock`` and hold it until ``RunWriter.close()`` (or until the process dies:
the kernel drops the lock of a killed process). A second writer is refused with
``RunLockedError``. Readers test the lock, without taking it, to tell a run that is still
training from one whose process is gone (``Run.status``).

Readers raise ``RunFormatError`` (``RunFileError`` for one unreadable file, naming it and the
parse error); ``summarize_runs`` lists every readable run and one error per unreadable one, so one
broken run never hides the others.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:
    import fcntl
except ImportError:   # not POSIX: no run lock; statuses fall back to the PID check
    fcntl = None

from dml.atomic import (_json_default, atomic_save_npz, atomic_write_bytes, atomic_write_json,
                        read_json)

RUN_FORMAT = "tango-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "tango-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_RUNS_ROOT = os.path.join("data", "runs")
STATES = ("running", "finished", "failed", "interrupted")
LOCK_FILE = "lock"            # <run>/lock: the writer's exclusive flock, and who holds it
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


class RunFormatError(ValueError):
    """A folder that is not a Tango run, or one written by a format this version cannot read.

    ``run`` is the run folder and ``file`` the file at fault, where known (``iter_runs`` and
    ``summarize_runs`` always set ``run``)."""

    def __init__(self, message: str, *, run: str | os.PathLike | None = None,
                 file: str | os.PathLike | None = None):
        super().__init__(message)
        self.run = Path(run) if run is not None else None
        self.file = Path(file) if file is not None else None

    @property
    def reason(self) -> str:
        """What is wrong, without the file's name where the message starts with it."""
        return str(self)

    def parts(self) -> dict[str, str]:
        """{'run': the run's id, 'file': the file at fault, relative to the run ('' when
        unknown), 'error': what is wrong}: one row of a table of unreadable runs."""
        run = self.run.name if self.run is not None else ""
        file = ""
        if self.file is not None:
            try:
                file = str(self.file.relative_to(self.run)) if self.run else self.file.name
            except ValueError:
                file = str(self.file)
        return {"run": run, "file": file, "error": self.reason}

    def __reduce__(self):   # picklable (e.g. across a process pool) whatever __init__ takes
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type, args: tuple, state: dict[str, Any]) -> RunFormatError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class RunFileError(RunFormatError):
    """One file of a run cannot be read: not valid JSON, not a JSON object, a bad line of
    metrics.jsonl, a missing config key, an I/O error. The message is ``<file>: <reason>``,
    e.g. ``.../config.json: not valid JSON (Expecting value: line 1 column 1 (char 0))``."""

    def __init__(self, file: str | os.PathLike, reason: str, *,
                 run: str | os.PathLike | None = None):
        super().__init__(f"{file}: {reason}", run=run if run is not None else Path(file).parent,
                         file=file)
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason


class RunLockedError(RunFormatError):
    """Another process is writing the run (it holds ``<run>/lock``). ``holder`` is what that
    process recorded in the lock file: {'host', 'pid', 'since', 'since_ts'} ({} when unknown).
    The message is one line: the run, who holds it since when, and what to do."""

    def __init__(self, run: str | os.PathLike, holder: dict[str, Any] | None = None):
        self.holder = dict(holder or {})
        pid, host, since = (self.holder.get("pid"), self.holder.get("host"),
                            self.holder.get("since"))
        who = (f"PID {pid}" if pid is not None else "another process") + \
            (f" on host {host}" if host else "") + (f" since {since}" if since else "")
        super().__init__(f"run {run} is already being written by {who}; wait for it to finish "
                         f"or stop that process, then try again", run=run,
                         file=Path(run) / LOCK_FILE)


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

class RunWriter:
    """Creates a run directory and writes its files atomically (used by the trainer).

    One writer per run: ``create`` and ``resume`` take the run's exclusive lock (an OS
    ``flock`` on ``<run>/lock``, which records the holder's host, PID and start time) and the
    writer holds it until ``close()``; a second ``create``/``resume`` of the same run, from this
    or any process, raises ``RunLockedError``. The kernel drops the lock when the process dies,
    however it dies, so a killed writer never blocks a later resume, and readers tell a run
    that trains from one whose process is gone by testing the lock (``Run.status``).

    Use it as a context manager, or call ``close()`` when done (also on failure)::

        with RunWriter.create(root, config) as w:
            ...
            w.set_status("finished", ...)

    ``RunWriter(run)`` itself takes no lock (for tools that only rewrite a file of a run).
    """

    def __init__(self, run: Run):
        self.run = run
        self._t0 = time.time()
        self._last_status = 0.0
        self._lock_fd: int | None = None
        self._lock_pid: int | None = None     # the process that took the lock

    @classmethod
    def create(cls, runs_root: str | os.PathLike, config: dict[str, Any],
               run_id: str | None = None) -> "RunWriter":
        """A new run directory ``<runs_root>/<run_id>`` (default ``make_run_id(config)``;
        ``-2``, ``-3``, ... appended when it exists, so runs created at the same second with the
        same config, by one or several processes, get distinct folders), locked by the returned
        writer, with config.json, run.json and a 'running' status.json."""
        from dml import __version__

        root = Path(runs_root)
        root.mkdir(parents=True, exist_ok=True)
        base = run_id or make_run_id(config)
        path, n = root / base, 1
        while True:
            try:
                path.mkdir()          # atomic: of two processes, one gets the name
                break
            except FileExistsError:
                n += 1
                path = root / f"{base}-{n}"
        w = cls(Run(path))
        w._acquire_lock()
        try:
            atomic_write_json(path / "config.json", config)
            atomic_write_json(path / "run.json", {
                "format": RUN_FORMAT, "version": RUN_VERSION, "id": path.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dml_version": __version__})
            w.set_status("running", progress={})
        except BaseException:
            w.close()
            raise
        return w

    @classmethod
    def resume(cls, run: Run) -> "RunWriter":
        """A writer continuing ``run``: takes its lock (RunLockedError while another process
        writes it), removes the temporary files a killed writer left (``clean_temporary_files``)
        and keeps counting the elapsed time from status.json. The status itself is left as it
        is until the caller writes one."""
        w = cls(run)
        w._acquire_lock()
        try:
            w.clean_temporary_files()
            try:
                elapsed = float(run.status().get("elapsed_s") or 0.0)
            except (RunFormatError, TypeError, ValueError):
                elapsed = 0.0
            w._t0 = time.time() - elapsed
        except BaseException:
            w.close()
            raise
        return w

    # ---- the lock
    @property
    def locked(self) -> bool:
        """Whether this writer holds the run's lock (False after ``close()``)."""
        return self._lock_fd is not None

    def _acquire_lock(self) -> None:
        """Take the run's exclusive lock (non-blocking) and record the holder in the lock file.

        A reader testing the lock holds it shared for an instant, so a refusal is retried for
        LOCK_WAIT_S before RunLockedError. A lock file removed by its closing holder while we
        waited is a stale inode: the lock is taken again on the file now at the path."""
        if self._lock_fd is not None:
            return
        if fcntl is None:
            return
        lock = self.run.lock_path
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise RunLockedError(self.path, self.run.lock_holder()) from None
            except OSError as exc:   # a file system without locks: write unprotected
                os.close(fd)
                warnings.warn(f"cannot lock run {self.path} ({exc.strerror or exc}); another "
                              f"writer would not be stopped", RuntimeWarning, stacklevel=3)
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd, self._lock_pid = fd, os.getpid()
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "since_ts": time.time()}
        try:
            data = json.dumps(holder).encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass   # the record only serves messages

    def _release_lock(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock. In a forked child
        (same open file description as the parent's) only the child's descriptor is closed:
        the parent keeps the lock."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        if self._lock_pid != os.getpid():
            os.close(fd)
            return
        try:
            try:
                os.unlink(self.run.lock_path)
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def clean_temporary_files(self, min_age_s: float = TMP_MIN_AGE_S) -> list[Path]:
        """Remove the orphan temporaries under the run directory (any depth) that a killed
        writer never renamed into place: the ``.<name>.<random>.tmp`` files of ``dml.atomic``
        and the ``.<name>.<random>.tmp`` folders a checkpoint is assembled in. Those modified
        less than ``min_age_s`` seconds ago are kept, since another process (the app computing a
        map into ``evals/``) may be writing them; pass 0 to remove every one. Returns the
        removed paths."""
        import shutil

        removed = []
        now = time.time()
        for p in sorted(self.path.rglob("*.tmp")):     # a folder before what it holds
            if not _TMP_NAME.match(p.name) or any(p.is_relative_to(r) for r in removed):
                continue
            try:
                if now - p.lstat().st_mtime < min_age_s:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError:
                continue
            removed.append(p)
        return removed

    def close(self) -> None:
        """Done writing: remove orphan temporary files, then release the run's lock (and its
        lock file). Idempotent; a writer that holds no lock does nothing. Write the final
        status (finished, failed, interrupted) before: once closed, a 'running' status no
        longer has a lock that says the run still trains."""
        if self._lock_fd is None:
            return
        if self._lock_pid != os.getpid():     # a forked copy of the writer: not the owner
            self._release_lock()
            return
        try:
            self.clean_temporary_files()
        except OSError:
            pass
        finally:
            self._release_lock()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):   # a writer dropped without close(): the lock still goes
        try:
            self._release_lock()
        except Exception:
            pass

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
            except (ValueError, OSError):     # unreadable: rewritten whole
                old = {}
            if not isinstance(old, dict):
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
