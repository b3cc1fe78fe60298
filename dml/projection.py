"""2-D projections (UMAP, PCA) of an evaluation's embeddings, cached in the run directory.

For ``evals/epoch_NNNN.npz`` the projections live beside it::

    evals/epoch_NNNN.umap.npz     real points fitted by UMAP, synthetic points placed by
                                  ``reducer.transform`` (so they never move the real points)
    evals/epoch_NNNN.pca.npz      the same with PCA (plus its mean and components, so any new
                                  embedding can be placed exactly)

Each cache file holds one ``(n, 2)`` float32 array per split present in the evaluation
(``train``, ``val``, ``test``, ``gallery``), ``synthetic`` when the evaluation has synthetic
points, and ``meta`` (a JSON string: method, version, parameters and the size / mtime of the
evaluation file it was computed from; a cache whose source changed is ignored and recomputed).

UMAP's first fit in a new process spends a minute compiling numba code, so the trainer (or the
app's job runner) calls :func:`precompute_projections` when a run finishes, the app computes maps
in a separate low-priority process (:class:`ProjectionWorker`) that warms numba once the app has
been quiet for a few seconds (:func:`start_warmup`), and compiled code is cached on disk
(:func:`configure_numba_cache`). Imports neither torch nor umap at module level.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dml.atomic import atomic_save_npz
from dml.runs import Run

PROJECTION_VERSION = 1
METHODS = ("umap", "pca")
REAL_SPLITS = ("train", "val", "test", "gallery")
UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.1, "n_epochs": 200}


class ProjectionError(ValueError):
    """An evaluation that cannot be projected (no embeddings saved, unknown method)."""


# --------------------------------------------------------------------------- numba set-up

def default_numba_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tango" / "numba"


def configure_numba_cache() -> str:
    """Point numba's on-disk cache at a writable, persistent folder (unless NUMBA_CACHE_DIR is
    already set), so UMAP code compiled by one process is reused by the next. Call before numba
    is imported; returns the folder."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        d = default_numba_cache_dir()
        try:
            d.mkdir(parents=True, exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = str(d)
        except OSError:
            pass
    return os.environ.get("NUMBA_CACHE_DIR", "")


def umap_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def _import_umap():
    configure_numba_cache()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap  # noqa: PLC0415
    except ImportError as exc:
        raise ProjectionError("UMAP maps need umap-learn: pip install -e '.[app]' "
                              f"({exc})") from exc
    return umap


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


# --------------------------------------------------------------------------- the worker

def _worker_main(tasks, results, nice: int) -> None:
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
        except (EOFError, OSError):      # the server went away
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
    server and the browser (the worker runs ``nice``). A daemon process: it ends with the server.

    ``submit(run_dir, epoch, method)`` computes and caches a projection (as
    :func:`get_projection`) and returns a :class:`WorkerTask`; its result is the seconds spent.
    Every failure comes back as :class:`ProjectionError` (with the original exception's type and
    message), also when the worker process died."""

    def __init__(self, nice: int = 10, warm: bool = True):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")     # no fork of a threaded server
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_worker_main, args=(self._tasks, self._results, nice),
                                 name="tango-projection-worker", daemon=True)
        self._proc.start()
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
        return self._proc.is_alive()

    def _submit(self, kind: str, args: tuple) -> WorkerTask:
        task = WorkerTask(kind)
        with self._lock:
            if not self._proc.is_alive():
                task.set_exception(ProjectionError(self._died()))
                return task
            tid = next(self._ids)
            self._pending[tid] = task
        self._tasks.put((tid, kind, args))
        return task

    def submit(self, run_dir: str | os.PathLike, epoch: int, method: str,
               seed: int = 0) -> WorkerTask:
        if method not in METHODS:
            raise ProjectionError(f"unknown projection {method!r}; valid: {', '.join(METHODS)}")
        task = self._submit("project", (str(run_dir), int(epoch), method, int(seed)))
        task.method = method
        return task

    def _died(self) -> str:
        return (f"the projection worker process stopped (exit code {self._proc.exitcode}); "
                "try again: a new one starts")

    def _read(self) -> None:
        try:
            self._dispatch_results()
        finally:   # the worker died (killed, out of memory) or was closed: fail what it had
            with self._lock:
                pending, self._pending = self._pending, {}
            for task in pending.values():
                task.set_exception(ProjectionError(self._died()))

    def _dispatch_results(self) -> None:
        import queue

        while True:
            try:
                tid, what, value = self._results.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    return
                continue
            except (EOFError, OSError, ValueError):
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
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout)
        for q in (self._tasks, self._results):
            q.close()
            q.cancel_join_thread()


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
    when already started or when ``TANGO_NO_WARMUP`` is set. Returns the waiting thread
    (``cancel()`` stops it before it starts the worker)."""
    global _WARMUP
    if os.environ.get("TANGO_NO_WARMUP"):
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


# --------------------------------------------------------------------------- the math

def real_points(ev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Embeddings (n, D) float32 of each real split present in an evaluation, in split order."""
    return {s: np.asarray(ev[f"{s}_embeddings"], dtype=np.float32) for s in REAL_SPLITS
            if f"{s}_embeddings" in ev and len(ev[f"{s}_embeddings"])}


def synthetic_points(ev: dict[str, np.ndarray]) -> np.ndarray | None:
    e = ev.get("synthetic_embeddings")
    return None if e is None or not len(e) else np.asarray(e, dtype=np.float32)


def fit_pca(x: np.ndarray, dim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top ``dim`` principal directions (dim, D) of ``x`` (n, D), with a
    deterministic sign (largest-magnitude loading positive)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim]
    if comps.shape[0] < dim:   # fewer dimensions than asked: pad with zeros
        comps = np.vstack([comps, np.zeros((dim - comps.shape[0], x.shape[1]), x.dtype)])
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    return mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32)


def pca_transform(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, 2) with a fitted PCA (exact for any new point)."""
    return ((np.asarray(x, np.float32) - mean) @ components.T).astype(np.float32)


def _knn(queries: np.ndarray, refs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``dml.metrics.knn`` with float64 distances (UMAP's precomputed graph)."""
    from dml.metrics import knn  # noqa: PLC0415

    idx, dist = knn(queries, refs, k)
    return idx, dist.astype(np.float64)


def _sparse_distances(rows: np.ndarray, idx: np.ndarray, dist: np.ndarray, shape) -> Any:
    import scipy.sparse as sp  # noqa: PLC0415

    d = np.maximum(dist, 1e-8)          # a stored 0 would be dropped as "no edge"
    return sp.csr_matrix((d.ravel(), (np.repeat(rows, idx.shape[1]), idx.ravel())), shape=shape)


def knn_graph(x: np.ndarray, k: int) -> Any:
    """Symmetric sparse (n, n) matrix of exact k-nearest-neighbour distances (self excluded,
    zero diagonal), the precomputed input UMAP fits on."""
    n = len(x)
    idx, dist = _knn(x, x, min(k + 1, n))
    own = idx == np.arange(n)[:, None]
    # drop each row's own entry (or, for exact duplicates that displaced it, the farthest one)
    drop = np.where(own.any(axis=1), own.argmax(axis=1), idx.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    idx = idx[keep].reshape(n, -1)
    dist = dist[keep].reshape(n, -1)
    g = _sparse_distances(np.arange(n), idx, dist, (n, n))
    g = g.maximum(g.T).tocsr()
    g.setdiag(0)
    g.eliminate_zeros()
    return g


class UmapMap:
    """A UMAP map fitted on exact k-nearest-neighbour distances (faiss), so neither the fit nor
    ``transform`` pays for approximate-neighbour search. ``embedding`` (n, 2) are the fitted
    points; ``transform(x)`` places new points without moving them."""

    def __init__(self, x: np.ndarray, seed: int = 0, **params):
        umap = _import_umap()
        p = dict(UMAP_DEFAULTS, **params)
        p.pop("metric", None)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(self.x)
        if n < 3:
            raise ProjectionError(f"UMAP needs at least 3 points, got {n}")
        self.k = max(2, min(int(p.pop("n_neighbors")), n - 1))
        self.reducer = umap.UMAP(n_components=2, n_neighbors=self.k, metric="precomputed",
                                 random_state=seed, **p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.reducer.fit(knn_graph(self.x, self.k))
        self.embedding = np.asarray(self.reducer.embedding_, np.float32)

    def transform(self, x_new: np.ndarray) -> np.ndarray:
        x_new = np.asarray(x_new, np.float32)
        if not len(x_new):
            return np.zeros((0, 2), np.float32)
        idx, dist = _knn(x_new, self.x, self.k)
        m = _sparse_distances(np.arange(len(x_new)), idx, dist, (len(x_new), len(self.x)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self.reducer.transform(m), np.float32)


def fit_umap(x: np.ndarray, seed: int = 0, **params) -> UmapMap:
    """A UMAP map of ``x`` (n, D), deterministic for a seed."""
    return UmapMap(x, seed=seed, **params)


def umap_transform(fitted: UmapMap, x: np.ndarray) -> np.ndarray:
    """Place new points (n, D) into a fitted map without moving the fitted points."""
    return fitted.transform(x)


def knn_place(x_new: np.ndarray, x_ref: np.ndarray, coords_ref: np.ndarray,
              k: int = 10) -> np.ndarray:
    """Place new points (m, D) on an existing map at the similarity-weighted mean of the map
    positions of their ``k`` nearest reference points (n, D) -> (m, 2). This is UMAP's own
    initialisation for ``transform``; it needs no fitted reducer, so it is instant."""
    nn, dn = _knn(x_new, x_ref, max(1, min(k, len(x_ref))))
    rho = dn.min(axis=1, keepdims=True)                       # UMAP's local connectivity
    sigma = (dn - rho).mean(axis=1, keepdims=True) + 1e-6
    w = np.exp(-(dn - rho) / sigma)
    w /= w.sum(axis=1, keepdims=True)
    return (coords_ref[nn] * w[..., None]).sum(axis=1).astype(np.float32)


def compute_projection(ev: dict[str, np.ndarray], method: str, seed: int = 0,
                       progress: Callable[[str], None] | None = None,
                       **params) -> dict[str, np.ndarray]:
    """Project one evaluation: fit on all real points, place synthetic points into that map.

    Returns ``{split: (n, 2) float32}`` for each real split, ``synthetic`` (S, 2) if any, and
    for PCA ``pca_mean`` (D,) and ``pca_components`` (2, D).
    """
    if method not in METHODS:
        raise ProjectionError(f"unknown projection {method!r}; valid: {', '.join(METHODS)}")
    real = real_points(ev)
    if not real:
        raise ProjectionError("this evaluation has no saved embeddings "
                              "(train.save_embeddings was false)")
    x = np.concatenate(list(real.values()))
    syn = synthetic_points(ev)
    say = progress or (lambda msg: None)
    out: dict[str, np.ndarray] = {}
    if method == "pca":
        mean, comps = fit_pca(x)
        coords = pca_transform(x, mean, comps)
        out.update(pca_mean=mean, pca_components=comps)
        if syn is not None:
            out["synthetic"] = pca_transform(syn, mean, comps)
    else:
        say(f"fitting UMAP on {len(x):,} real points")
        fitted = fit_umap(x, seed=seed, **params)
        coords = fitted.embedding
        if syn is not None:
            say(f"placing {len(syn):,} synthetic points with transform")
            out["synthetic"] = fitted.transform(syn)
    start = 0
    for split, e in real.items():
        out[split] = coords[start:start + len(e)]
        start += len(e)
    return out


# --------------------------------------------------------------------------- the cache

def projection_path(run_dir: str | os.PathLike, epoch: int, method: str) -> Path:
    return Path(run_dir) / "evals" / f"epoch_{int(epoch):04d}.{method}.npz"


def _source_fingerprint(eval_file: Path) -> dict[str, int]:
    st = eval_file.stat()
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def load_projection(run_dir: str | os.PathLike, epoch: int,
                    method: str) -> dict[str, np.ndarray] | None:
    """The cached projection, or None when missing, unreadable, of another format version or
    computed from an evaluation file that has since changed."""
    p = projection_path(run_dir, epoch, method)
    src = Run(run_dir).eval_path(epoch)
    if not p.is_file() or not src.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data.pop("meta")))
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("version") != PROJECTION_VERSION or meta.get("method") != method:
        return None
    if {k: meta.get(k) for k in ("source_size", "source_mtime_ns")} != _source_fingerprint(src):
        return None
    data["meta"] = meta
    return data


def save_projection(run_dir: str | os.PathLike, epoch: int, method: str,
                    proj: dict[str, np.ndarray], seed: int = 0, seconds: float | None = None,
                    **params) -> Path:
    src = Run(run_dir).eval_path(epoch)
    meta = {"method": method, "version": PROJECTION_VERSION, "seed": seed,
            "params": dict(UMAP_DEFAULTS, **params) if method == "umap" else {},
            "seconds": seconds, **_source_fingerprint(src)}
    arrays = {k: v for k, v in proj.items() if k != "meta"}
    p = projection_path(run_dir, epoch, method)
    atomic_save_npz(p, meta=np.array(json.dumps(meta)), **arrays)
    return p


def get_projection(run_dir: str | os.PathLike, epoch: int, method: str, *,
                   compute: bool = True, ev: dict[str, np.ndarray] | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray] | None:
    """The cached projection; when missing and ``compute``, compute it, cache it, return it."""
    cached = load_projection(run_dir, epoch, method)
    if cached is not None or not compute:
        return cached
    if ev is None:
        ev = Run(run_dir).load_eval(epoch)
    t0 = time.perf_counter()
    proj = compute_projection(ev, method, seed=seed, progress=progress)
    save_projection(run_dir, epoch, method, proj, seed=seed,
                    seconds=round(time.perf_counter() - t0, 2))
    return load_projection(run_dir, epoch, method) or proj


def best_epoch(run: Run) -> int | None:
    best = (run.status().get("best") or {}).get("epoch")
    epochs = run.eval_epochs()
    if best in epochs:
        return best
    return epochs[-1] if epochs else None


def resolve_epochs(run: Run, epochs: str | int | Iterable[int] = "best+last") -> list[int]:
    """Evaluation epochs named by ``"best+last"``, ``"best"``, ``"last"``, ``"all"``, an int or a
    list (only epochs that have an evaluation file)."""
    have = run.eval_epochs()
    if not have:
        return []
    if isinstance(epochs, str):
        want: list[int] = []
        for part in epochs.split("+"):
            part = part.strip()
            if part == "all":
                want += have
            elif part == "last":
                want.append(have[-1])
            elif part == "best":
                b = best_epoch(run)
                if b is not None:
                    want.append(b)
            else:
                want.append(int(part))
    elif isinstance(epochs, int):
        want = [epochs]
    else:
        want = [int(e) for e in epochs]
    return sorted({e for e in want if e in have})


def precompute_projections(run_dir: str | os.PathLike, epochs: str | int | Iterable[int] =
                           "best+last", methods: Iterable[str] = ("pca", "umap"), seed: int = 0,
                           progress: Callable[[str], None] | None = None) -> list[Path]:
    """Compute and cache the projections of a run's evaluations (missing ones only).

    The trainer calls this at the end of training so that the app's embedding explorer opens
    instantly. Returns the cache files (existing or new)."""
    run = Run(run_dir)
    methods = [m for m in methods if m != "umap" or umap_available()]   # umap-learn: optional
    out = []
    for epoch in resolve_epochs(run, epochs):
        ev = None
        for method in methods:
            if load_projection(run.path, epoch, method) is None:
                if ev is None:
                    ev = run.load_eval(epoch)
                if not real_points(ev):
                    break
                if progress:
                    progress(f"{run.id}: {method} of epoch {epoch}")
                get_projection(run.path, epoch, method, ev=ev, seed=seed)
            out.append(projection_path(run.path, epoch, method))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dml.projection RUN_DIR [--epochs best+last] [--methods pca,umap]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dml.projection",
                                 description="precompute the app's 2-D maps of a run")
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--epochs", default="best+last", help="best+last (default), all, last, 3")
    ap.add_argument("--methods", default="pca,umap")
    args = ap.parse_args(argv)
    for r in args.runs:
        t0 = time.perf_counter()
        files = precompute_projections(r, args.epochs, args.methods.split(","),
                                       progress=lambda m: print(m, flush=True))
        print(f"{r}: {len(files)} projection(s) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
