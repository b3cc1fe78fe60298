"""A run's checkpoint files: the weights (safetensors, never a pickle) with a JSON side file
naming the architecture, and the training state a run resumes from. Importable without the
trainer: the app and ``dml eval`` load checkpoints with it.

Layout under ``<run>/checkpoints/``::

    best.safetensors + best.json      the checkpoint that was best on validation
    last.safetensors + last.json      the latest epoch's weights (links into its resume point)
    resume/epoch_NNNN/                the resume point of epoch NNNN, one unit: model.safetensors,
                                      model.json, state.safetensors (optimizer, proxies, RNG) and
                                      state.json (written last, with the checksums of the others)

A resume point is written in a temporary folder and renamed into place, so a process killed at
any moment leaves either the previous epoch's point or the new one, never weights of one epoch
with the optimizer of another; ``load_training_state`` verifies every piece before using it.

What loading a checkpoint will and will not do: it reads the weights file and its side file
only; it never unpickles, never reads another file the side file names, never downloads; it
builds the architecture from validated, bounded fields (a registered model, 1..4 channels,
4..1024 px, 1..8192 dimensions) and checks every tensor's name, dtype and shape in the file's
header against that architecture before allocating anything; weights that are not finite are
refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dml.config import RunConfig
from dml.atomic import atomic_link, atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from dml.runs import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Run, RunFormatError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_training_state",
           "load_training_state", "resume_points", "resolve_device"]

# bounds of the architecture fields a side file may name
MODEL_BOUNDS = {"in_channels": (1, 4), "image_size": (4, 1024), "embedding_dim": (1, 8192)}


def _checkpoint_files(tag: str, model: nn.Module, model_meta: dict, cfg: RunConfig,
                      epoch: int, step: int, best: dict | None) -> tuple[bytes, dict]:
    """The weights (safetensors bytes) and the side file's record of a checkpoint."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return data, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tag": tag,
                  "epoch": epoch, "step": step, "model": model_meta, "config": cfg.to_dict(),
                  "best": best, "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(run: Run, tag: str, model: nn.Module, model_meta: dict, cfg: RunConfig,
                    epoch: int, step: int, best: dict | None) -> None:
    """Weights as safetensors (never a pickle) plus a JSON side file naming the architecture
    (the side file, written second, carries the weights' checksum)."""
    data, meta = _checkpoint_files(tag, model, model_meta, cfg, epoch, step, best)
    atomic_write_bytes(run.checkpoint_path(tag), data)
    atomic_write_json(run.path / "checkpoints" / f"{tag}.json", meta)


class CheckpointError(ValueError):
    """A checkpoint that is not Tango's, is corrupt, or does not fit its architecture."""


def check_format(record: Any, where, fmt: str, version: int, what: str) -> None:
    """A JSON record names the format and version this Tango reads, else CheckpointError:
    '<where>: not a <fmt> file; it is not a <what>' or '... format version v, this Tango reads
    w'."""
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise CheckpointError(f"{where}: not a {fmt!r} file; it is not a {what}")
    if record.get("version") != version:
        raise CheckpointError(f"{where}: {fmt} format version {record.get('version')!r}, this "
                              f"Tango reads {version}")


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
    with open(weights, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x80\x02" or magic == b"PK\x03\x04":
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
    check_format(info, weights, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "Tango checkpoint")
    m = _model_fields(weights, info)      # a bad side file fails before the weights are read
    _check_header(weights, m)             # names, shapes, dtypes and size, before any tensor
    raw = weights.read_bytes()
    if info.get("sha256"):
        if hashlib.sha256(raw).hexdigest() != info["sha256"]:
            raise CheckpointError(f"{weights} does not match the checksum in its side file: "
                                  f"the file is corrupt or was replaced")
    try:
        state = st_load(raw)
    except Exception as exc:  # SafetensorError
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{weights} has weights that are not finite (NaN or inf) in "
                              f"{len(bad)} tensor(s), e.g. {bad[0]!r}: the training diverged; "
                              f"this checkpoint cannot embed anything")
    try:
        model = build_model(m["name"], m["in_channels"], m["image_size"], m["embedding_dim"],
                            **m["params"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{weights} does not fit the architecture in its side file "
                              f"({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), info


def _model_fields(weights: Path, info: dict) -> dict:
    """The side file's architecture, validated and bounded: a registered model name, integer
    channels / size / dimension within MODEL_BOUNDS, and only that model's own parameters with
    values of their defaults' types; never a weights file or a download."""
    from dml.config import check_params
    from dml.models import MODELS, model_params

    m = info.get("model")
    if not isinstance(m, dict):
        raise CheckpointError(f"{weights}: the side file has no 'model' record naming the "
                              f"architecture; it is not a Tango checkpoint")
    name = m.get("name")
    if not isinstance(name, str) or name not in MODELS:
        raise CheckpointError(f"{weights}: unknown model {name!r} in the side file; Tango "
                              f"builds {', '.join(MODELS)}")
    out = {"name": MODELS.canonical(name)}
    for key, (lo, hi) in MODEL_BOUNDS.items():
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise CheckpointError(f"{weights}: model.{key}={v!r} in the side file; it must be an "
                                  f"integer in {lo}..{hi}")
        out[key] = v
    params = m.get("params", {})
    if not isinstance(params, dict):
        raise CheckpointError(f"{weights}: model.params in the side file must be a table, got "
                              f"{type(params).__name__}")
    if params.get("weights_path") is not None or params.get("pretrained"):
        raise CheckpointError(f"{weights}: the side file asks to load other weights "
                              f"(weights_path / pretrained); a checkpoint is read from its own "
                              f"file only")
    params = {k: v for k, v in params.items() if k not in ("weights_path", "pretrained")}
    valid = model_params(out["name"])
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise CheckpointError(f"{weights}: unknown model parameter(s) {unknown} in the side "
                              f"file; {out['name']} takes {sorted(valid)}")
    try:
        check_params(f"model {out['name']!r}", params, valid)
    except ValueError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    out["params"] = params
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _check_header(weights: Path, m: dict) -> None:
    """Every tensor named in the safetensors header against the architecture, built on the
    meta device (no memory): same names, shapes and dtypes, and a file exactly as long as those
    tensors, before anything is read or allocated."""
    from dml.models import build_model

    size = weights.stat().st_size
    try:
        with open(weights, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} for a file of {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    try:
        with torch.device("meta"):
            expected = build_model(m["name"], m["in_channels"], m["image_size"],
                                   m["embedding_dim"], **m["params"]).state_dict()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: the side file's architecture cannot be built "
                              f"({str(exc).splitlines()[0]})") from None
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{weights} does not fit the architecture in its side file "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in expected.items():
        entry = header[k] if isinstance(header[k], dict) else {}
        if entry.get("shape") != list(t.shape) or _DTYPES.get(entry.get("dtype")) != t.dtype:
            raise CheckpointError(f"{weights} does not fit the architecture in its side file: "
                                  f"tensor {k!r} is {entry.get('dtype')} {entry.get('shape')} "
                                  f"in the file, {str(t.dtype)[6:]} {list(t.shape)} in the "
                                  f"architecture")
    data = sum(t.numel() * t.element_size() for t in expected.values())
    if size != 8 + n + data:
        raise CheckpointError(f"{weights} is {size} bytes, but its header describes "
                              f"{8 + n + data}: the file is truncated or padded")


def resume_points(run: Run) -> list[Path]:
    """The complete resume points of a run, newest first (``checkpoints/resume/epoch_NNNN``)."""
    root = run.path / "checkpoints" / "resume"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_")
                   and p.name[6:].isdigit()), key=lambda p: p.name, reverse=True)


def save_training_state(run: Run, model: nn.Module, model_meta: dict, cfg: RunConfig, loss_fn,
                        strategy, optimizer, scheduler, epoch: int, step: int,
                        best: dict | None, *, rng: dict[str, torch.Tensor] | None = None,
                        scaler: dict | None = None, world_size: int = 1) -> Path:
    """The resume point of ``epoch``: weights, optimizer, loss (proxies), strategy and RNG
    state as one unit. Written in a temporary folder, renamed into ``resume/epoch_NNNN`` (the
    moment it exists), then ``last.safetensors`` / ``last.json`` are pointed at its weights and
    older points removed. Returns the point's folder.

    ``rng``: the generator states to keep (see :func:`rng_states`; default: this process's CPU
    generator), ``scaler``: the fp16 gradient scaler's state, ``world_size``: the number of
    training processes (each rank's generators are kept)."""
    from safetensors.torch import save

    data, model_info = _checkpoint_files("last", model, model_meta, cfg, epoch, step, best)
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
    for k, v in (rng if rng is not None else rng_states()).items():
        tensors[f"rng.{k}"] = v
    state = save(tensors)
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
              "step": step, "best": best, "param_groups": opt["param_groups"],
              "optim_scalars": scalars, "scheduler": scheduler.state_dict(),
              "scaler": scaler, "world_size": world_size,
              "model_sha256": model_info["sha256"],
              "state_sha256": hashlib.sha256(state).hexdigest()}

    ck = run.path / "checkpoints"
    root = ck / "resume"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".epoch_{epoch:04d}.", suffix=".tmp", dir=root))
    try:
        for name, payload in (("model.safetensors", data),
                              ("model.json", _json_bytes(model_info)),
                              ("state.safetensors", state),
                              ("state.json", _json_bytes(record))):   # the record last
            with open(tmp / name, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = root / f"epoch_{epoch:04d}"
        if final.exists():                 # a point of this epoch from before a fallback
            shutil.rmtree(final)
        os.rename(tmp, final)              # the resume point exists from here on
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_last_at(run, final)
    for old in resume_points(run)[1:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".epoch_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for legacy in ("last_state.safetensors", "last_state.json"):   # the layout before points
        (ck / legacy).unlink(missing_ok=True)
    return final


def _json_bytes(obj: Any) -> bytes:
    from dml.atomic import _json_default

    return json.dumps(obj, indent=2, default=_json_default).encode("utf-8")


def _point_last_at(run: Run, point: Path) -> None:
    """``last.safetensors`` / ``last.json`` become the resume point's weights (the side file
    second: a reader comparing checksums never accepts a mixed pair)."""
    ck = run.path / "checkpoints"
    atomic_link(point / "model.safetensors", ck / "last.safetensors")
    atomic_link(point / "model.json", ck / "last.json")


def _verify_point(point: Path) -> dict:
    """The record of a resume point after checking that its pieces are one epoch's."""
    try:
        record = read_json(point / "state.json")
        model_info = read_json(point / "model.json")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume point {point} is incomplete or unreadable ({exc})") \
            from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT or \
            record.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"resume point {point}: state.json is not a Tango checkpoint "
                              f"record of version {CHECKPOINT_VERSION}")
    if not isinstance(model_info, dict) or model_info.get("epoch") != record.get("epoch"):
        raise CheckpointError(f"resume point {point}: its weights are of epoch "
                              f"{model_info.get('epoch') if isinstance(model_info, dict) else '?'} "
                              f"but its training state of epoch {record.get('epoch')}")
    for name, key in (("model.safetensors", "model_sha256"), ("state.safetensors", "state_sha256")):
        try:
            digest = hashlib.sha256((point / name).read_bytes()).hexdigest()
        except OSError as exc:
            raise CheckpointError(f"resume point {point}: {name} is missing ({exc})") from None
        if digest != record.get(key):
            raise CheckpointError(f"resume point {point}: {name} does not match the checksum in "
                                  f"state.json (the file is corrupt or from another epoch)")
    return record


def rng_states(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's generator states as resume-state tensors: ``torch`` (CPU) and, when
    training on CUDA, ``cuda`` (a multi-process run keeps each rank's under ``rank<r>.``)."""
    out = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def load_training_state(run: Run, model, loss_fn, strategy, optimizer, scheduler, *,
                        rank: int = 0, device: torch.device | None = None,
                        readonly: bool = False) -> dict:
    """Restore the newest consistent resume point into the given objects and return its
    record (epoch, step, best). A point that fails its checks is named and skipped for the
    previous one; with none left, RunFormatError says why. ``rank``: whose generator states
    to restore (of a multi-process run); ``readonly``: leave the run's files alone (the other
    ranks, after rank 0 has loaded)."""
    from safetensors.torch import load_file

    problems = []
    for point in resume_points(run):
        try:
            record = _verify_point(point)
            model_state, _ = load_checkpoint(point / "model.safetensors", point / "model.json")
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        tensors = load_file(point / "state.safetensors")
        _restore(run, record, tensors, model, model_state, loss_fn, strategy, optimizer,
                 scheduler, rank, device)
        if readonly:
            return record
        for bad in resume_points(run):      # newer points that failed: never tried again
            if bad.name > point.name:
                shutil.rmtree(bad, ignore_errors=True)
        _point_last_at(run, point)
        return record
    legacy = _legacy_state(run, problems)
    if legacy is not None:
        record, tensors, model_state = legacy
        _restore(run, record, tensors, model, model_state, loss_fn, strategy, optimizer,
                 scheduler, rank, device)
        return record
    why = ("; ".join(problems)) if problems else "no epoch was completed"
    raise RunFormatError(f"run {run.path} has no consistent epoch to resume from ({why}); "
                         f"start a new run")


def _legacy_state(run: Run, problems: list[str]):
    """A run written before resume points (``last_state.*`` beside ``last.*``), accepted only
    when its weights and its training state are of the same epoch."""
    from safetensors.torch import load_file

    ck = run.path / "checkpoints"
    if not (ck / "last_state.json").is_file() or not run.checkpoint_path("last").is_file():
        return None
    try:
        record = read_json(ck / "last_state.json")
        model_state, info = load_checkpoint(run.checkpoint_path("last"))
        tensors = load_file(ck / "last_state.safetensors")
    except (CheckpointError, OSError, ValueError) as exc:
        problems.append(f"{ck}/last_state.*: {exc}")
        return None
    if info.get("epoch") != record.get("epoch"):
        problems.append(f"{ck}: last.safetensors is of epoch {info.get('epoch')} but "
                        f"last_state.json of epoch {record.get('epoch')} (the process was "
                        f"stopped between the two)")
        return None
    return record, tensors, model_state


def _restore(run: Run, meta: dict, tensors: dict, model, model_state, loss_fn, strategy,
             optimizer, scheduler, rank: int = 0, device: torch.device | None = None) -> None:
    model.load_state_dict(model_state.state_dict())
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
    own = f"rng.rank{rank}."           # this rank's generators, else the run's (one process)
    pick = {k[len(own):]: v for k, v in tensors.items() if k.startswith(own)} or \
        {k[4:]: v for k, v in tensors.items() if k.startswith("rng.") and "rank" not in k}
    torch.set_rng_state(pick["torch"])
    if "cuda" in pick and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(pick["cuda"], device)


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
