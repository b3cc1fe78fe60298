"""The errors of reading and writing run folders: one unreadable folder or file, a run locked by
another writer (see :mod:`dml.runs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOCK_FILE = "lock"            # <run>/lock: the writer's exclusive flock, and who holds it



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
