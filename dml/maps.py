"""The maps of a finished run, off the training path. Imports no torch.

A run is "finished" when its training is; its 2-D maps (PCA and UMAP of the evaluations that
``train.projections`` names, see :func:`dml.projection.precompute_projections`) follow in a
detached background process, so that ``dml train`` returns as soon as the model is trained and
the app shows the maps as they arrive (``train.map_mode = "background"``, the default;
``"inline"`` computes them in the training process before it returns).

Files::

    <run>/maps.json                   this run's maps: state queued / running / done / failed,
                                      the evaluations and methods, what is being computed, when
    <run>/maps.log                    what the background process did for this run
    <runs_root>/.maps-queue/<id>.json one entry per run waiting for its maps
    <runs_root>/.maps-queue/lock      held (flock) by the one process that computes the maps
    <runs_root>/.maps-queue/log       that process's own output (errors outside a run)

One process per runs folder computes maps, the queue's entries oldest first: a grid of many runs
queues its maps instead of running as many UMAPs at once, and pays UMAP's code loading once.
Each finished run enqueues itself and starts a drainer; a drainer that finds the lock taken
leaves (the live one takes the new entry), and one that empties the queue looks again after
dropping the lock, so no entry is left behind. A drainer runs at low priority (``nice`` 10):
the next run's training keeps the cores.

A killed drainer leaves its runs "queued" or "running" with nobody holding the lock:
:func:`maps_status` reports them as ``alive: False`` (the app then computes a missing map
itself), and the next run that finishes in that folder starts a drainer that takes them up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from dml.atomic import atomic_write_json, read_json
from dml.runs import lock_held

try:
    import fcntl
except ImportError:   # not POSIX: maps are computed inline instead
    fcntl = None

STATUS_FILE = "maps.json"
LOG_FILE = "maps.log"
QUEUE_DIR = ".maps-queue"
NICE = 10
SUPPORTED = fcntl is not None   # without flock, train.map_mode=background computes inline
START_GRACE_S = 60.0            # a queued run counts as alive this long before a drainer locks
LOCK_TRIES_S = 0.5              # a reader testing the lock holds it for an instant: retry
MAX_ATTEMPTS = 2                # a run whose map process died this often is marked failed


def _queue(runs_root: Path) -> Path:
    return Path(runs_root) / QUEUE_DIR


def _write_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    path = Path(run_dir) / STATUS_FILE
    try:
        old = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    new = dict(old if isinstance(old, dict) else {}, **fields, updated_ts=time.time())
    atomic_write_json(path, new)
    return new


def maps_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's background maps as recorded in ``maps.json`` (None: none were asked for),
    with ``alive``: whether a process is at work on them or will be (a queued or running state
    whose folder's drainer holds the queue lock), and ``pending``: how many of the maps it is
    to make (``todo``, "method:epoch") are not made yet (for a queued or running state)."""
    run_dir = Path(run_dir)
    try:
        st = read_json(run_dir / STATUS_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or "state" not in st:
        return None
    active = st["state"] in ("queued", "running")
    q = _queue(run_dir.parent)
    # a drainer at work, or one just started for this run (a new process at low priority may
    # take seconds to reach the lock while the next run trains)
    st["alive"] = active and bool(
        lock_held(q / "lock")
        or (st["state"] == "queued" and (q / f"{run_dir.name}.json").is_file()
            and time.time() - float(st.get("queued_ts") or 0) < START_GRACE_S))
    if active:
        st["pending"] = len(set(st.get("todo") or []) - set(st.get("done") or []))
    return st


def maps_text(st: dict[str, Any] | None) -> str | None:
    """Where a run's background maps stand, in a few words, while a process is at work on them
    ("maps queued", "maps: 2 to go") or when it failed ("maps failed: see maps.log"; the app
    makes a missing map when it is opened); None otherwise."""
    if st and st.get("state") == "failed":
        return f"maps failed: see {LOG_FILE}"
    if not st or not st.get("alive"):
        return None
    return "maps queued" if st["state"] == "queued" else f"maps: {st.get('pending', '?')} to go"


def enqueue(run_dir: str | os.PathLike, epochs: str, seed: int = 0) -> dict[str, Any]:
    """Queue the maps of a finished run (``epochs``: which evaluations, as
    ``train.projections``) and start a drainer for its runs folder. Returns the run's maps
    status. OSError when the process cannot be started (the maps can then be made with
    ``python -m dml.projection RUN`` or by the app)."""
    from dml.projection import METHODS, load_projection, resolve_epochs, umap_available
    from dml.runs import Run

    run_dir = Path(run_dir).resolve()
    run = Run(run_dir)
    methods = [m for m in reversed(METHODS) if m != "umap" or umap_available()]   # PCA first
    which = resolve_epochs(run, epochs)
    todo = [f"{m}:{e}" for e in which for m in methods   # a stale cache is made again too
            if load_projection(run_dir, e, m) is None]
    if not todo:          # all made already (a resumed run's): no process to start
        return _write_status(run_dir, state="done", epochs=which, methods=methods, todo=[],
                             done=[], current=None, detail=None, error=None,
                             finished_ts=time.time())
    now = time.time()
    st = _write_status(run_dir, state="queued", epochs=which, methods=methods, todo=todo,
                       done=[], current=None, detail=None, error=None, queued_ts=now,
                       seed=int(seed), pid=None)
    q = _queue(run_dir.parent)
    q.mkdir(exist_ok=True)
    atomic_write_json(q / f"{run.id}.json", {"run": str(run_dir), "epochs": epochs,
                                             "seed": int(seed), "queued_ts": now,
                                             "attempts": 0})
    start_drainer(run_dir.parent, log=q / "log")
    return st


def start_drainer(runs_root: str | os.PathLike, log: str | os.PathLike | None = None
                  ) -> subprocess.Popen:
    """Start ``python -m dml.maps drain RUNS_ROOT``, detached (its own session: an interrupt of
    the terminal that trained does not stop it), output appended to ``log``."""
    from dml.paths import env_with_checkout

    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "dml.maps", "drain", str(runs_root)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env_with_checkout(), start_new_session=True,
                                close_fds=True)
    finally:
        if log is not None:
            out.close()


def _entries(q: Path) -> list[Path]:
    def queued(p: Path) -> float:
        try:
            return float(read_json(p).get("queued_ts", 0.0))
        except (OSError, ValueError, AttributeError):
            return 0.0

    return sorted((p for p in q.glob("*.json") if not p.name.startswith(".")),
                  key=lambda p: (queued(p), p.name))


def _make_maps(entry: dict[str, Any]) -> None:
    """Compute one queued run's maps, recording progress in its ``maps.json`` and its output in
    its ``maps.log``."""
    from dml.projection import precompute_projections

    run_dir = Path(entry["run"])
    if not (run_dir / "run.json").is_file():
        return                                 # the run was deleted while it waited
    st = _write_status(run_dir, state="running", pid=os.getpid(), started_ts=time.time(),
                       current=None, done=[], detail=None, error=None)
    done: list[str] = []
    last = [0.0]
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        def say(msg: str) -> None:
            log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            log.flush()

        def on_map(epoch: int, method: str) -> None:   # a map starts: the previous one is made
            if st.get("current"):
                done.append(st["current"])
            st["current"] = f"{method}:{epoch}"
            _write_status(run_dir, current=st["current"], done=list(done), detail=None)

        def progress(msg: str) -> None:                # within a map (UMAP's transform chunks)
            say(msg)
            if time.time() - last[0] >= 1.0:
                _write_status(run_dir, detail=msg.split(": ", 1)[-1])
                last[0] = time.time()

        t0 = time.perf_counter()
        try:
            precompute_projections(run_dir, entry.get("epochs", "best+last"),
                                   st.get("methods") or ("pca", "umap"),
                                   seed=int(entry.get("seed", 0)), progress=progress,
                                   on_map=on_map)
        except Exception as exc:   # a map is a convenience: say why, go on with the next run
            say(traceback.format_exc())
            _write_status(run_dir, state="failed", error=f"{type(exc).__name__}: {exc}",
                          current=None, finished_ts=time.time())
            return
        seconds = round(time.perf_counter() - t0, 2)
        _write_status(run_dir, state="done", done=list(st.get("todo") or []), current=None,
                      detail=None, finished_ts=time.time(), seconds=seconds)
        say(f"maps done in {seconds} s")


def drain(runs_root: str | os.PathLike) -> int:
    """Compute the maps of every queued run of ``runs_root``, unless another process is doing
    so. Returns the number of runs whose maps this process made."""
    q = _queue(Path(runs_root))
    q.mkdir(parents=True, exist_ok=True)
    from dml.projection import configure_numba_cache

    configure_numba_cache()
    n = 0
    while True:
        fd = os.open(q / "lock", os.O_RDONLY | os.O_CREAT, 0o666)   # flock needs no write access
        try:
            if not _lock(fd):
                return n                         # the drainer at work takes our entries
            while True:
                entries = _entries(q)
                if not entries:
                    break
                n += _take(entries[0])
        finally:
            os.close(fd)                         # drops the lock
        if not _entries(q):                      # an entry queued while we held the lock is
            return n                             # taken by the next round


def _lock(fd: int) -> bool:
    """Take the queue's lock, retrying for LOCK_TRIES_S (a status reader may hold it shared for
    an instant); False when another drainer holds it."""
    if fcntl is None:
        return True
    deadline = time.monotonic() + LOCK_TRIES_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _take(path: Path) -> int:
    """Make the maps of one queue entry and remove it (unless the run was queued again
    meanwhile). An entry whose process died on it MAX_ATTEMPTS times is marked failed and
    dropped, so that one run cannot block the queue. Returns 1 when maps were attempted."""
    try:
        entry = read_json(path)
    except (OSError, ValueError):
        entry = None
    made = 0
    if isinstance(entry, dict) and entry.get("run"):
        run_dir = Path(entry["run"])
        tries = int(entry.get("attempts", 0)) + 1
        try:
            if tries > MAX_ATTEMPTS:
                if (run_dir / "run.json").is_file():
                    _write_status(run_dir, state="failed", current=None,
                                  error=f"the map process stopped {MAX_ATTEMPTS} times on "
                                        f"this run; see {run_dir / LOG_FILE}",
                                  finished_ts=time.time())
            else:
                atomic_write_json(path, dict(entry, attempts=tries))   # before: a crash counts
                _make_maps(entry)
                made = 1
        except Exception:     # a run deleted mid-map, a full disk: never block the queue
            traceback.print_exc()
    try:
        now = read_json(path)
        if not isinstance(entry, dict) or now.get("queued_ts") == entry.get("queued_ts"):
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
    return made


def main(argv: list[str] | None = None) -> int:
    """``python -m dml.maps drain RUNS_ROOT``: the background map process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "drain":
        print("usage: python -m dml.maps drain RUNS_ROOT", file=sys.stderr)
        return 2
    if hasattr(os, "nice"):
        try:
            os.nice(NICE)
        except OSError:
            pass
    drain(argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
