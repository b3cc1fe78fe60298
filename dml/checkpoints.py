"""A run's checkpoint files: the weights (safetensors, never a pickle) with a JSON side file
naming the architecture, and the training state a run resumes from. Importable without the
trainer: the app and ``dml eval`` load checkpoints with it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dml.config import RunConfig
from dml.atomic import atomic_write_bytes, atomic_write_json, read_json
from dml.runs import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Run, RunFormatError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_training_state",
           "load_training_state", "resolve_device"]


def save_checkpoint(run: Run, tag: str, model: nn.Module, model_meta: dict, cfg: RunConfig,
                    epoch: int, step: int, best: dict | None) -> None:
    """Weights as safetensors (never a pickle) plus a JSON side file naming the architecture."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    atomic_write_bytes(run.checkpoint_path(tag), data)
    atomic_write_json(run.path / "checkpoints" / f"{tag}.json", {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tag": tag,
        "epoch": epoch, "step": step, "model": model_meta, "config": cfg.to_dict(),
        "best": best, "sha256": hashlib.sha256(data).hexdigest()})


class CheckpointError(ValueError):
    """A checkpoint that is not Tango's, is corrupt, or does not fit its architecture."""


def load_checkpoint(weights: str | os.PathLike, meta: str | os.PathLike | dict | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from ``X.safetensors`` and its side file ``X.json`` (or ``meta``).

    Only safetensors are read: nothing is unpickled, no code runs. Everything else raises
    CheckpointError with what was wrong.
    """
    from safetensors.torch import load as st_load

    from dml.models import build_model

    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {str(weights)!r} does not exist")
    raw = weights.read_bytes()
    if raw[:2] == b"\x80\x02" or raw[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{weights} is a pickle/zip (torch.save) file; Tango only opens "
                              f"safetensors checkpoints and never unpickles files")
    if isinstance(meta, dict):
        info = meta
    else:
        meta_path = Path(meta) if meta is not None else weights.with_suffix(".json")
        if not meta_path.is_file():
            raise CheckpointError(f"{weights} has no side file {meta_path.name} naming its "
                                  f"architecture; it is not a Tango checkpoint")
        try:
            info = read_json(meta_path)
        except ValueError as exc:
            raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{weights}: side file is not a {CHECKPOINT_FORMAT!r} file; it is "
                              f"not a Tango checkpoint")
    if info.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{weights}: checkpoint format version {info.get('version')!r}, "
                              f"this Tango reads {CHECKPOINT_VERSION}")
    if info.get("sha256"):
        if hashlib.sha256(raw).hexdigest() != info["sha256"]:
            raise CheckpointError(f"{weights} does not match the checksum in its side file: "
                                  f"the file is corrupt or was replaced")
    try:
        state = st_load(raw)
    except Exception as exc:  # SafetensorError, or a header that is not JSON
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from exc
    m = info["model"]
    try:
        model = build_model(m["name"], m["in_channels"], m["image_size"], m["embedding_dim"],
                            **m.get("params", {}))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{weights} does not fit the architecture in its side file "
                              f"({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), info


def save_training_state(run: Run, loss_fn, strategy, optimizer, scheduler, epoch: int,
                        step: int, best: dict | None) -> None:
    """Optimizer, loss (proxies), strategy and RNG state after ``epoch``, to resume from."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in (("loss", loss_fn), ("strategy", strategy)):
        for k, v in _own_state(mod).items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(run.path / "checkpoints" / "last_state.safetensors", save(tensors))
    atomic_write_json(run.path / "checkpoints" / "last_state.json", {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
        "step": step, "best": best, "param_groups": opt["param_groups"],
        "optim_scalars": scalars, "scheduler": scheduler.state_dict()})


def load_training_state(run: Run, model, loss_fn, strategy, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    ck = run.path / "checkpoints"
    if not (ck / "last_state.json").is_file() or not run.checkpoint_path("last").is_file():
        raise RunFormatError(f"run {run.path} has no complete epoch to resume from "
                             f"(checkpoints/last_state.json is missing); start a new run")
    meta = read_json(ck / "last_state.json")
    model_state, _ = load_checkpoint(run.checkpoint_path("last"))
    model.load_state_dict(model_state.state_dict())
    tensors = load_file(ck / "last_state.safetensors")
    for prefix, mod in (("loss", loss_fn), ("strategy", strategy)):
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing, unexpected = mod.load_state_dict(sd, strict=False)
        own_missing = [k for k in missing if k in _own_state(mod)]
        if own_missing or unexpected:
            raise RunFormatError(f"run {run.path}: the saved {prefix} state does not fit "
                                 f"(missing {own_missing[:3]}, unexpected {unexpected[:3]})")
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state without the loss a strategy wraps (saved as the loss's own state)."""
    return {k: v for k, v in module.state_dict().items()
            if not (k.startswith("loss.") and hasattr(module, "bound"))}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use 'cpu' "
                         f"or 'auto'")
    return dev
