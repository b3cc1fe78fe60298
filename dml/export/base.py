"""What every export shares: the formats, errors and result, which evaluation or checkpoint to
export, the output folder and the run's data set (see :mod:`dml.export`)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dml.runs import EVAL_SPLITS, Run, RunFormatError


FORMATS = {"projector": "TensorBoard projector folder (embeddings, metadata, sprite)",
           "hf": "Hugging Face-style model folder (config.json + model.safetensors)",
           "pt2": "torch.export program (model.pt2 + config.json)",
           "onnx": "ONNX model (model.onnx + config.json; needs the export extra)"}
MODEL_FORMATS = ("hf", "pt2", "onnx")
EXPORT_FORMAT = "tango-export"
EXPORT_VERSION = 1
REAL_SPLITS = EVAL_SPLITS
METADATA_COLUMNS = ("class_id", "class_name", "split", "kind", "index", "strategy",
                    "parent_0_index", "parent_1_index", "parent_0_class", "parent_1_class",
                    "lambda")
MAX_SPRITE_PX = 8192          # the projector refuses larger sprites
MIN_THUMB_PX = 8              # below this, points are subsampled rather than thumbnails shrunk
BLANK_GREY = 128              # the tile of a synthetic point without a stored image
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
