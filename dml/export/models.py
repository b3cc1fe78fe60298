"""The model exports (``hf``, ``pt2``, ``onnx``), each checked to embed as the PyTorch model
does before its folder appears, and ``load_exported_model`` (see :mod:`dml.export`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dml.export.base import (CHECK_IMAGES, EXPORT_FORMAT, EXPORT_VERSION, INPUT_NAME, OUTPUT_NAME,
                             ExportError, ExportResult, _run_dataset)
from dml.runs import Run

CHECK_ATOL = 1e-5             # exported model vs PyTorch model, max |difference| of embeddings


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
