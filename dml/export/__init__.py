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

Modules: ``base`` (formats, errors, which evaluation or checkpoint, the output folder),
``projector`` and ``models`` (hf, pt2, onnx, and loading back); everything public is importable
from ``dml.export``.

Every model format is checked before its folder appears: the exported file, loaded back, embeds
a batch of the run's images as the PyTorch model does (``CHECK_ATOL``), else ExportError and
nothing is written. Errors are ValueErrors with a one-line message (``dml export`` prints them as
one line).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dml.export.base import (FORMATS, MAX_SPRITE_PX, METADATA_COLUMNS, REAL_SPLITS, ExportError,
                             ExportResult, _check_out, _save_embeddings_text, column,
                             parse_splits, resolve_checkpoint, resolve_eval_epoch, zip_folder)
from dml.export.models import _export_model, load_exported_model, onnx_missing
from dml.export.projector import _export_projector
from dml.runs import Run, resolve_run

__all__ = ["FORMATS", "ExportError", "ExportResult", "export_run", "load_exported_model",
           "zip_folder", "resolve_eval_epoch", "resolve_checkpoint", "column",
           "METADATA_COLUMNS", "onnx_missing"]


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
