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
app's job runner) calls :func:`precompute_projections` when a run finishes, compiled code is
cached on disk (:func:`configure_numba_cache`), and the app computes maps in its own
low-priority process (``app/projection_worker.py``). Imports neither torch nor umap at module
level.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dml.atomic import atomic_save_npz
from dml.paths import user_cache_dir
from dml.runs import Run

PROJECTION_VERSION = 1
METHODS = ("umap", "pca")
REAL_SPLITS = ("train", "val", "test", "gallery")
UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.1, "n_epochs": 200}


class ProjectionError(ValueError):
    """An evaluation that cannot be projected (no embeddings saved, unknown method)."""


# --------------------------------------------------------------------------- numba set-up

def default_numba_cache_dir() -> Path:
    return user_cache_dir("numba")


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
