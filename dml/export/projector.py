"""The ``projector`` export: an evaluation's embeddings, metadata and sprite for TensorBoard's
Embedding Projector (see :mod:`dml.export`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dml.export.base import (BLANK_GREY, METADATA_COLUMNS, MIN_THUMB_PX, REAL_SPLITS, ExportError,
                             ExportResult, _run_dataset, _save_embeddings_text, column)
from dml.runs import Run


def _export_projector(run: Run, epoch: int, splits: list[str], out: Path, *, synthetic: bool,
                      sprite: bool, max_points: int | None, data_root: str | None,
                      max_sprite_px: int, say) -> ExportResult:
    ev = run.load_eval(epoch)
    present = [s for s in REAL_SPLITS if f"{s}_embeddings" in ev]
    has_syn = "synthetic_embeddings" in ev and len(ev["synthetic_embeddings"]) > 0
    missing = [s for s in splits if s not in present]
    if missing:
        holds = [f"{', '.join(present)} embeddings"] if present else []
        holds += ["synthetic points"] if has_syn else []
        raise ExportError(
            f"run {run.id}'s evaluation of epoch {epoch} has no {', '.join(missing)} embeddings"
            + ("" if present else f" ({_save_embeddings_text(run)})")
            + f"; it holds {' and '.join(holds) or 'nothing to export'}"
            + (f": choose --split {','.join(present)}" if present else ""))
    pts = _projector_points(ev, splits, synthetic and has_syn)
    n = len(pts["split"])
    if n == 0:
        raise ExportError(f"run {run.id}'s evaluation of epoch {epoch} has no points in "
                          f"{', '.join(splits)}")
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        say(msg)

    keep = None
    if max_points is not None and n > max_points:
        keep = _subsample(n, max_points)
        note(f"{n} points, --max-points {max_points}: exported a seeded random subsample of "
             f"{max_points}")
    ds = None
    thumb = 0
    if sprite:
        ds = _run_dataset(run, data_root, purpose="sprite images (or pass --no-sprite)")
        side = int(ds.image_size)
        m = n if keep is None else len(keep)
        thumb = min(side, max_sprite_px // math.ceil(math.sqrt(m)))
        if thumb < min(side, MIN_THUMB_PX):       # too small to see: fewer points instead
            thumb = min(side, MIN_THUMB_PX)
            cap = (max_sprite_px // thumb) ** 2
            keep = _subsample(n, cap) if keep is None else keep[_subsample(len(keep), cap)]
            note(f"{m} points do not fit a {max_sprite_px} x {max_sprite_px} px sprite even at "
                 f"{thumb} px a thumbnail (TensorBoard's limit): exported a seeded random "
                 f"subsample of {cap} points (or pass --max-points, or --no-sprite for all)")
        elif thumb < side:
            note(f"{m} points: thumbnails shrunk from {side} to {thumb} px so the sprite fits "
                 f"TensorBoard's {max_sprite_px} x {max_sprite_px} px limit")
    if keep is not None:
        pts = {k: v[keep] for k, v in pts.items()}
        n = len(keep)
    names = run.class_names() or (dict(ds.class_names) if ds is not None else {})
    tensor_name = f"{run.id} epoch {epoch} {'+'.join(splits)}" + \
        (" + synthetic" if (pts["kind"] == "synthetic").any() else "")
    dim = int(pts["emb"].shape[1])

    np.savetxt(out / "tensors.tsv", pts["emb"], fmt="%.7g", delimiter="\t")
    _write_metadata(out / "metadata.tsv", pts, names)
    files = ["projector_config.pbtxt", "projector_config.json", "tensors.tsv", "metadata.tsv"]
    if sprite:
        _write_sprite(out / "sprite.png", pts, ev, ds, thumb)
        files.append("sprite.png")
    (out / "projector_config.pbtxt").write_text(
        _pbtxt(tensor_name, n, dim, thumb if sprite else None), encoding="utf-8")
    standalone = {"embeddings": [{"tensorName": tensor_name, "tensorShape": [n, dim],
                                  "tensorPath": "tensors.tsv", "metadataPath": "metadata.tsv"}]}
    if sprite:
        standalone["embeddings"][0]["sprite"] = {"imagePath": "sprite.png",
                                                 "singleImageDim": [thumb, thumb]}
    (out / "projector_config.json").write_text(json.dumps(standalone, indent=2),
                                               encoding="utf-8")
    counts = {s: int(((pts["split"] == s) & (pts["kind"] == "real")).sum()) for s in splits}
    n_syn = int((pts["kind"] == "synthetic").sum())
    parts = [f"{v} {k}" for k, v in counts.items()] + ([f"{n_syn} synthetic"] if n_syn else [])
    check = (f"ok: {n} points ({', '.join(parts)}) of epoch {epoch}, {dim}-d"
             + (f", sprite {thumb} px a thumbnail" if sprite else ", no sprite"))
    return ExportResult(out, "projector", sorted(files), notes, check,
                        {"epoch": epoch, "points": n, "dim": dim, "thumb": thumb,
                         "tensor_name": tensor_name})


def _subsample(n: int, k: int) -> np.ndarray:
    """A seeded random subset of ``k`` of ``n`` positions, in order."""
    rng = np.random.default_rng(n)
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _projector_points(ev: dict[str, np.ndarray], splits: list[str],
                      synthetic: bool) -> dict[str, np.ndarray]:
    """One row a point: split, kind, data-set index (train-split indices of the parents for a
    synthetic point), classes, strategy, lambda, embedding, the source row in its npz array."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "split", "kind", "index", "row", "label", "strategy", "parent_index", "parent_class",
        "weight", "emb")}

    def add(split, kind, index, row, label, emb, strategy=None, parent_index=None,
            parent_class=None, weight=None):
        n = len(emb)
        cols["split"].append(np.full(n, split, dtype=object))
        cols["kind"].append(np.full(n, kind, dtype=object))
        cols["index"].append(np.asarray(index, np.int64))
        cols["row"].append(np.asarray(row, np.int64))
        cols["label"].append(np.asarray(label, np.int64))
        cols["emb"].append(np.asarray(emb, np.float32))
        cols["strategy"].append(np.full(n, "", dtype=object) if strategy is None
                                else np.asarray(strategy).astype(str).astype(object))
        cols["parent_index"].append(column(parent_index, n, -1, np.int64, 2))
        cols["parent_class"].append(column(parent_class, n, -1, np.int64, 2))
        cols["weight"].append(column(weight, n, np.nan, np.float32))

    for s in splits:
        e = ev[f"{s}_embeddings"]
        rows = np.arange(len(e))
        index = rows
        if s == "train" and "train_index" in ev:       # a training subsample: its indices
            index = np.asarray(ev["train_index"], np.int64)
        add(s, "real", index, rows, ev[f"{s}_labels"], e)
    if synthetic:
        e = ev["synthetic_embeddings"]
        n = len(e)
        parents = np.asarray(ev["synthetic_parents"], np.int64).reshape(n, 2)
        probe = ev.get("probe_index")
        fits = probe is not None and len(parents) and 0 <= parents.min() and \
            parents.max() < len(probe)
        pidx = np.asarray(probe, np.int64)[parents] if fits else None   # probe -> data set
        pclass = _parent_classes(ev, parents, pidx)
        kind = ev.get("synthetic_kind")
        strategy = np.full(n, str(kind), dtype=object) if kind is not None and \
            np.ndim(kind) == 0 else kind
        add("train", "synthetic", np.arange(n), np.arange(n), pclass[:, 0], e,
            strategy=strategy, parent_index=pidx, parent_class=pclass,
            weight=ev.get("synthetic_weight"))
    return {k: np.concatenate(v) for k, v in cols.items()}


def _parent_classes(ev, parents: np.ndarray, pidx: np.ndarray | None) -> np.ndarray:
    """The class ids of each synthetic point's two parents: the probe batch's labels
    (``probe_labels``), else the training labels at the parents' data-set indices when the npz
    has every training embedding, else the two strongest membership classes."""
    if "probe_labels" in ev:
        return np.asarray(ev["probe_labels"], np.int64)[parents]
    if pidx is not None and "train_labels" in ev and "train_index" not in ev \
            and len(ev["train_labels"]) > int(pidx.max(initial=-1)):
        return np.asarray(ev["train_labels"], np.int64)[pidx]
    top = ev.get("synthetic_top_classes")
    if top is not None:
        return np.asarray(top, np.int64).reshape(len(parents), 2)
    return np.full((len(parents), 2), -1, np.int64)


def _clean(value: Any) -> str:
    """A metadata cell: no tab or line break (they would split the TSV)."""
    return " ".join(str(value).replace("\t", " ").splitlines()).strip()


def _write_metadata(path: Path, pts: dict[str, np.ndarray], names: dict[int, str]) -> None:
    def cls(c: int) -> str:
        return "" if c < 0 else str(c)

    lines = ["\t".join(METADATA_COLUMNS)]
    for i in range(len(pts["split"])):
        label = int(pts["label"][i])
        syn = pts["kind"][i] == "synthetic"
        pi, pc, w = pts["parent_index"][i], pts["parent_class"][i], float(pts["weight"][i])
        row = [cls(label), _clean(names.get(label, "")) if label >= 0 else "",
               pts["split"][i], pts["kind"][i], str(int(pts["index"][i])),
               _clean(pts["strategy"][i]) if syn else "",
               cls(int(pi[0])) if syn else "", cls(int(pi[1])) if syn else "",
               cls(int(pc[0])) if syn else "", cls(int(pc[1])) if syn else "",
               f"{w:.6g}" if syn and math.isfinite(w) else ""]
        lines.append("\t".join(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """uint8 (B, C, H, W) -> uint8 (B, H, W, 3): grey repeated, the first three channels of
    colour images."""
    if x.shape[1] >= 3:
        x = x[:, :3]
    else:
        x = np.repeat(x[:, :1], 3, axis=1)
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _resize(x: np.ndarray, side: int) -> np.ndarray:
    """uint8 (B, C, H, W) at ``side`` px (antialiased; unchanged when already that size)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    import torch

    from dml.data.images import resize_uint8

    return resize_uint8(torch.from_numpy(np.ascontiguousarray(x)), side).numpy()


def _write_sprite(path: Path, pts: dict[str, np.ndarray], ev, ds, thumb: int) -> None:
    """sprite.png: thumbnails of the points, row-major, in a square grid of
    ceil(sqrt(n)) cells a side."""
    import torch
    from PIL import Image

    n = len(pts["split"])
    grid = math.ceil(math.sqrt(n))
    canvas = np.zeros((grid * thumb, grid * thumb, 3), np.uint8)

    def place(positions: np.ndarray, images: np.ndarray) -> None:
        tiles = _to_rgb(_resize(images, thumb))
        for p, t in zip(positions.tolist(), tiles):
            r, c = divmod(p, grid)
            canvas[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = t

    real = pts["kind"] == "real"
    for s in REAL_SPLITS:
        where = np.flatnonzero(real & (pts["split"] == s))
        if not len(where):
            continue
        split = getattr(ds, s, None)
        if split is None:
            raise ExportError(f"the run's data set has no {s} split now, but its evaluation has "
                              f"{s} embeddings; pass --no-sprite")
        stored_n = len(ev[f"{s}_embeddings"])
        if not (s == "train" and "train_index" in ev) and stored_n != len(split):
            raise ExportError(f"the run's data set has {len(split)} {s} images now, its "
                              f"evaluation {stored_n}: not the data the run was trained on; "
                              f"pass --data-root or --no-sprite")
        for start in range(0, len(where), 1024):
            chunk = where[start:start + 1024]
            idx = pts["index"][chunk]
            if len(idx) and int(idx.max()) >= len(split):
                raise ExportError(f"the run's data set has {len(split)} {s} images now, but "
                                  f"its evaluation has index {int(idx.max())}: not the data "
                                  f"the run was trained on; pass --data-root or --no-sprite")
            place(chunk, split.load(torch.as_tensor(idx)).numpy())
    syn = np.flatnonzero(~real)
    if len(syn):
        stored = ev.get("synthetic_images")
        grey = np.full((len(syn), 1, thumb, thumb), BLANK_GREY, np.uint8)
        if stored is not None and len(stored) == len(ev["synthetic_embeddings"]):
            from dml.data.transforms import denormalize

            imgs = denormalize(np.asarray(stored)[pts["row"][syn]], ds.mean, ds.std)
            place(syn, imgs)
        else:
            place(syn, grey)
    Image.fromarray(canvas, "RGB").save(path, format="PNG")


def _pbtxt(tensor_name: str, n: int, dim: int, thumb: int | None) -> str:
    lines = ["embeddings {", f"  tensor_name: {json.dumps(tensor_name)}",
             '  tensor_path: "tensors.tsv"', '  metadata_path: "metadata.tsv"',
             f"  tensor_shape: {n}", f"  tensor_shape: {dim}"]
    if thumb is not None:
        lines += ["  sprite {", '    image_path: "sprite.png"', f"    single_image_dim: {thumb}",
                  f"    single_image_dim: {thumb}", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"
