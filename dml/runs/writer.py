"""Writing a run folder: ``RunWriter``, the one writer of a run, holding its lock (see
:mod:`dml.runs`)."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:   # not POSIX: no run lock; statuses fall back to the PID check
    fcntl = None

from dml.atomic import (_json_default, atomic_save_npz, atomic_write_bytes, atomic_write_json,
                        read_json)
from dml.runs.errors import RunFormatError, RunLockedError
from dml.runs.run import (_TMP_NAME, LOCK_WAIT_S, RUN_FORMAT, RUN_VERSION, STATES, TMP_MIN_AGE_S,
                          Run, make_run_id)


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
