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

Large evaluations: UMAP is fitted on a seeded subsample of at most ``fit_max`` real points
(stratified by split and class; default :data:`DEFAULT_FIT_MAX`, a run's own
``train.map_fit_max`` when its config has one) and every other point, real or synthetic, is placed
into that map with ``transform`` in chunks of :data:`TRANSFORM_CHUNK`; the fitted points never
move. Runs at most ``fit_max`` real points are fitted on all of them, as before. PCA is exact on
every point at any size (a D x D covariance, not an SVD of the points).

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
from dml.runs import EVAL_SPLITS, Run

PROJECTION_VERSION = 1
METHODS = ("umap", "pca")
REAL_SPLITS = EVAL_SPLITS
UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.1, "n_epochs": 200}
# UMAP is fitted on at most this many real points; the rest are placed with ``transform``. A
# run's config may set its own (``train.map_fit_max``; None or 0: fit on every point).
DEFAULT_FIT_MAX = 10_000
FIT_MAX_KEY = "map_fit_max"          # train.map_fit_max in a run's config
TRANSFORM_CHUNK = 8_192              # points placed per ``transform`` call (progress between)


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
    x = np.asarray(x)
    mean = x.mean(axis=0, dtype=np.float64)
    if len(x) > 4 * x.shape[1]:   # many points: a D x D covariance (an SVD of 100k x 512
        # took 58 s on 2 shared cores; this takes about 1 s)
        cov = np.zeros((x.shape[1], x.shape[1]))
        for start in range(0, len(x), 16_384):
            c = x[start:start + 16_384].astype(np.float64) - mean
            cov += c.T @ c
        vals, vecs = np.linalg.eigh(cov)
        comps = vecs[:, np.argsort(vals)[::-1][:dim]].T
    else:
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

    def transform(self, x_new: np.ndarray, chunk: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Place new points (m, D) into the map without moving the fitted ones -> (m, 2), in
        chunks of ``chunk`` points (default :data:`TRANSFORM_CHUNK`; ``progress(done, m)``
        after each). The result depends on the chunk size only through UMAP's per-call random
        state, so a fixed chunk size keeps maps reproducible."""
        x_new = np.asarray(x_new, np.float32)
        if not len(x_new):
            return np.zeros((0, 2), np.float32)
        chunk = max(1, int(chunk or TRANSFORM_CHUNK))
        out = []
        for start in range(0, len(x_new), chunk):
            part = x_new[start:start + chunk]
            idx, dist = _knn(part, self.x, self.k)
            out.append(self._transform_knn(idx, dist))
            if progress:
                progress(start + len(part), len(x_new))
        return np.concatenate(out).astype(np.float32)

    def _transform_knn(self, idx: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """``reducer.transform`` of points given by their k nearest fitted points: the same
        steps as umap-learn's own (membership strengths, initialisation at the weighted mean,
        then its layout optimisation of the new points only), without its per-row Python loop
        over a sparse distance matrix (a third of the time). Falls back to
        ``reducer.transform`` where umap-learn's internals differ."""
        try:
            return _umap_transform_from_knn(self.reducer, idx, dist)
        except (ImportError, AttributeError, TypeError):   # another umap-learn version
            m = _sparse_distances(np.arange(len(idx)), idx, dist, (len(idx), len(self.x)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(self.reducer.transform(m), np.float32)

    def transform_reference(self, x_new: np.ndarray) -> np.ndarray:
        """umap-learn's own ``transform`` (one call, sparse precomputed distances): the
        reference :meth:`transform` reproduces."""
        x_new = np.asarray(x_new, np.float32)
        idx, dist = _knn(x_new, self.x, self.k)
        m = _sparse_distances(np.arange(len(x_new)), idx, dist, (len(x_new), len(self.x)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self.reducer.transform(m), np.float32)


def _umap_transform_from_knn(reducer, idx: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """umap-learn 0.5's ``UMAP.transform`` for a precomputed metric, from the k nearest fitted
    points of each new point (sorted, nearest first) instead of a sparse distance matrix."""
    import scipy.sparse as sp  # noqa: PLC0415
    from sklearn.utils import check_random_state  # noqa: PLC0415
    from umap.layouts import optimize_layout_euclidean  # noqa: PLC0415
    from umap.umap_ import (INT32_MAX, INT32_MIN, compute_membership_strengths,  # noqa: PLC0415
                            init_graph_transform, make_epochs_per_sample, smooth_knn_dist)

    if reducer.output_metric != "euclidean" or reducer.densmap:
        raise TypeError("only umap-learn's euclidean output is reproduced here")
    k = int(reducer._n_neighbors)
    n_new, n_fit = len(idx), reducer.embedding_.shape[0]
    rng_state = check_random_state(reducer.transform_seed).randint(
        INT32_MIN, INT32_MAX, 3).astype(np.int64)
    indices = np.ascontiguousarray(idx[:, :k], dtype=np.int32)
    dists = np.ascontiguousarray(np.maximum(dist[:, :k], 1e-8), dtype=np.float32)
    indices[dists >= reducer._disconnection_distance] = -1
    sigmas, rhos = smooth_knn_dist(dists, float(k), local_connectivity=float(
        max(0.0, reducer.local_connectivity - 1.0)))
    rows, cols, vals = compute_membership_strengths(indices, dists, sigmas, rhos,
                                                    bipartite=True)[:3]
    graph = sp.coo_matrix((vals, (rows, cols)), shape=(n_new, n_fit))
    csr = graph.tocsr()
    csr.eliminate_zeros()
    embedding = init_graph_transform(csr, reducer.embedding_)
    if reducer.n_epochs is None:
        n_epochs = 100 if graph.shape[0] <= 10000 else 30
    else:
        n_epochs = int(reducer.n_epochs // 3.0)
    graph.data[graph.data < (graph.data.max() / float(n_epochs))] = 0.0
    graph.eliminate_zeros()
    epochs_per_sample = make_epochs_per_sample(graph.data, n_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = optimize_layout_euclidean(
            embedding, reducer.embedding_.astype(np.float32, copy=True), graph.row, graph.col,
            n_epochs, n_fit, epochs_per_sample, reducer._a, reducer._b, rng_state,
            reducer.repulsion_strength, reducer._initial_alpha / 4.0,
            reducer.negative_sample_rate, reducer.random_state is None)
    return np.asarray(out, np.float32)


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


def fit_subsample(groups: np.ndarray, fit_max: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of a seeded subsample of at most ``fit_max`` points, stratified by
    ``groups`` (n,) (split and class): each group keeps its share, rounded by largest remainder,
    and at least one point while there is room. None when every point fits (``fit_max`` None or
    0, or not smaller than n)."""
    groups = np.asarray(groups)
    n = len(groups)
    if not fit_max or n <= fit_max:
        return None
    fit_max = int(fit_max)
    from dml.stats import stratified_quota

    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    quota = stratified_quota(counts, fit_max)
    rng = np.random.default_rng([int(seed), 0x4D4150])
    # a random rank within each group; keep the ranks below the group's quota
    perm = rng.permutation(n)
    order = perm[np.argsort(inverse[perm], kind="stable")]     # grouped, random within group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    return np.flatnonzero(rank < quota[inverse])


def fit_groups(ev: dict[str, np.ndarray]) -> np.ndarray:
    """(split, class) of every real point, in :func:`real_points` order, as one integer each:
    the strata of UMAP's fit subsample."""
    parts = []
    for i, s in enumerate(REAL_SPLITS):
        n = len(ev[f"{s}_embeddings"]) if f"{s}_embeddings" in ev else 0
        if n:
            y = ev.get(f"{s}_labels")
            y = np.asarray(y, np.int64) if y is not None and len(y) == n else np.zeros(n, np.int64)
            parts.append(y + (i << 40))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def run_fit_max(run_dir: str | os.PathLike | None) -> int | None:
    """The UMAP fit size of a run: its config's ``train.map_fit_max`` when set (0 or null: every
    point), else :data:`DEFAULT_FIT_MAX`."""
    if run_dir is not None:
        try:
            train = (Run(run_dir).config() or {}).get("train") or {}
        except Exception:   # an unreadable config: the default
            train = {}
        if FIT_MAX_KEY in train:
            v = train[FIT_MAX_KEY]
            return int(v) if v else None
    return DEFAULT_FIT_MAX


def compute_projection(ev: dict[str, np.ndarray], method: str, seed: int = 0,
                       progress: Callable[[str], None] | None = None,
                       fit_max: int | None = DEFAULT_FIT_MAX,
                       stats: dict[str, Any] | None = None,
                       **params) -> dict[str, np.ndarray]:
    """Project one evaluation: fit on the real points (UMAP: on a stratified subsample of at
    most ``fit_max`` of them, the others placed with ``transform``; ``fit_max`` None or 0: on
    all), place synthetic points into that map.

    Returns ``{split: (n, 2) float32}`` for each real split, ``synthetic`` (S, 2) if any, and
    for PCA ``pca_mean`` (D,) and ``pca_components`` (2, D). ``stats``, when given, receives
    what it cost: ``fit_points``, ``fit_s``, ``transform_points``, ``transform_s`` and
    ``transform_s_per_10k``.
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
    info: dict[str, Any] = stats if stats is not None else {}
    out: dict[str, np.ndarray] = {}
    if method == "pca":
        t0 = time.perf_counter()
        mean, comps = fit_pca(x)
        coords = pca_transform(x, mean, comps)
        out.update(pca_mean=mean, pca_components=comps)
        if syn is not None:
            out["synthetic"] = pca_transform(syn, mean, comps)
        info.update(fit_points=len(x), fit_s=round(time.perf_counter() - t0, 3))
    else:
        fit_idx = fit_subsample(fit_groups(ev), fit_max, seed)
        t0 = time.perf_counter()
        if fit_idx is None:
            say(f"fitting UMAP on {len(x):,} real points")
            fitted = fit_umap(x, seed=seed, **params)
            coords = fitted.embedding
            info.update(fit_points=len(x), fit_s=round(time.perf_counter() - t0, 3))
            place = np.zeros(0, np.int64)
        else:
            say(f"fitting UMAP on {len(fit_idx):,} of {len(x):,} real points "
                f"(a stratified subsample; fit size {fit_max:,})")
            fitted = fit_umap(x[fit_idx], seed=seed, **params)
            info.update(fit_points=len(fit_idx), fit_s=round(time.perf_counter() - t0, 3))
            coords = np.zeros((len(x), 2), np.float32)
            coords[fit_idx] = fitted.embedding
            keep = np.ones(len(x), bool)
            keep[fit_idx] = False
            place = np.flatnonzero(keep)
        n_place = len(place) + (len(syn) if syn is not None else 0)
        t1 = time.perf_counter()

        def placed(done, total, what):   # between chunks only (none after the last)
            if done < total:
                rate = (time.perf_counter() - t1) / done * 10_000
                say(f"placing {what} with transform: {done:,} / {total:,} "
                    f"({rate:.1f} s per 10k points)")

        if len(place):
            say(f"placing the other {len(place):,} real points with transform")
            coords[place] = fitted.transform(
                x[place], progress=lambda d, t: placed(d, t, "the other real points"))
        if syn is not None:
            say(f"placing {len(syn):,} synthetic points with transform")
            out["synthetic"] = fitted.transform(
                syn, progress=lambda d, t: placed(d, t, "synthetic points"))
        spent = time.perf_counter() - t1
        info.update(transform_points=n_place, transform_s=round(spent, 3),
                    transform_s_per_10k=round(spent / n_place * 10_000, 3) if n_place else None)
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
                    stats: dict[str, Any] | None = None, **params) -> Path:
    """Cache a projection; ``stats`` (what :func:`compute_projection` reports: fit size,
    seconds per 10k points placed) go into its meta."""
    src = Run(run_dir).eval_path(epoch)
    meta = {"method": method, "version": PROJECTION_VERSION, "seed": seed,
            "params": dict(UMAP_DEFAULTS, **params) if method == "umap" else {},
            "seconds": seconds, **(stats or {}), **_source_fingerprint(src)}
    arrays = {k: v for k, v in proj.items() if k != "meta"}
    p = projection_path(run_dir, epoch, method)
    atomic_save_npz(p, meta=np.array(json.dumps(meta)), **arrays)
    return p


def get_projection(run_dir: str | os.PathLike, epoch: int, method: str, *,
                   compute: bool = True, ev: dict[str, np.ndarray] | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None,
                   fit_max: int | None | str = "run") -> dict[str, np.ndarray] | None:
    """The cached projection; when missing and ``compute``, compute it, cache it, return it.
    ``fit_max``: UMAP's fit size (see :func:`compute_projection`); ``"run"``: the run's
    ``train.map_fit_max``, else :data:`DEFAULT_FIT_MAX`."""
    cached = load_projection(run_dir, epoch, method)
    if cached is not None or not compute:
        return cached
    if ev is None:
        ev = Run(run_dir).load_eval(epoch)
    if fit_max == "run":
        fit_max = run_fit_max(run_dir)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"fit_max": fit_max}
    proj = compute_projection(ev, method, seed=seed, progress=progress, fit_max=fit_max,
                              stats=stats)
    save_projection(run_dir, epoch, method, proj, seed=seed,
                    seconds=round(time.perf_counter() - t0, 2), stats=stats)
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
                           progress: Callable[[str], None] | None = None,
                           fit_max: int | None | str = "run",
                           on_map: Callable[[int, str], None] | None = None) -> list[Path]:
    """Compute and cache the projections of a run's evaluations (missing ones only).

    The trainer calls this at the end of training so that the app's embedding explorer opens
    instantly. ``fit_max``: UMAP's fit size (``"run"``: the run's ``train.map_fit_max``, else
    :data:`DEFAULT_FIT_MAX`; None or 0: every point). ``on_map(epoch, method)`` is called
    before each map that is computed. Returns the cache files (existing or new)."""
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
                if on_map:
                    on_map(epoch, method)
                if progress:
                    progress(f"{run.id}: {method} of epoch {epoch}")
                get_projection(run.path, epoch, method, ev=ev, seed=seed, fit_max=fit_max,
                               progress=progress)
            out.append(projection_path(run.path, epoch, method))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dml.projection RUN_DIR [--epochs best+last] [--methods pca,umap]
    [--fit-max N]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dml.projection",
                                 description="precompute the app's 2-D maps of a run")
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--epochs", default="best+last", help="best+last (default), all, last, 3")
    ap.add_argument("--methods", default="pca,umap")
    ap.add_argument("--fit-max", type=int, default=None,
                    help="fit UMAP on at most this many real points, place the rest with "
                         "transform (default: the run's train.map_fit_max, else "
                         f"{DEFAULT_FIT_MAX:,}; 0: every point)")
    args = ap.parse_args(argv)
    for r in args.runs:
        t0 = time.perf_counter()
        files = precompute_projections(r, args.epochs, args.methods.split(","),
                                       progress=lambda m: print(m, flush=True),
                                       fit_max="run" if args.fit_max is None else args.fit_max)
        print(f"{r}: {len(files)} projection(s) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
