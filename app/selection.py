"""Pure logic of the embedding explorer: the table of points on a map, selections (plotly events,
boxes, lassos) -> point ids, class filters, nearest neighbours in the original embedding space.
No Streamlit here; every function is unit-tested."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from dml.export import column

SPLIT_ORDER = ("train", "val", "test", "gallery", "synthetic")


@dataclass
class PointTable:
    """All points of one evaluation on one map; a point's id is its row.

    split: (N,) str, 'train' / 'val' / 'test' / 'gallery' / 'synthetic'.
    index: (N,) int, the image index in its split of the data set for real points (training
    points of an evaluation with a ``train_index`` subsample: that index), the position in the
    evaluation's synthetic arrays for synthetic points.
    label: (N,) int, class id (synthetic points: the class of parent 0).
    xy: (N, 2) float32 map coordinates. emb: (N, D) float32 embeddings ((N, 0) when the table
    was built without them: :func:`read_point_embeddings`).
    parents: (N, 2) int, class ids of a synthetic point's parents (-1 for real points).
    parent_index: (N, 2) int, train image indices of a synthetic point's parents (-1 for real).
    weight: (N,) float, the weight of parent 0 in a synthetic point (lambda; nan for real points
    and for reflections). kind: (N,) str ('' for real).
    """

    split: np.ndarray
    index: np.ndarray
    label: np.ndarray
    xy: np.ndarray
    emb: np.ndarray
    parents: np.ndarray
    parent_index: np.ndarray
    weight: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return len(self.split)

    def ids(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    @property
    def real(self) -> np.ndarray:
        return self.split != "synthetic"


# the evaluation arrays a map needs; embeddings and images are read only when asked for
_HEAVY_SUFFIXES = ("_embeddings", "_images")


def read_map_arrays(eval_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """An evaluation npz without its embeddings and images (labels, provenance of the
    synthetic points: what a map needs), in today's layout. ``np.load`` reads the members of
    an npz one by one, so this skips decompressing the bulk of the file (100k x 512
    embeddings: 0.5-1 s, and 200 MB as float32)."""
    from dml.runs import upgrade_eval

    with np.load(eval_file, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files if not k.endswith(_HEAVY_SUFFIXES)}
    return upgrade_eval(out)


def read_point_embeddings(eval_file: str | os.PathLike, pt: "PointTable") -> np.ndarray:
    """The embeddings (N, D) of a table's points, in its row order, in the dtype they are
    stored in (the trainer's float16, unless some split is stored wider)."""
    parts = []
    with np.load(eval_file, allow_pickle=False) as z:
        for split in SPLIT_ORDER:
            n = int((pt.split == split).sum())
            if n:
                e = z[f"{split}_embeddings"]
                if len(e) != n:
                    raise ValueError(f"{split}: {len(e)} embeddings for {n} points")
                parts.append(e)
    if not parts:
        return np.zeros((0, 0), np.float16)
    return np.concatenate(parts)


def _split_length(ev: Mapping[str, np.ndarray], split: str) -> int:
    for k in (f"{split}_embeddings", f"{split}_labels"):
        if k in ev:
            return len(ev[k])
    return 0


def synthetic_parent_classes(ev: Mapping[str, np.ndarray], n: int
                             ) -> tuple[np.ndarray, np.ndarray | None]:
    """(classes (n, 2), training-set image indices (n, 2) or None) of the synthetic points'
    parents. ``synthetic_parents`` index the probe batch; ``probe_index`` maps it to
    training-set indices and ``probe_labels`` gives its classes. Older evaluations have no
    ``probe_labels``: their training embeddings were the whole training split, so
    ``train_labels`` at those indices are the classes; where ``train_index`` says the training
    embeddings are a subsample, the classes are looked up through it, and the strategy's own
    ``synthetic_top_classes`` are the last resort."""
    probe = ev.get("probe_index")
    parents = ev.get("synthetic_parents")
    top = ev.get("synthetic_top_classes")
    fallback = np.asarray(top, np.int64) if top is not None else np.full((n, 2), -1, np.int64)
    if probe is None or parents is None:
        return fallback, None
    parents = np.asarray(parents, np.int64)
    parent_index = np.asarray(probe, np.int64)[parents]
    if ev.get("probe_labels") is not None:
        return np.asarray(ev["probe_labels"], np.int64)[parents], parent_index
    if "train_labels" not in ev:
        return fallback, parent_index
    train_labels = np.asarray(ev["train_labels"], np.int64)
    train_index = ev.get("train_index")
    if train_index is None:             # the training embeddings are the whole split
        if parent_index.size and parent_index.max() >= len(train_labels):
            return fallback, parent_index
        return train_labels[parent_index], parent_index
    train_index = np.asarray(train_index, np.int64)
    if not len(train_index) or len(train_index) != len(train_labels):
        return fallback, parent_index
    order = np.argsort(train_index, kind="stable")
    rows = order[np.clip(np.searchsorted(train_index, parent_index, sorter=order), 0,
                         len(order) - 1)]
    found = train_index[rows] == parent_index   # the parent is among the embedded images
    return np.where(found, train_labels[rows], fallback).astype(np.int64), parent_index


def build_point_table(ev: Mapping[str, np.ndarray], proj: Mapping[str, np.ndarray]) -> PointTable:
    """Points of an evaluation npz (``ev``) placed by a projection (``proj``: split -> (n, 2)).

    ``ev`` may lack the embeddings (:func:`read_map_arrays`): the table's ``emb`` is then
    (N, 0) and :func:`read_point_embeddings` gives them when needed. Training points whose
    evaluation holds ``train_index`` (a subsample of the training split) get those training-set
    indices as ``index`` (the images to show)."""
    parts = {k: [] for k in ("split", "index", "label", "xy", "emb", "parents", "parent_index",
                             "weight", "kind")}

    def add(split, n, label, xy, emb, parents=None, parent_index=None, weight=None, kind=None,
            index=None):
        parts["split"].append(np.full(n, split, dtype=object))
        parts["index"].append(np.arange(n) if index is None else np.asarray(index, np.int64))
        parts["label"].append(np.asarray(label, np.int64))
        parts["xy"].append(np.asarray(xy, np.float32).reshape(n, 2))
        parts["emb"].append(np.zeros((n, 0), np.float32) if emb is None
                            else np.asarray(emb, np.float32))
        parts["parents"].append(column(parents, n, -1, np.int64, 2))
        parts["parent_index"].append(column(parent_index, n, -1, np.int64, 2))
        parts["weight"].append(column(weight, n, np.nan, np.float32))
        parts["kind"].append(np.full(n, "", dtype=object) if kind is None
                             else np.asarray(kind).astype(object))

    for split in SPLIT_ORDER[:-1]:
        n = _split_length(ev, split)
        if n and split in proj:
            index = ev.get("train_index") if split == "train" else None
            if index is not None and len(index) != n:
                index = None
            add(split, n, ev[f"{split}_labels"], proj[split], ev.get(f"{split}_embeddings"),
                index=index)
    n_syn = (len(ev["synthetic_embeddings"]) if "synthetic_embeddings" in ev
             else len(proj["synthetic"]) if "synthetic" in proj else 0)
    if n_syn and "synthetic" in proj:
        classes, parent_index = synthetic_parent_classes(ev, n_syn)
        add("synthetic", n_syn, classes[:, 0], proj["synthetic"],
            ev.get("synthetic_embeddings"), parents=classes, parent_index=parent_index,
            weight=ev.get("synthetic_weight"), kind=ev.get("synthetic_kind"))
    if parts["emb"] and len({e.shape[1] for e in parts["emb"]}) > 1:   # some without: none
        parts["emb"] = [np.zeros((len(e), 0), np.float32) for e in parts["emb"]]
    cat = {k: (np.concatenate(v) if v else None) for k, v in parts.items()}
    if cat["split"] is None:
        empty = np.zeros(0)
        return PointTable(empty.astype(object), empty.astype(np.int64), empty.astype(np.int64),
                          np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32),
                          np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64),
                          empty.astype(np.float32), empty.astype(object))
    return PointTable(**cat)


# --------------------------------------------------------------------------- filters

def visible_mask(pt: PointTable, splits: Iterable[str], classes: Iterable[int] | None = None,
                 show_synthetic: bool = True) -> np.ndarray:
    """Which points to draw: real points of the chosen splits (and classes, if any are picked);
    synthetic points when shown and, with a class pick, only those whose two parents' classes
    are both picked (the points *between* the isolated classes)."""
    splits = set(splits)
    keep = np.isin(pt.split, [s for s in splits if s != "synthetic"]) & pt.real
    cls = None if classes is None else np.asarray(list(classes))
    if cls is not None and cls.size:
        keep &= np.isin(pt.label, cls)
    syn = (pt.split == "synthetic") if show_synthetic else np.zeros(len(pt), bool)
    if cls is not None and cls.size and syn.any():
        syn &= np.isin(pt.parents[:, 0], cls) & np.isin(pt.parents[:, 1], cls)
    return keep | syn


# --------------------------------------------------------------------------- selections

def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, key, default)


def ids_from_event(event: Any, trace_ids: list[np.ndarray] | None = None) -> np.ndarray:
    """Point ids selected in a ``st.plotly_chart(on_select=...)`` event.

    Each selected point carries ``customdata`` = its id (the figure builders put it there);
    without it, ``trace_ids[curve_number][point_index]`` is used. Returns sorted unique ids.
    """
    sel = _get(event, "selection", event)
    points = _get(sel, "points", []) or []
    out: list[int] = []
    for p in points:
        cd = _get(p, "customdata")
        if isinstance(cd, (list, tuple)) and cd:
            cd = cd[0]
        if cd is not None:
            try:
                out.append(int(cd))
                continue
            except (TypeError, ValueError):
                pass
        if trace_ids is not None:
            curve = _get(p, "curve_number", _get(p, "curveNumber"))
            idx = _get(p, "point_index", _get(p, "pointIndex", _get(p, "point_number")))
            if curve is not None and idx is not None and 0 <= int(curve) < len(trace_ids):
                ids = trace_ids[int(curve)]
                if 0 <= int(idx) < len(ids):
                    out.append(int(ids[int(idx)]))
    return np.unique(np.asarray(out, dtype=np.int64))


def points_in_box(xy: np.ndarray, x_range: tuple[float, float],
                  y_range: tuple[float, float]) -> np.ndarray:
    """Indices of the points (n, 2) inside an axis-aligned box (either corner order)."""
    x0, x1 = sorted(x_range)
    y0, y1 = sorted(y_range)
    m = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    return np.flatnonzero(m)


def points_in_lasso(xy: np.ndarray, xs: Iterable[float], ys: Iterable[float]) -> np.ndarray:
    """Indices of the points (n, 2) inside a closed polygon (even-odd rule): the points in its
    bounding box, then one vectorised pass per edge (memory O(n), whatever the lasso's length:
    100k points and a 300-vertex lasso in ~0.1 s)."""
    px, py = np.asarray(list(xs), float), np.asarray(list(ys), float)
    if len(px) < 3:
        return np.zeros(0, np.int64)
    cand = points_in_box(xy, (px.min(), px.max()), (py.min(), py.max()))
    x, y = xy[cand, 0].astype(float), xy[cand, 1].astype(float)
    inside = np.zeros(len(cand), bool)
    for x1, y1, x2, y2 in zip(px, py, np.roll(px, -1), np.roll(py, -1)):
        if y1 == y2:
            continue            # a horizontal edge crosses no ray
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return cand[inside]


def ids_from_shapes(event: Any, pt: PointTable, visible: np.ndarray | None = None) -> np.ndarray:
    """Ids of (visible) points inside the box / lasso shapes of a selection event (used when a
    WebGL trace reports the shape but not every point)."""
    sel = _get(event, "selection", event)
    cand = np.flatnonzero(visible) if visible is not None else np.arange(len(pt))
    xy = pt.xy[cand]
    hits: list[np.ndarray] = []
    for box in _get(sel, "box", []) or []:
        xs, ys = _get(box, "x", []), _get(box, "y", [])
        if len(xs) >= 2 and len(ys) >= 2:
            hits.append(cand[points_in_box(xy, (xs[0], xs[-1]), (ys[0], ys[-1]))])
    for lasso in _get(sel, "lasso", []) or []:
        hits.append(cand[points_in_lasso(xy, _get(lasso, "x", []), _get(lasso, "y", []))])
    return np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- neighbours

def nearest_neighbours(queries: np.ndarray, refs: np.ndarray, k: int = 5,
                       exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references (n, D) of each query (m, D) by Euclidean distance in the
    original embedding space -> (indices (m, k), distances (m, k)), nearest first.
    ``exclude`` (m,) gives, per query, one reference index to skip (the query itself), or -1."""
    from dml.metrics import knn

    return knn(queries, refs, k, exclude)


def neighbours_of_selection(pt: PointTable, ids: np.ndarray, k: int = 5,
                            among: Iterable[str] = ("train",),
                            emb: np.ndarray | None = None) -> list[dict[str, Any]]:
    """For each selected point, its ``k`` nearest real points of the splits ``among`` in the
    original embedding space: [{'id', 'neighbours': [ids], 'distances': [..]}]. ``emb``: the
    points' embeddings (N, D) when the table was built without them."""
    emb = pt.emb if emb is None else emb
    ref_ids = np.flatnonzero(np.isin(pt.split, list(among)) & pt.real)
    if not len(ids) or not len(ref_ids):
        return [{"id": int(i), "neighbours": [], "distances": []} for i in ids]
    ids = np.asarray(ids)
    pos = np.searchsorted(ref_ids, ids)
    hit = (pos < len(ref_ids)) & (ref_ids[np.minimum(pos, len(ref_ids) - 1)] == ids)
    exclude = np.where(hit, pos, -1)
    idx, dist = nearest_neighbours(np.asarray(emb[ids], np.float32),
                                   np.asarray(emb[ref_ids], np.float32), k, exclude)
    return [{"id": int(i), "neighbours": ref_ids[idx[j]].tolist(),
             "distances": dist[j].tolist()} for j, i in enumerate(ids)]


def class_label(c: int, class_names: Mapping[int, str] | None = None) -> str:
    """'3', or '3 (5)' when the data set names class id 3 '5' (ids are what the map's legend
    and the class picker show)."""
    c = int(c)
    name = (class_names or {}).get(c)
    return str(c) if name is None or str(name) == str(c) else f"{c} ({name})"


def describe_points(pt: PointTable, ids: np.ndarray,
                    class_names: Mapping[int, str] | None = None) -> list[str]:
    """Hover texts of many points (fast path for real points)."""
    out = []
    name = lambda c: class_label(c, class_names)  # noqa: E731
    for i, split, idx, lab in zip(ids.tolist(), pt.split[ids], pt.index[ids].tolist(),
                                  pt.label[ids].tolist()):
        out.append(describe_point(pt, i, class_names) if split == "synthetic"
                   else f"{split} #{idx}: class {name(lab)}")
    return out


def short_caption(pt: PointTable, i: int, class_names: Mapping[int, str] | None = None) -> str:
    """A thumbnail caption (the split is shown by the grid's header): '#12 · class 3' or
    '0×1 · λ=0.68'."""
    name = lambda c: class_label(c, class_names)  # noqa: E731
    if pt.split[i] == "synthetic":
        a, b = pt.parents[i]
        lam = pt.weight[i]
        return f"{name(a)}×{name(b)}" + ("" if np.isnan(lam) else f" · λ={lam:.2f}")
    return f"#{int(pt.index[i])} · class {name(pt.label[i])}"


def describe_point(pt: PointTable, i: int, class_names: Mapping[int, str] | None = None) -> str:
    """Hover / caption text of one point."""
    name = lambda c: class_label(c, class_names)  # noqa: E731
    if pt.split[i] == "synthetic":
        a, b = pt.parents[i]
        lam = pt.weight[i]
        lam_txt = "" if np.isnan(lam) else f", λ={lam:.2f}"
        return f"synthetic ({pt.kind[i]}): classes {name(a)} × {name(b)}{lam_txt}"
    return f"{pt.split[i]} #{int(pt.index[i])}: class {name(pt.label[i])}"


# --------------------------------------------------------------------------- focus

def focus_param(split: str, index: int) -> str:
    """The explorer's ``focus`` query parameter of a real point: 'test:123' (its split and its
    image index in that split)."""
    return f"{split}:{int(index)}"


def parse_focus(value: Any) -> tuple[str, int] | None:
    """('test', 123) of a ``focus`` query parameter 'test:123'; None when it is missing or not
    a real split and a non-negative index."""
    split, sep, index = str(value or "").strip().partition(":")
    if not sep or split not in SPLIT_ORDER[:-1] or not index.isdigit():
        return None
    return split, int(index)


def focus_point(pt: PointTable, split: str, index: int) -> int | None:
    """The id (row) of the real point of ``split`` whose image index is ``index``, or None when
    the map has no such point."""
    hit = np.flatnonzero((pt.split == split) & (pt.index == int(index)))
    return int(hit[0]) if len(hit) else None
