"""Exports of a run (``dml export RUN --format ...`` and the checkpoint inspector's Export button).

Formats, each written as one folder (built under a temporary name beside it, then renamed):

``projector``: an evaluation's embeddings for TensorBoard's Embedding Projector
    (``tensorboard --logdir FOLDER``, or the standalone projector's "Load" dialog)::

        projector_config.pbtxt   the ProjectorConfig: tensor_path, metadata_path, tensor_shape and
                                 sprite { image_path single_image_dim single_image_dim }
        projector_config.json    the same for the standalone projector (projector.tensorflow.org)
        tensors.tsv              one point a line, its D values tab-separated (float32)
        metadata.tsv             a header line, then one line a point (columns: METADATA_COLUMNS)
        sprite.png               the points' images, row-major in a square grid of
                                 ceil(sqrt(n)) x ceil(sqrt(n)) thumbnails (unused cells black)

    Real points are the requested splits' embeddings of the evaluation ``evals/epoch_NNNN.npz``;
    synthetic points are the mixing strategy's points made from the evaluation's probe batch
    (``synthetic_*`` arrays). Their parents are stored as positions in the probe batch; the
    export maps them to training-split indices through the npz's ``probe_index`` (the probe
    batch's data-set indices). A training point's ``index`` is its data-set index: with a
    training subsample (``train_index`` in the npz, ``train.train_embed_max``) the subsample's
    indices, else its position. The sprite shows each real point's image and, for a synthetic
    point, its mixed image when the evaluation stored one (input-level mixing), else a grey tile.
    The projector refuses sprites over 8192 x 8192 px: thumbnails are shrunk to fit, and below
    MIN_THUMB_PX the points are subsampled (both are said in the result's notes).

``hf``: a Hugging Face-style model folder: ``config.json`` (EXPORT_FORMAT: the architecture
    record of the checkpoint's side file under ``model``, the input normalisation
    ``image_mean`` / ``image_std``, the data set, the source run and checkpoint) and
    ``model.safetensors`` (its checksum in config.json). ``load_exported_model`` loads it back
    through ``dml.checkpoints.load_checkpoint``'s validation.

``pt2``: ``model.pt2`` (``torch.export``; reload with ``torch.export.load(path).module()``) and
    config.json. Input: float32 NCHW images at the run's size, normalised as config.json says,
    any batch size; output: L2-normalised (batch, D) embeddings.

``onnx``: ``model.onnx`` (opset of ``torch.onnx.export(dynamo=True)``, input ``images``, output
    ``embeddings``, dynamic batch; config.json also in the model's metadata_props as
    ``tango_config``) and config.json. Needs the ``export`` extra (onnx, onnxscript,
    onnxruntime).

Every model format is checked before its folder appears: the exported file, loaded back, embeds
a batch of the run's images as the PyTorch model does (``CHECK_ATOL``), else ExportError and
nothing is written. Errors are ValueErrors with a one-line message (``dml export`` prints them as
one line).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dml.runs import Run, RunFormatError, resolve_run

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_run", "load_exported_model",
           "zip_folder", "resolve_eval_epoch", "resolve_checkpoint"]

FORMATS = {"projector": "TensorBoard projector folder (embeddings, metadata, sprite)",
           "hf": "Hugging Face-style model folder (config.json + model.safetensors)",
           "pt2": "torch.export program (model.pt2 + config.json)",
           "onnx": "ONNX model (model.onnx + config.json; needs the export extra)"}
MODEL_FORMATS = ("hf", "pt2", "onnx")
EXPORT_FORMAT = "tango-export"
EXPORT_VERSION = 1
REAL_SPLITS = ("train", "val", "test", "gallery")
METADATA_COLUMNS = ("class_id", "class_name", "split", "kind", "index", "strategy",
                    "parent_0_index", "parent_1_index", "parent_0_class", "parent_1_class",
                    "lambda")
MAX_SPRITE_PX = 8192          # the projector refuses larger sprites
MIN_THUMB_PX = 8              # below this, points are subsampled rather than thumbnails shrunk
BLANK_GREY = 128              # the tile of a synthetic point without a stored image
CHECK_ATOL = 1e-5             # exported model vs PyTorch model, max |difference| of embeddings
CHECK_IMAGES = 8              # images of the run's data set the model exports are checked on
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class ExportError(ValueError):
    """An export that cannot be made (what is missing, or a check that failed); one line."""


@dataclass
class ExportResult:
    """What an export wrote: the folder, its files, notes (points subsampled, thumbnails
    shrunk) and, for model formats, the check's one line."""

    path: Path
    format: str
    files: list[str]
    notes: list[str] = field(default_factory=list)
    check: str = ""
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- what to export


def column(value, n: int, fill, dtype, width: int | None = None):
    """``value`` as an (n,) or (n, width) array of ``dtype``; ``fill`` everywhere when it is
    None (a field a record lacks: no parents, no weight). Shared with the app's point table."""
    import numpy as np

    shape = (n,) if width is None else (n, width)
    if value is None:
        return np.full(shape, fill, dtype=dtype)
    return np.asarray(value, dtype).reshape(shape)


def resolve_eval_epoch(run: Run, epoch: str | int = "best") -> int:
    """The evaluation epoch named by ``best`` (the checkpoint chosen on validation), ``last`` or
    a number, whose npz exists; ExportError naming the saved evaluations otherwise."""
    have = run.eval_epochs()
    if not have:
        raise ExportError(f"run {run.id} has no saved evaluations (no evals/epoch_NNNN.npz: "
                          f"{_save_embeddings_text(run)}); nothing to export")
    which = str(epoch).strip().lower()
    if which == "last":
        return have[-1]
    if which == "best":
        try:
            best = (run.status().get("best") or {}).get("epoch")
        except RunFormatError:
            best = None
        if best is None:
            raise ExportError(f"run {run.id} has no best epoch yet (status.json names none); "
                              f"evaluations saved: {_epochs_text(have)}; pass --epoch N or last")
        if int(best) not in have:
            raise ExportError(f"run {run.id} has no saved evaluation of its best epoch {best} "
                              f"({_save_embeddings_text(run)}); evaluations saved: "
                              f"{_epochs_text(have)}")
        return int(best)
    n = _epoch_number(which)
    if n not in have:
        raise ExportError(f"run {run.id} has no saved evaluation of epoch {n}; evaluations "
                          f"saved: {_epochs_text(have)}")
    return n


def resolve_checkpoint(run: Run, epoch: str | int = "best") -> tuple[Path, Path, str, int | None]:
    """(weights, side file, label, epoch) of the checkpoint named by ``best``, ``last`` or an
    epoch number (best, last or a resume point of that epoch); ExportError naming the run's
    checkpoints otherwise."""
    ck = run.path / "checkpoints"
    found: list[tuple[str, Path, Path, int | None]] = []
    for tag in ("best", "last"):
        w = run.checkpoint_path(tag)
        if w.is_file():
            found.append((tag, w, ck / f"{tag}.json", _meta_epoch(ck / f"{tag}.json")))
    resume = ck / "resume"
    if resume.is_dir():
        for p in sorted(resume.iterdir()):
            if p.name.startswith("epoch_") and p.name[6:].isdigit() and \
                    (p / "model.safetensors").is_file():
                found.append((p.name, p / "model.safetensors", p / "model.json", int(p.name[6:])))
    listing = ", ".join(f"{t} (epoch {e})" if e is not None else t for t, _, _, e in found
                        if not t.startswith("epoch_")) or "none"
    which = str(epoch).strip().lower()
    if which in ("best", "last"):
        for tag, w, m, e in found:
            if tag == which:
                return w, m, tag, e
        raise ExportError(f"run {run.id} has no {which} checkpoint (checkpoints: {listing})")
    n = _epoch_number(which)
    for tag, w, m, e in found:
        if e == n:
            return w, m, tag if not tag.startswith("epoch_") else f"epoch{n:04d}", e
    kept = sorted({e for _, _, _, e in found if e is not None})
    raise ExportError(f"run {run.id} has no checkpoint of epoch {n} (checkpoints: {listing}; "
                      f"weights are kept for epochs {_epochs_text(kept)} only)")


def _epoch_number(which: str) -> int:
    try:
        n = int(which)
    except ValueError:
        raise ExportError(f"--epoch must be best, last or an epoch number, got {which!r}") \
            from None
    if n < 0:
        raise ExportError(f"--epoch must be best, last or an epoch number, got {which!r}")
    return n


def _epochs_text(epochs: Iterable[int]) -> str:
    epochs = list(epochs)
    return ", ".join(map(str, epochs)) if epochs else "none"


def _meta_epoch(meta: Path) -> int | None:
    try:
        e = json.loads(meta.read_text(encoding="utf-8")).get("epoch")
        return int(e) if e is not None else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _save_embeddings_text(run: Run) -> str:
    try:
        v = run.config().get("train", {}).get("save_embeddings")
    except RunFormatError:
        v = None
    return f"train.save_embeddings={v!r}" if v is not None else "train.save_embeddings unknown"


def parse_splits(splits: str | Iterable[str]) -> list[str] | None:
    """``test``, ``train,test`` (or a list) -> the real splits asked for, in order; ``all`` ->
    None (every split the evaluation has)."""
    parts = [s.strip().lower() for s in (splits.split(",") if isinstance(splits, str)
                                         else splits) if s and s.strip()]
    if not parts:
        raise ExportError("--split names no split; valid: train, val, test, gallery, all")
    if "all" in parts:
        return None
    bad = [s for s in parts if s not in REAL_SPLITS]
    if bad:
        raise ExportError(f"unknown split {bad[0]!r}; valid: train, val, test, gallery, all")
    return [s for s in REAL_SPLITS if s in parts]


# --------------------------------------------------------------------------- entry point

def export_run(run: Run | str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
               epoch: str | int = "best", split: str | Iterable[str] = "test",
               synthetic: bool = True, sprite: bool = True, max_points: int | None = None,
               data_root: str | None = None, force: bool = False,
               runs_root: str | os.PathLike | None = None,
               max_sprite_px: int = MAX_SPRITE_PX,
               log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``run`` (a Run, a run folder or an id under ``runs_root``) in format ``fmt``
    (FORMATS) into the folder ``out`` (default ``exports/<run id>-<fmt>-<which>``).

    ``epoch``: best, last or a number: the evaluation (projector) or the checkpoint (model
    formats). ``split``: the real points of the projector (``test``, ``train,test``, ``all``);
    for the model formats, the split whose first images check the export. ``synthetic``: the
    projector includes the evaluation's synthetic points; ``sprite``: it writes sprite.png (needs
    the run's data set; without it the export needs no data). ``max_points``: subsample the
    projector's points (seeded). ``force``: replace an existing ``out``. ``log``: called with
    each note as it happens."""
    from dml.runs import DEFAULT_RUNS_ROOT

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not isinstance(run, Run):
        run = resolve_run(str(run), runs_root if runs_root is not None else DEFAULT_RUNS_ROOT)
    else:
        run.info()
    splits = parse_splits(split)
    if max_points is not None and max_points < 1:
        raise ExportError(f"--max-points must be at least 1, got {max_points}")
    say = log or (lambda _msg: None)

    if fmt == "projector":
        e = resolve_eval_epoch(run, epoch)
        if splits is None:                  # all: the splits this evaluation has
            with np.load(run.eval_path(e), allow_pickle=False) as z:
                splits = [s for s in REAL_SPLITS if f"{s}_embeddings" in z.files]
            if not splits:
                raise ExportError(f"run {run.id}'s evaluation of epoch {e} has no embeddings of "
                                  f"any split ({_save_embeddings_text(run)})")
        label = f"epoch{e:04d}-{'+'.join(splits)}"
    else:
        weights, meta, tag, e = resolve_checkpoint(run, epoch)
        label = tag
    final = Path(out) if out is not None else Path("exports") / f"{run.id}-{fmt}-{label}"
    _check_out(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        if fmt == "projector":
            result = _export_projector(run, e, splits, tmp, synthetic=synthetic, sprite=sprite,
                                       max_points=max_points, data_root=data_root,
                                       max_sprite_px=max_sprite_px, say=say)
        else:
            result = _export_model(run, fmt, weights, meta, tag, tmp,
                                   split=splits[0] if splits else "test",
                                   data_root=data_root, say=say)
        if final.exists():            # force (checked above): the old export goes now
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)           # mkdtemp's folder is private (0700)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = final
    return result


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another --out, or pass "
                          f"--force to replace it")


def zip_folder(folder: str | os.PathLike) -> bytes:
    """The folder as zip bytes, its files under the folder's name (for a download)."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, Path(folder.name) / p.relative_to(folder))
    return buf.getvalue()


# --------------------------------------------------------------------------- the data set

def _run_dataset(run: Run, data_root: str | None, image_size: int | None = None,
                 purpose: str = "images"):
    from dml.data.registry import dataset_for_config

    cfg = run.config()
    d = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    name = d.get("name", "?")
    try:
        return dataset_for_config(d, root=data_root, image_size=image_size)
    except Exception as exc:   # missing files, unknown data set, ...
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"cannot load run {run.id}'s data set {name!r} for its {purpose} "
                          f"({first}); pass --data-root FOLDER") from None


# --------------------------------------------------------------------------- projector

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
            imgs = _denormalize(np.asarray(stored)[pts["row"][syn]], ds.mean, ds.std)
            place(syn, imgs)
        else:
            place(syn, grey)
    Image.fromarray(canvas, "RGB").save(path, format="PNG")


def _denormalize(x: np.ndarray, mean, std) -> np.ndarray:
    """Float normalised (B, C, H, W) -> uint8 (B, C, H, W): undoes ``(x / 255 - mean) / std``."""
    x = np.asarray(x, np.float32)
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.clip((x * s + m) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _pbtxt(tensor_name: str, n: int, dim: int, thumb: int | None) -> str:
    lines = ["embeddings {", f"  tensor_name: {json.dumps(tensor_name)}",
             '  tensor_path: "tensors.tsv"', '  metadata_path: "metadata.tsv"',
             f"  tensor_shape: {n}", f"  tensor_shape: {dim}"]
    if thumb is not None:
        lines += ["  sprite {", '    image_path: "sprite.png"', f"    single_image_dim: {thumb}",
                  f"    single_image_dim: {thumb}", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- model formats

def _export_model(run: Run, fmt: str, weights: Path, meta: Path, tag: str, out: Path, *,
                  split: str, data_root: str | None, say) -> ExportResult:
    import torch

    from dml import __version__
    from dml.checkpoints import load_checkpoint
    from dml.data.transforms import make_transform

    model, info = load_checkpoint(weights, meta)          # the validated path; CheckpointError
    m = info["model"]
    ds = _run_dataset(run, data_root, image_size=m["image_size"],
                      purpose="input normalisation and check images")
    if ds.channels != m["in_channels"]:
        raise ExportError(f"run {run.id}'s data set has {ds.channels}-channel images now, its "
                          f"model takes {m['in_channels']}: not the data it was trained on")
    sp = getattr(ds, split, None)
    if sp is None:
        split, sp = "test", ds.test
    n = min(CHECK_IMAGES, len(sp))
    x = make_transform(ds, train=False)(sp.load(torch.arange(n))).float().contiguous()
    with torch.no_grad():
        reference = model(x)
    cfg = run.config()
    d = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    config = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "export": fmt,
        "model_type": "tango-embedding-net", "architectures": ["EmbeddingNet"],
        "model": {k: m[k] for k in ("name", "in_channels", "image_size", "embedding_dim")}
        | {"params": dict(m.get("params") or {})},
        "image_mean": [float(v) for v in ds.mean], "image_std": [float(v) for v in ds.std],
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                  "shape": ["batch", m["in_channels"], m["image_size"], m["image_size"]],
                  "normalisation": "per channel: (pixel / 255 - image_mean) / image_std"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", m["embedding_dim"]],
                   "l2_normalized": True},
        "dataset": {"name": ds.name, **{k: d[k] for k in (
            "split", "split_seed", "val_classes", "split_version", "image_size") if k in d}},
        "source": {"run": run.id, "checkpoint": tag, "epoch": info.get("epoch"),
                   "step": info.get("step"), "best": info.get("best"),
                   "checkpoint_sha256": info.get("sha256"), "dml_version": __version__},
    }
    files = ["config.json"]
    if fmt == "hf":
        diff = _write_hf(model, config, out, x, reference)
        files.append("model.safetensors")
        what = "model.safetensors, reloaded through dml.checkpoints.load_checkpoint,"
    elif fmt == "pt2":
        diff = _write_pt2(model, config, out, x, reference)
        files.append("model.pt2")
        what = "model.pt2, reloaded with torch.export.load,"
    else:
        diff = _write_onnx(model, config, out, x, reference)
        files.append("model.onnx")
        what = "model.onnx, run by onnxruntime,"
    check = (f"ok: {what} embeds {n} {split} images as the PyTorch model does "
             f"(max |difference| {diff:.1e} <= {CHECK_ATOL:g})")
    return ExportResult(out, fmt, sorted(files), [], check,
                        {"epoch": info.get("epoch"), "checkpoint": tag, "max_diff": diff})


def _check(name: str, got, reference) -> float:
    import torch

    got = torch.as_tensor(np.asarray(got) if not hasattr(got, "detach") else got.detach())
    if tuple(got.shape) != tuple(reference.shape):
        raise ExportError(f"the exported {name} gives embeddings of shape {tuple(got.shape)}, "
                          f"the PyTorch model {tuple(reference.shape)}; nothing written")
    diff = float((got.float() - reference.float()).abs().max()) if got.numel() else 0.0
    if not diff <= CHECK_ATOL:
        raise ExportError(f"the exported {name} gives embeddings that differ from the PyTorch "
                          f"model's by up to {diff:.3g} (more than {CHECK_ATOL:g}); nothing "
                          f"written")
    return diff


def _write_json(path: Path, obj: Any) -> None:
    from dml.atomic import _json_default

    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _write_hf(model, config: dict, out: Path, x, reference) -> float:
    import hashlib

    import torch
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                metadata={"format": "pt"})
    (out / "model.safetensors").write_bytes(data)
    config["weights"] = {"file": "model.safetensors", "format": "safetensors",
                         "sha256": hashlib.sha256(data).hexdigest()}
    _write_json(out / "config.json", config)
    loaded, _ = load_exported_model(out)
    with torch.no_grad():
        return _check("model folder", loaded(x), reference)


def _batch_dim():
    import torch

    return torch.export.Dim("batch", min=1, max=1 << 20)


def _write_pt2(model, config: dict, out: Path, x, reference) -> float:
    import torch

    path = out / "model.pt2"
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
    except Exception as exc:
        raise ExportError(f"torch.export could not export the model "
                          f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    _write_json(out / "config.json", config)
    with torch.no_grad():
        diff = _check("model.pt2", loaded(x), reference)
        one = x[:1]                                     # another batch size: the batch is dynamic
        diff = max(diff, _check("model.pt2 (batch of 1)", loaded(one), model(one)))
    return diff


def onnx_missing() -> list[str]:
    """The packages the onnx format needs that are not installed ([] when it can run)."""
    import importlib.util

    return [p for p in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(p) is None]


def _write_onnx(model, config: dict, out: Path, x, reference) -> float:
    import warnings

    import torch

    missing = onnx_missing()
    if missing:
        raise ExportError(f"the onnx format needs {', '.join(missing)}: pip install -e "
                          f"'.[export]' (or use --format pt2, which needs nothing more)")
    import onnx
    import onnxruntime as ort

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), None, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: _batch_dim()},), dynamo=True,
                                        verbose=False, report=False)
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = "tango_config", json.dumps(config)
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx could not export the model "
                          f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    (out / "model.onnx").write_bytes(data)
    _write_json(out / "config.json", config)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    diff = _check("model.onnx", session.run(None, {INPUT_NAME: x.numpy()})[0], reference)
    one = x[:1]
    with torch.no_grad():
        diff = max(diff, _check("model.onnx (batch of 1)",
                                session.run(None, {INPUT_NAME: one.numpy()})[0], model(one)))
    return diff


# --------------------------------------------------------------------------- loading back

def load_exported_model(folder: str | os.PathLike, device: str = "cpu"):
    """(model, config) of an ``hf`` export folder. config.json is mapped to a Tango checkpoint
    side file (its ``model`` record and the weights' checksum) and the weights are loaded by
    ``dml.checkpoints.load_checkpoint``, with all its checks: a registered architecture within
    bounds, every tensor's name, shape and dtype against it, the checksum, finite weights.
    CheckpointError (a ValueError) when anything is wrong."""
    from dml.checkpoints import CheckpointError, check_format, load_checkpoint
    from dml.runs import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    folder = Path(folder)
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder} has no config.json; it is not a Tango model export")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f} is not valid JSON: {exc}") from None
    check_format(config, f, EXPORT_FORMAT, EXPORT_VERSION, "Tango model export")
    w = config.get("weights")
    sha = w.get("sha256") if isinstance(w, dict) else None
    if not (isinstance(sha, str) and len(sha) == 64
            and all(c in "0123456789abcdef" for c in sha)):
        raise CheckpointError(f"{f} has no weights.sha256 checksum of model.safetensors; it is "
                              f"not a Tango model folder (export --format hf)")
    if w.get("file", "model.safetensors") != "model.safetensors":
        raise CheckpointError(f"{f}: weights.file must be model.safetensors, got "
                              f"{w.get('file')!r}")
    side = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": config.get("model"), "sha256": sha,
            "epoch": (config.get("source") or {}).get("epoch")
            if isinstance(config.get("source"), dict) else None}
    model, _ = load_checkpoint(folder / "model.safetensors", side, device=device)
    return model, config
