"""Pure logic of the embedding explorer: the table of points on a map, selections (plotly events,
boxes, lassos) -> point ids, class filters, nearest neighbours in the original embedding space.
No Streamlit here; every function is unit-tested."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from dml.export import column

SPLIT_ORDER = ("train", "val", "test", "gallery", "synthetic")


@dataclass
class PointTable:
    """All points of one evaluation on one map; a point's id is its row.

    split: (N,) str, 'train' / 'val' / 'test' / 'gallery' / 'synthetic'.
    index: (N,) int, position within its split (image index for real points).
    label: (N,) int, class id (synthetic points: the class of parent 0).
    xy: (N, 2) float32 map coordinates. emb: (N, D) float32 embeddings.
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


def build_point_table(ev: Mapping[str, np.ndarray], proj: Mapping[str, np.ndarray]) -> PointTable:
    """Points of an evaluation npz (``ev``) placed by a projection (``proj``: split -> (n, 2))."""
    parts = {k: [] for k in ("split", "index", "label", "xy", "emb", "parents", "parent_index",
                             "weight", "kind")}

    def add(split, n, label, xy, emb, parents=None, parent_index=None, weight=None, kind=None):
        parts["split"].append(np.full(n, split, dtype=object))
        parts["index"].append(np.arange(n))
        parts["label"].append(np.asarray(label, np.int64))
        parts["xy"].append(np.asarray(xy, np.float32).reshape(n, 2))
        parts["emb"].append(np.asarray(emb, np.float32))
        parts["parents"].append(column(parents, n, -1, np.int64, 2))
        parts["parent_index"].append(column(parent_index, n, -1, np.int64, 2))
        parts["weight"].append(column(weight, n, np.nan, np.float32))
        parts["kind"].append(np.full(n, "", dtype=object) if kind is None
                             else np.asarray(kind).astype(object))

    for split in SPLIT_ORDER[:-1]:
        if f"{split}_embeddings" in ev and split in proj and len(ev[f"{split}_embeddings"]):
            e = ev[f"{split}_embeddings"]
            add(split, len(e), ev[f"{split}_labels"], proj[split], e)
    if "synthetic_embeddings" in ev and "synthetic" in proj and len(ev["synthetic_embeddings"]):
        e = ev["synthetic_embeddings"]
        n = len(e)
        top = ev.get("synthetic_top_classes")
        probe = ev.get("probe_index")
        parents = ev.get("synthetic_parents")
        parent_index = (np.asarray(probe)[np.asarray(parents)] if probe is not None
                        and parents is not None else None)
        if parent_index is not None and "train_labels" in ev:
            classes = np.asarray(ev["train_labels"])[parent_index]   # the parents' own classes
        else:
            classes = np.asarray(top) if top is not None else np.full((n, 2), -1)
        weight = ev.get("synthetic_weight")
        add("synthetic", n, classes[:, 0], proj["synthetic"], e, parents=classes,
            parent_index=parent_index, weight=weight, kind=ev.get("synthetic_kind"))
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
    """Indices of the points (n, 2) inside a closed polygon (even-odd rule, vectorised)."""
    px, py = np.asarray(list(xs), float), np.asarray(list(ys), float)
    if len(px) < 3:
        return np.zeros(0, np.int64)
    x, y = xy[:, 0][:, None].astype(float), xy[:, 1][:, None].astype(float)
    x1, y1 = px[None, :], py[None, :]
    x2, y2 = np.roll(px, -1)[None, :], np.roll(py, -1)[None, :]
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    inside = (crosses & (x < x_at)).sum(axis=1) % 2 == 1
    return np.flatnonzero(inside)


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
                            among: Iterable[str] = ("train",)) -> list[dict[str, Any]]:
    """For each selected point, its ``k`` nearest real points of the splits ``among`` in the
    original embedding space: [{'id', 'neighbours': [ids], 'distances': [..]}]."""
    ref_ids = np.flatnonzero(np.isin(pt.split, list(among)) & pt.real)
    if not len(ids) or not len(ref_ids):
        return [{"id": int(i), "neighbours": [], "distances": []} for i in ids]
    pos = {int(r): j for j, r in enumerate(ref_ids)}
    exclude = np.asarray([pos.get(int(i), -1) for i in ids])
    idx, dist = nearest_neighbours(pt.emb[ids], pt.emb[ref_ids], k, exclude)
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
