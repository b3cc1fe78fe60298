"""The app's projection worker: one low-priority background process per app server that
compiles UMAP's numba code (once the app has been quiet for a few seconds) and fits UMAP maps, so
that this CPU work neither holds the server's GIL nor competes with the pages being drawn.

The maps themselves (and their cache files) are :mod:`dml.projection`'s; this module only runs
:func:`dml.projection.get_projection` elsewhere (UMAP of a large run: fitted on the run's
``train.map_fit_max`` points, 10,000 by default, the rest placed with ``transform``; the task's
progress message says how far, in seconds per 10k points).

The worker is a plain child process (``python -c "...serve()"``) that talks to the server through
its stdin (tasks) and stdout (results), one pickle per message, not a ``multiprocessing`` process:
"spawn" re-imports the parent's ``__main__`` in the child, and a Streamlit server's ``__main__``
is the app script, so the child would run app/main.py once more (its pages in "bare mode", and
its own warm-up timer, which then failed with "daemonic processes are not allowed to have
children"). This child imports this module and nothing of the app.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dml.projection import (METHODS, ProjectionError, configure_numba_cache, fit_umap,
                            get_projection, load_projection)


def warm_numba(points: int = 300, seed: int = 0) -> float:
    """Compile UMAP's numba code in this process with a throw-away fit + transform on random
    data (the same code path as real maps of any size). Returns the seconds spent."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((points, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fitted = fit_umap(x, seed=seed, n_epochs=5)
    fitted.transform(x[:20])
    return time.perf_counter() - t0


class _Channel:
    """One direction of the server <-> worker pipe: one pickle per message. ``put`` may be called
    from several threads; ``get`` raises EOFError when the other side is gone."""

    def __init__(self, fh: BinaryIO):
        self.fh, self._lock = fh, threading.Lock()

    def put(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self.fh.write(data)
            self.fh.flush()

    def get(self):
        try:
            return pickle.load(self.fh)
        except (pickle.UnpicklingError, OSError, ValueError) as exc:   # a message cut short
            raise EOFError(str(exc)) from exc

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


def _worker_main(tasks: _Channel, results: _Channel, nice: int) -> None:
    """The worker process: lower its priority, then run (id, kind, args) tasks until None."""
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    configure_numba_cache()
    while True:
        try:
            task = tasks.get()
        except EOFError:      # the server went away
            return
        if task is None:
            return
        tid, kind, args = task
        try:
            if kind == "warm":
                value: Any = round(warm_numba(), 2)
            elif kind == "project":
                run_dir, epoch, method, seed = args
                t0 = time.perf_counter()
                computed = load_projection(run_dir, epoch, method) is None
                if computed:   # (a cached one is not read twice)
                    get_projection(run_dir, epoch, method, seed=seed,
                                   progress=lambda m, _t=tid: results.put((_t, "progress", m)))
                value = (round(time.perf_counter() - t0, 2), computed)
            else:
                raise ValueError(f"unknown task {kind!r}")
            results.put((tid, "done", value))
        except Exception as exc:   # reported to the server, the worker goes on
            results.put((tid, "error", str(exc) if isinstance(exc, ProjectionError)
                         else f"{type(exc).__name__}: {exc}"))


def serve(nice: int = 10) -> None:
    """The worker process's entry point: tasks are read from stdin, results written to the
    stdout it was started with; anything else written to stdout (by numba, UMAP, a C library)
    goes to stderr, so it cannot corrupt the results. Ctrl-C in the server's terminal is the
    server's to handle: the worker ends when its stdin closes or when it is terminated."""
    import signal

    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    results = _Channel(os.fdopen(os.dup(sys.stdout.fileno()), "wb"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    _worker_main(_Channel(sys.stdin.buffer), results, nice)


REPO = Path(__file__).resolve().parents[1]


def worker_command(nice: int = 10) -> list[str]:
    """The worker process's command line: this interpreter, importing this module from this
    checkout (whatever the working directory holds) and nothing of the app."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from app.projection_worker import serve; serve({int(nice)})")
    return [sys.executable, "-c", code]


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a worker process (the server is exiting, or the worker is closed)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class WorkerTask(Future):
    """A task of the projection worker: a ``concurrent.futures.Future`` that also keeps the
    worker's last progress message (``message``) and when it was submitted (``started``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.message, self.started = kind, "", time.time()
        self.method: str | None = None


class ProjectionWorker:
    """One background process, started once per app server, that compiles UMAP's numba code and
    fits UMAP maps. That CPU work (10-60 s for the first fit) then neither holds the server's GIL,
    which would stall every page of every session, nor competes at the same priority with the
    server and the browser (the worker runs ``nice``). It ends with the server: terminated when
    the server exits, and on its own when its stdin closes (the server was killed).

    ``submit(run_dir, epoch, method)`` computes and caches a projection (as
    :func:`get_projection`) and returns a :class:`WorkerTask`; its result is the seconds spent.
    Every failure comes back as :class:`ProjectionError` (with the original exception's type and
    message), also when the worker process died."""

    def __init__(self, nice: int = 10, warm: bool = True):
        self._proc = subprocess.Popen(worker_command(nice), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, close_fds=True)
        # ended with the server, as a daemon process would be
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        self._tasks, self._results = _Channel(self._proc.stdin), _Channel(self._proc.stdout)
        self._lock = threading.Lock()
        self._pending: dict[int, WorkerTask] = {}
        self._ids = iter(range(1, 1 << 62))
        self._reader = threading.Thread(target=self._read, name="tango-worker-results",
                                        daemon=True)
        self._reader.start()
        self._fitted_umap = False
        self.warm_task = self._submit("warm", ()) if warm else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _submit(self, kind: str, args: tuple) -> WorkerTask:
        task = WorkerTask(kind)
        with self._lock:
            if not self.alive():
                task.set_exception(ProjectionError(self._died()))
                return task
            tid = next(self._ids)
            self._pending[tid] = task
        try:
            self._tasks.put((tid, kind, args))
        except (OSError, ValueError):   # it died just now: the reader fails every task it had
            pass
        return task

    def submit(self, run_dir: str | os.PathLike, epoch: int, method: str,
               seed: int = 0) -> WorkerTask:
        if method not in METHODS:
            raise ProjectionError(f"unknown projection {method!r}; valid: {', '.join(METHODS)}")
        task = self._submit("project", (str(run_dir), int(epoch), method, int(seed)))
        task.method = method
        return task

    def _died(self) -> str:
        return (f"the projection worker process stopped (exit code {self._proc.poll()}); "
                "try again: a new one starts")

    def _read(self) -> None:
        try:
            self._dispatch_results()
        finally:   # the worker died (killed, out of memory) or was closed: fail what it had
            try:
                self._proc.wait(5)     # (its exit code for the message)
            except subprocess.TimeoutExpired:
                pass
            with self._lock:
                pending, self._pending = self._pending, {}
            for task in pending.values():
                task.set_exception(ProjectionError(self._died()))

    def _dispatch_results(self) -> None:
        while True:
            try:
                tid, what, value = self._results.get()
            except EOFError:     # the worker's stdout closed: it ended
                return
            with self._lock:
                task = self._pending.get(tid) if what == "progress" else self._pending.pop(tid, None)
            if task is None:
                continue
            if what == "progress":
                task.message = str(value)
            elif what == "done":
                if task.kind == "project":
                    value, computed = value
                    if computed and task.method == "umap":
                        self._fitted_umap = True    # its numba code is compiled now
                task.set_result(value)
            else:
                task.set_exception(ProjectionError(value))

    def state(self) -> dict[str, Any]:
        """Warm-up state: warming, warm (warmed, or a UMAP map fitted already), failed (with the
        error) or cold (no warm-up asked, no UMAP fitted yet)."""
        t = self.warm_task
        if t is not None and not t.done():
            return {"state": "warming", "seconds": None, "error": None}
        if t is not None and t.exception() is None:
            return {"state": "warm", "seconds": t.result(), "error": None}
        if self._fitted_umap:
            return {"state": "warm", "seconds": None, "error": None}
        if t is not None:
            return {"state": "failed", "seconds": None, "error": str(t.exception())}
        return {"state": "cold", "seconds": None, "error": None}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (now: a running task is abandoned)."""
        self._finalizer.detach()
        _stop(self._proc, timeout)
        self._tasks.close()
        self._reader.join(timeout)
        self._results.close()


_WORKER_LOCK = threading.Lock()
_WORKER: ProjectionWorker | None = None
_WARMUP: "_WarmupStarter | None" = None
_LAST_ACTIVITY = [time.monotonic()]


def projection_worker(warm: bool = False) -> ProjectionWorker:
    """This process's projection worker, started on first use (a new one if the last died).
    ``warm``: start it with a numba warm-up (the first of its tasks)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or not _WORKER.alive():
            _WORKER = ProjectionWorker(warm=warm)
        return _WORKER


def note_activity() -> None:
    """Mark this moment as busy (the app calls it on every page run): the warm-up waits for a
    quiet moment, so that its compiling does not compete with a page being drawn."""
    _LAST_ACTIVITY[0] = time.monotonic()


class _WarmupStarter(threading.Thread):
    """Starts the warmed worker after ``delay`` s, once nothing happened for ``idle`` s."""

    def __init__(self, delay: float, idle: float):
        super().__init__(name="tango-start-worker", daemon=True)
        self.delay, self.idle, self._stop_event = delay, idle, threading.Event()

    def run(self) -> None:
        if self._stop_event.wait(self.delay):
            return
        while True:
            quiet = time.monotonic() - _LAST_ACTIVITY[0]
            if quiet >= self.idle:
                break
            if self._stop_event.wait(self.idle - quiet):
                return
        projection_worker(warm=True)

    def cancel(self) -> None:
        self._stop_event.set()


def start_warmup(delay: float = 0.0, idle: float = 0.0) -> threading.Thread | None:
    """Start the projection worker with a numba warm-up after ``delay`` seconds, as soon as no
    activity (:func:`note_activity`) was seen for ``idle`` seconds; once per process. No-op
    when already started or when ``DML_NO_WARMUP`` is set. Returns the waiting thread
    (``cancel()`` stops it before it starts the worker)."""
    global _WARMUP
    if os.environ.get("DML_NO_WARMUP"):
        return None
    with _WORKER_LOCK:
        if _WORKER is not None or _WARMUP is not None:
            return None
        th = _WARMUP = _WarmupStarter(delay, idle)
    th.start()
    return th


def warmup_state() -> dict[str, Any]:
    """The numba warm-up state of this process's projection worker (cold when none)."""
    w = _WORKER
    return w.state() if w is not None else {"state": "cold", "seconds": None, "error": None}
