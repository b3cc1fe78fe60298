"""Aligned 2-D maps of a run's evaluations: the embedding space through time.

One split's real points (the same data-set images at every evaluation, e.g. the test split or
the training subsample) are drawn at every evaluation in one common frame, so an epoch slider
shows the *same* points moving; the synthetic points of each evaluation are placed in that
evaluation's frame. Two runs of the same data set (a baseline and Metrix of one seed) are made
comparable by aligning the second run's frames onto the first's (:func:`align_to`).

The method: each evaluation is projected on its own and then aligned to the previous frame by
a similarity transform found by orthogonal Procrustes (rotation or reflection, one scale that
keeps the frame's spread, a shift), on the points both frames share:

``umap``  UMAP fitted on the evaluation's points (exact k-nearest-neighbour graph, as
          ``dml.projection``), its layout *initialised from the previous aligned frame* with a
          small learning rate (FOLLOW_LEARNING_RATE), so that clusters keep their places unless
          the embedding moved them; synthetic points placed by that fit's ``transform`` (they
          never move the real points).
``pca``   the evaluation's top two principal directions (instant); synthetic points through the
          same linear map.

Measured on two 6-epoch Omniglot runs (1,580-2,740 points a frame, 500 synthetic; two shared
CPU cores; mean distance a point moves between frames, in units of the frame's spread; share of
each evaluation's 10 nearest neighbours kept on the map): umap-learn's ``AlignedUMAP`` (relations
the identity) moves points 0.11-0.16 and keeps 0.45-0.53 of the neighbours but takes 90-190 s,
cannot add one evaluation without refitting all of them and has no ``transform`` for synthetic
points; this module's UMAP moves them 0.16-0.25, keeps 0.46-0.56, in 5-7 s (UMAP per evaluation
without the initialisation: 0.40-0.57; PCA: 0.37-0.44 moved, 0.10-0.14 kept, instant).

Either way a new evaluation only needs its own fit and one Procrustes against the last frame,
so a run that is still training extends the cache frame by frame.

Cache: ``<run>/evals/timeline.<split>.<method>.npz`` (beside the maps of ``dml.projection``,
written atomically), holding

    epochs           (E,) int     the evaluations, in order
    index            (n,) int     data-set indices of the points (``train_index`` for a
                                  training subsample, else the row in the split)
    label            (n,) int     their classes
    frames           (E, n, 2)    aligned coordinates, float32
    syn_offsets      (E + 1,)     synthetic points of frame i: rows syn_offsets[i]:[i + 1]
    syn_xy           (S, 2)       their coordinates in their frame
    syn_row          (S,)         their row in the evaluation's ``synthetic_*`` arrays
    syn_parent_class (S, 2)       their parents' classes (-1 unknown)
    syn_weight       (S,)         the weight of parent 0 (NaN for a reflection)
    syn_kind         (S,)         the strategy's kind of point
    syn_total        (E,)         synthetic points of each evaluation before the cap
    meta             JSON         version, method, split, parameters, and per epoch the size and
                                  mtime of the evaluation file the frame was computed from

A cache whose evaluations are all unchanged and still present, in order, is extended by the
evaluations that landed since (frames already cached are kept as they are); any other change
(a rewritten or removed evaluation, other parameters) recomputes it. Points: those present at
every evaluation, at most ``max_points`` of them (a seeded sample by data-set index, so two runs
with the same indices sample the same images). Imports neither torch nor umap at module level.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dml.atomic import atomic_save_npz
from dml.projection import UMAP_DEFAULTS
from dml.runs import EVAL_SPLITS, Run, upgrade_eval

TIMELINE_VERSION = 1
METHODS = ("umap", "pca")
SPLITS = EVAL_SPLITS
DEFAULT_MAX_POINTS = 2000        # real points per frame (a seeded sample beyond this)
DEFAULT_MAX_SYNTHETIC = 500      # synthetic points per frame
INIT_SPAN = 10.0                 # UMAP's own initial layouts span [0, 10]; a frame given as
                                 # the initial layout is scaled to that
FOLLOW_LEARNING_RATE = 0.05      # UMAP's learning rate for a fit that starts from the previous
                                 # frame (1 for the first): measured on Omniglot, 1,580-2,740
                                 # points x 6 evaluations, it moves points 0.16-0.25 (spread 1)
                                 # between frames instead of 0.26-0.43 with 1, and keeps more of
                                 # each evaluation's 10 nearest neighbours (0.46-0.56 vs 0.44-0.53)

Progress = Callable[[str], None]


class AlignmentError(ValueError):
    """A run whose evaluations cannot be drawn through time (no saved embeddings of the split,
    too few points shared by its evaluations, unknown method)."""


# --------------------------------------------------------------------------- similarity maps

@dataclass(frozen=True)
class Similarity:
    """``y = scale * (x - src_mean) @ rotation + dst_mean`` for points x (n, 2): a rotation or
    reflection, a uniform scale and a shift."""

    rotation: np.ndarray
    scale: float
    src_mean: np.ndarray
    dst_mean: np.ndarray

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        return (self.scale * (xy - self.src_mean) @ self.rotation + self.dst_mean
                ).astype(np.float32)

    @classmethod
    def identity(cls) -> "Similarity":
        return cls(np.eye(2), 1.0, np.zeros(2), np.zeros(2))


def _spread(x: np.ndarray) -> float:
    """Root mean square distance of the points to their mean."""
    return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean())) if len(x) else 0.0


def fit_similarity(src: np.ndarray, dst: np.ndarray, keep_spread: bool = True) -> Similarity:
    """The similarity transform that best maps ``src`` (n, 2) onto ``dst`` (n, 2), point i to
    point i: the rotation (or reflection) of orthogonal Procrustes on the centred points, and
    the scale that gives the mapped points ``dst``'s spread (``keep_spread``; the least-squares
    scale instead shrinks a poorly matching frame, and along a chain of frames the map would
    shrink epoch after epoch)."""
    from scipy.linalg import orthogonal_procrustes

    a = np.asarray(src, np.float64).reshape(-1, 2)
    b = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(a) != len(b):
        raise ValueError(f"fit_similarity needs matching points, got {len(a)} and {len(b)}")
    if not len(a):
        return Similarity.identity()
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - ma, b - mb
    na, nb = _spread(a), _spread(b)
    if na == 0 or nb == 0:
        return Similarity(np.eye(2), 1.0, ma, mb)
    r, s = orthogonal_procrustes(ac, bc)
    scale = nb / na if keep_spread else s / float((ac ** 2).sum())
    return Similarity(r, float(scale), ma, mb)


def normalizing_similarity(xy: np.ndarray) -> Similarity:
    """Centre the points at 0 with a spread (RMS radius) of 1: the first frame's scale."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    s = _spread(xy)
    return Similarity(np.eye(2), 1.0 / s if s > 0 else 1.0, xy.mean(axis=0) if len(xy)
                      else np.zeros(2), np.zeros(2))


def displacement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance a point moves between two frames (n, 2), relative to the frames' spread
    (0: it stays put; ~1.4: unrelated layouts of the same spread)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    spread = max((_spread(a) + _spread(b)) / 2, 1e-12)
    return float(np.linalg.norm(a - b, axis=1).mean() / spread)


# --------------------------------------------------------------------------- reading evaluations

def split_index(ev: dict[str, np.ndarray], split: str) -> np.ndarray | None:
    """Data-set indices of the rows of ``split`` in an evaluation (None without embeddings):
    the training subsample's ``train_index`` where the npz has one, else the row numbers."""
    e = ev.get(f"{split}_embeddings")
    if e is None or not len(e):
        return None
    if split == "train" and "train_index" in ev and len(ev["train_index"]) == len(e):
        return np.asarray(ev["train_index"], np.int64)
    return np.arange(len(e), dtype=np.int64)


def _read(path: Path, split: str, synthetic: bool = True) -> dict[str, np.ndarray]:
    """The arrays of an evaluation npz that a timeline uses (not the memberships, images...)."""
    keys = {f"{split}_embeddings", f"{split}_labels", "train_index", "train_labels",
            "probe_index", "probe_labels"}
    with np.load(path, allow_pickle=False) as z:
        have = set(z.files)
        if synthetic:
            keys |= {k for k in have if k.startswith("synthetic_") and k not in
                     ("synthetic_membership", "synthetic_images", "synthetic_hardest")}
        ev = {k: z[k] for k in keys & have}
    return upgrade_eval(ev)


def split_epochs(run: Run, split: str) -> list[int]:
    """The evaluations of ``run`` that saved embeddings of ``split``."""
    out = []
    for e in run.eval_epochs():
        try:
            with np.load(run.eval_path(e), allow_pickle=False) as z:
                if f"{split}_embeddings" in z.files and len(z[f"{split}_labels"]):
                    out.append(e)
        except (OSError, ValueError, KeyError):
            continue
    return out


def available_splits(run: Run) -> list[str]:
    """Splits with saved embeddings in the run's last evaluation, in SPLITS order."""
    epochs = run.eval_epochs()
    if not epochs:
        return []
    try:
        with np.load(run.eval_path(epochs[-1]), allow_pickle=False) as z:
            return [s for s in SPLITS if f"{s}_embeddings" in z.files
                    and len(z[f"{s}_labels"])]
    except (OSError, ValueError):
        return []


def _parent_classes(ev: dict[str, np.ndarray], n: int) -> np.ndarray:
    from dml.export.projector import _parent_classes as parent_classes   # the export's rules

    parents = ev.get("synthetic_parents")
    if parents is None:
        top = ev.get("synthetic_top_classes")
        return (np.asarray(top, np.int64).reshape(n, 2) if top is not None
                else np.full((n, 2), -1, np.int64))
    parents = np.asarray(parents, np.int64).reshape(n, 2)
    probe = ev.get("probe_index")
    fits = probe is not None and n and parents.min() >= 0 and parents.max() < len(probe)
    return parent_classes(ev, parents, np.asarray(probe, np.int64)[parents] if fits else None)


def choose_points(indices: Sequence[np.ndarray], max_points: int | None = DEFAULT_MAX_POINTS,
                  seed: int = 0) -> np.ndarray:
    """Data-set indices present in every one of ``indices`` (sorted), at most ``max_points``
    of them: a sample seeded by ``seed`` and drawn from the sorted indices, so runs whose
    evaluations hold the same images sample the same ones."""
    common = None
    for idx in indices:
        idx = np.unique(np.asarray(idx, np.int64))
        common = idx if common is None else np.intersect1d(common, idx, assume_unique=True)
    if common is None:
        return np.zeros(0, np.int64)
    if max_points is not None and len(common) > max_points:
        rng = np.random.default_rng([int(seed), 0x71E])
        common = np.sort(rng.choice(common, size=int(max_points), replace=False))
    return common


def _rows_of(index: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``index`` (data-set indices of an evaluation's split) holding ``wanted``."""
    order = np.argsort(index, kind="stable")
    pos = np.searchsorted(index[order], wanted)
    pos = np.clip(pos, 0, len(index) - 1)
    rows = order[pos]
    if len(wanted) and not np.array_equal(index[rows], wanted):
        raise AlignmentError("an evaluation lacks some of the timeline's points")
    return rows


def _synthetic_rows(n: int, cap: int | None, epoch: int) -> np.ndarray:
    if cap is None or n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(epoch), 0x5E7])
    return np.sort(rng.choice(n, size=int(cap), replace=False)).astype(np.int64)


# --------------------------------------------------------------------------- the timeline

@dataclass
class Timeline:
    """Aligned frames of one split of a run (see the module doc for the arrays)."""

    epochs: np.ndarray
    index: np.ndarray
    label: np.ndarray
    frames: np.ndarray
    syn_offsets: np.ndarray
    syn_xy: np.ndarray
    syn_row: np.ndarray
    syn_parent_class: np.ndarray
    syn_weight: np.ndarray
    syn_kind: np.ndarray
    syn_total: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def n_points(self) -> int:
        return len(self.index)

    def position(self, epoch: int) -> int:
        hits = np.flatnonzero(self.epochs == int(epoch))
        if not len(hits):
            raise KeyError(f"no frame for epoch {epoch}; frames: {self.epochs.tolist()}")
        return int(hits[0])

    def frame(self, epoch: int) -> np.ndarray:
        return self.frames[self.position(epoch)]

    def synthetic(self, epoch: int) -> dict[str, np.ndarray]:
        """The synthetic points of an evaluation: xy, row, parent_class, weight, kind."""
        i = self.position(epoch)
        s = slice(int(self.syn_offsets[i]), int(self.syn_offsets[i + 1]))
        return {"xy": self.syn_xy[s], "row": self.syn_row[s],
                "parent_class": self.syn_parent_class[s], "weight": self.syn_weight[s],
                "kind": self.syn_kind[s]}

    def bounds(self, pad: float = 0.05) -> tuple[tuple[float, float], tuple[float, float]]:
        """Axis ranges holding every frame's points (real and synthetic), padded: a fixed view
        for the whole animation."""
        pts = [self.frames.reshape(-1, 2)]
        if len(self.syn_xy):
            pts.append(self.syn_xy)
        xy = np.concatenate(pts) if pts else np.zeros((0, 2))
        xy = xy[np.isfinite(xy).all(axis=1)]
        if not len(xy):
            return (-1.0, 1.0), (-1.0, 1.0)
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        span = np.maximum(hi - lo, 1e-6)
        lo, hi = lo - pad * span, hi + pad * span
        return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))

    def head(self, k: int) -> "Timeline":
        """The first ``k`` frames (and their synthetic points)."""
        k = max(0, min(int(k), len(self)))
        s = int(self.syn_offsets[k])
        return replace(self, epochs=self.epochs[:k], frames=self.frames[:k],
                       syn_offsets=self.syn_offsets[:k + 1], syn_xy=self.syn_xy[:s],
                       syn_row=self.syn_row[:s], syn_parent_class=self.syn_parent_class[:s],
                       syn_weight=self.syn_weight[:s], syn_kind=self.syn_kind[:s],
                       syn_total=self.syn_total[:k],
                       meta=dict(self.meta, sources={str(e): self.meta.get("sources", {})
                                                     .get(str(e)) for e in
                                                     self.epochs[:k].tolist()}))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"epochs": self.epochs, "index": self.index, "label": self.label,
                "frames": self.frames, "syn_offsets": self.syn_offsets, "syn_xy": self.syn_xy,
                "syn_row": self.syn_row, "syn_parent_class": self.syn_parent_class,
                "syn_weight": self.syn_weight, "syn_kind": self.syn_kind.astype(str),
                "syn_total": self.syn_total}


def _project(x: np.ndarray, syn: np.ndarray | None, method: str, seed: int,
             init: np.ndarray | None, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One evaluation's (real (n, 2), synthetic (S, 2)) coordinates before alignment."""
    from dml.projection import ProjectionError, fit_pca, fit_umap, pca_transform

    empty = np.zeros((0, 2), np.float32)
    if method == "pca":
        mean, comps = fit_pca(x)
        return pca_transform(x, mean, comps), (pca_transform(syn, mean, comps)
                                               if syn is not None else empty)
    p = dict(params)
    follow = p.pop("follow_learning_rate", FOLLOW_LEARNING_RATE)
    if init is not None:             # the previous frame, scaled as UMAP's own initial layouts
        lo, hi = init.min(axis=0), init.max(axis=0)
        p["init"] = (INIT_SPAN * (init - lo) / np.maximum(hi - lo, 1e-9)).astype(np.float32)
        p["learning_rate"] = follow
    try:
        fitted = fit_umap(x, seed=seed, **p)
    except ProjectionError as exc:
        raise AlignmentError(str(exc)) from exc
    return fitted.embedding, (fitted.transform(syn) if syn is not None else empty)


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _settings(split: str, method: str, max_points: int | None, max_synthetic: int | None,
              seed: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"version": TIMELINE_VERSION, "split": split, "method": method,
            "max_points": max_points, "max_synthetic": max_synthetic, "seed": int(seed),
            "params": {**UMAP_DEFAULTS, "follow_learning_rate": FOLLOW_LEARNING_RATE, **params}
            if method == "umap" else {}}


def compute_timeline(run: Run | str | os.PathLike, split: str = "test", method: str = "umap",
                     *, max_points: int | None = DEFAULT_MAX_POINTS,
                     max_synthetic: int | None = DEFAULT_MAX_SYNTHETIC, seed: int = 0,
                     previous: Timeline | None = None, epochs: Sequence[int] | None = None,
                     progress: Progress | None = None, **params) -> Timeline:
    """Aligned frames of ``split`` for the run's evaluations (``epochs``: default all that saved
    the split). With ``previous`` (a timeline of the same settings whose epochs come first and
    whose points every new evaluation holds), its frames are kept and only the new evaluations
    are computed, each aligned to the frame before it."""
    if method not in METHODS:
        raise AlignmentError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if split not in SPLITS:
        raise AlignmentError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    run = run if isinstance(run, Run) else Run(Path(run))
    say = progress or (lambda msg: None)
    epochs = list(epochs) if epochs is not None else split_epochs(run, split)
    if not epochs:
        raise AlignmentError(f"run {run.id} has no evaluation with saved {split} embeddings "
                             f"(train.save_embeddings)")
    settings = _settings(split, method, max_points, max_synthetic, seed, params)
    if previous is not None and len(previous):
        done = previous.epochs.tolist()
        if epochs[:len(done)] != done:
            raise AlignmentError("the previous timeline's evaluations are not the first ones")
        todo = epochs[len(done):]
        points = previous.index
        tl = previous
    else:
        todo, tl, points = epochs, None, None
    sources: dict[str, Any] = dict(tl.meta.get("sources", {})) if tl is not None else {}
    evs: dict[int, dict[str, np.ndarray]] = {}
    for e in todo:
        path = run.eval_path(e)
        sources[str(e)] = _fingerprint(path)
        evs[e] = _read(path, split)
    if points is None:
        idx = [split_index(evs[e], split) for e in todo]
        if any(i is None for i in idx):
            raise AlignmentError(f"an evaluation of run {run.id} has no {split} embeddings")
        points = choose_points(idx, max_points, seed)
        if len(points) < 3:
            raise AlignmentError(f"the evaluations of run {run.id} share {len(points)} "
                                 f"{split} point(s); a map needs at least 3")
    label = tl.label if tl is not None else None
    frames = [tl.frames[i] for i in range(len(tl))] if tl is not None else []
    syn_parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("xy", "row", "parent_class", "weight", "kind")}
    offsets = list(tl.syn_offsets) if tl is not None else [0]
    totals = list(tl.syn_total) if tl is not None else []
    if tl is not None:
        for k, v in (("xy", tl.syn_xy), ("row", tl.syn_row), ("parent_class",
                     tl.syn_parent_class), ("weight", tl.syn_weight), ("kind", tl.syn_kind)):
            syn_parts[k].append(v)
    for n, e in enumerate(todo, start=1):
        ev = evs.pop(e)
        idx = split_index(ev, split)
        if idx is None:
            raise AlignmentError(f"evaluation {e} of run {run.id} has no {split} embeddings")
        rows = _rows_of(idx, points)
        x = np.asarray(ev[f"{split}_embeddings"], np.float32)[rows]
        if label is None:
            label = np.asarray(ev[f"{split}_labels"], np.int64)[rows]
        syn = ev.get("synthetic_embeddings")
        syn = None if syn is None or not len(syn) else np.asarray(syn, np.float32)
        srows = _synthetic_rows(len(syn), max_synthetic, e) if syn is not None else \
            np.zeros(0, np.int64)
        say(f"{method.upper()} of epoch {e} ({n}/{len(todo)}: {len(x):,} points"
            + (f", {len(srows):,} synthetic" if len(srows) else "") + ")")
        prev = frames[-1] if frames else None
        xy, sxy = _project(x, syn[srows] if syn is not None else None, method, seed, prev,
                           params)
        sim = fit_similarity(xy, prev) if prev is not None else normalizing_similarity(xy)
        frames.append(sim(xy))
        syn_parts["xy"].append(sim(sxy) if len(sxy) else np.zeros((0, 2), np.float32))
        syn_parts["row"].append(srows)
        if syn is not None:
            pc = _parent_classes(ev, len(syn))[srows]
            w = ev.get("synthetic_weight")
            w = np.asarray(w, np.float32)[srows] if w is not None else \
                np.full(len(srows), np.nan, np.float32)
            kind = ev.get("synthetic_kind")
            kind = (np.asarray(kind).astype(str)[srows] if kind is not None and np.ndim(kind)
                    else np.full(len(srows), str(kind) if kind is not None else "synthetic"))
        else:
            pc, w, kind = (np.zeros((0, 2), np.int64), np.zeros(0, np.float32),
                           np.zeros(0, "<U1"))
        syn_parts["parent_class"].append(pc)
        syn_parts["weight"].append(w)
        syn_parts["kind"].append(kind)
        offsets.append(offsets[-1] + len(srows))
        totals.append(0 if syn is None else len(syn))
    cat = {k: np.concatenate(v) if v else None for k, v in syn_parts.items()}
    meta = dict(settings, run=run.id, sources=sources, points=int(len(points)),
                updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return Timeline(
        epochs=np.asarray(epochs, np.int64), index=np.asarray(points, np.int64),
        label=np.asarray(label, np.int64), frames=np.stack(frames).astype(np.float32),
        syn_offsets=np.asarray(offsets, np.int64),
        syn_xy=(cat["xy"] if cat["xy"] is not None else np.zeros((0, 2))).astype(np.float32),
        syn_row=(cat["row"] if cat["row"] is not None else np.zeros(0)).astype(np.int64),
        syn_parent_class=(cat["parent_class"] if cat["parent_class"] is not None
                          else np.zeros((0, 2))).astype(np.int64).reshape(-1, 2),
        syn_weight=(cat["weight"] if cat["weight"] is not None else np.zeros(0))
        .astype(np.float32),
        syn_kind=(cat["kind"] if cat["kind"] is not None else np.zeros(0, "<U1")).astype(str),
        syn_total=np.asarray(totals, np.int64), meta=meta)


# --------------------------------------------------------------------------- the cache

def timeline_path(run_dir: str | os.PathLike, split: str, method: str) -> Path:
    return Path(run_dir) / "evals" / f"timeline.{split}.{method}.npz"


def save_timeline(run_dir: str | os.PathLike, tl: Timeline) -> Path:
    p = timeline_path(run_dir, tl.meta["split"], tl.meta["method"])
    atomic_save_npz(p, meta=np.array(json.dumps(tl.meta)), **tl.arrays())
    return p


def load_timeline(run_dir: str | os.PathLike, split: str, method: str) -> Timeline | None:
    """The cached timeline as it is (fresh or not: see :func:`cache_state`), or None when
    missing, unreadable or of another format version."""
    p = timeline_path(run_dir, split, method)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data.pop("meta")))
        if meta.get("version") != TIMELINE_VERSION or meta.get("method") != method \
                or meta.get("split") != split:
            return None
        return Timeline(meta=meta, **data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_state(tl: Timeline | None, run: Run, epochs: Sequence[int] | None = None,
                **settings) -> str:
    """'fresh' (the cache holds exactly the run's evaluations, unchanged), 'extend' (it holds
    the first ones, unchanged; more landed since), or 'stale' (missing, other settings, or an
    evaluation rewritten or removed). ``settings``: split, method, max_points, max_synthetic,
    seed, params (those of ``_settings``), compared when given."""
    if tl is None:
        return "stale"
    for k, v in settings.items():
        if tl.meta.get(k) != v:
            return "stale"
    split = tl.meta.get("split", "test")
    epochs = list(epochs) if epochs is not None else split_epochs(run, split)
    done = tl.epochs.tolist()
    if epochs[:len(done)] != done:
        return "stale"
    sources = tl.meta.get("sources", {})
    for e in done:
        try:
            if sources.get(str(e)) != _fingerprint(run.eval_path(e)):
                return "stale"
        except OSError:
            return "stale"
    return "fresh" if len(epochs) == len(done) else "extend"


def get_timeline(run_dir: str | os.PathLike, split: str = "test", method: str = "umap", *,
                 compute: bool = True, max_points: int | None = DEFAULT_MAX_POINTS,
                 max_synthetic: int | None = DEFAULT_MAX_SYNTHETIC, seed: int = 0,
                 progress: Progress | None = None, **params) -> Timeline | None:
    """The run's timeline from its cache, extended by evaluations that landed since (only those
    are computed) or recomputed when the cache is stale, and saved; None when it is not fresh
    and ``compute`` is false."""
    run = Run(run_dir)
    settings = _settings(split, method, max_points, max_synthetic, seed, params)
    cached = load_timeline(run.path, split, method)
    epochs = split_epochs(run, split)
    state = cache_state(cached, run, epochs, **{k: v for k, v in settings.items()
                                                 if k != "version"})
    if state == "fresh":
        return cached
    if not compute:
        return None
    kw = dict(split=split, method=method, max_points=max_points, max_synthetic=max_synthetic,
              seed=seed, epochs=epochs, progress=progress, **params)
    tl = None
    t0 = time.perf_counter()
    if state == "extend":
        try:
            tl = compute_timeline(run, previous=cached, **kw)
        except AlignmentError:      # a new evaluation lacks some points: start over
            tl = None
    if tl is None:
        tl = compute_timeline(run, **kw)
    tl.meta["seconds"] = round(time.perf_counter() - t0 + float(
        (cached.meta.get("seconds") or 0) if state == "extend" and cached else 0), 2)
    save_timeline(run.path, tl)
    return tl


# --------------------------------------------------------------------------- two runs

def align_to(reference: Timeline, other: Timeline) -> Timeline:
    """``other``'s frames moved onto ``reference``'s: each frame of ``other`` by the similarity
    transform (Procrustes) that best maps its points onto the reference's frame of the same
    epoch (or the nearest epoch the reference has), on the data-set indices both share; the
    synthetic points of the frame move with it. AlignmentError when they share fewer than 3
    points (different data sets or splits)."""
    shared, ia, ib = np.intersect1d(reference.index, other.index, return_indices=True)
    if len(shared) < 3 or not len(reference):
        raise AlignmentError(f"the two runs share {len(shared)} point(s) of this split; align "
                             "runs of the same data set and split")
    frames = np.empty_like(other.frames)
    syn_xy = other.syn_xy.copy()
    ref_epochs = reference.epochs
    matched = []
    for i, e in enumerate(other.epochs.tolist()):
        j = int(np.argmin(np.abs(ref_epochs - e) + (ref_epochs > e) * 0.5))   # ties: earlier
        matched.append(int(ref_epochs[j]))
        sim = fit_similarity(other.frames[i][ib], reference.frames[j][ia])
        frames[i] = sim(other.frames[i])
        s = slice(int(other.syn_offsets[i]), int(other.syn_offsets[i + 1]))
        if s.stop > s.start:
            syn_xy[s] = sim(other.syn_xy[s])
    meta = dict(other.meta, aligned_to=reference.meta.get("run"), shared_points=int(len(shared)),
                matched_epochs=matched)
    return replace(other, frames=frames, syn_xy=syn_xy, meta=meta)


def main(argv: list[str] | None = None) -> int:
    """``python -m dml.alignment RUN_DIR... [--split test] [--method umap]``: compute (or
    extend) and cache the aligned frames of runs; the app runs UMAP timelines this way, in a
    low-priority process of their own."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dml.alignment",
                                 description="aligned 2-D maps of a run's evaluations")
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--method", default="umap", choices=METHODS)
    ap.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS)
    ap.add_argument("--max-synthetic", type=int, default=DEFAULT_MAX_SYNTHETIC)
    ap.add_argument("--nice", type=int, default=0, help="lower this process's priority")
    args = ap.parse_args(argv)
    if args.nice and hasattr(os, "nice"):
        try:
            os.nice(args.nice)
        except OSError:
            pass
    if args.method == "umap":
        from dml.projection import configure_numba_cache

        configure_numba_cache()
    status = 0
    for r in args.runs:
        t0 = time.perf_counter()
        try:
            tl = get_timeline(r, args.split, args.method, max_points=args.max_points,
                              max_synthetic=args.max_synthetic,
                              progress=lambda m: print(m, flush=True))
        except (AlignmentError, OSError) as exc:
            print(f"error: {r}: {exc}", flush=True)
            status = 1
            continue
        print(f"{r}: {len(tl)} frame(s) of {tl.n_points:,} {args.split} points in "
              f"{time.perf_counter() - t0:.1f}s -> {timeline_path(r, args.split, args.method)}",
              flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
