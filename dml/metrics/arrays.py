"""Embeddings and labels as the metrics take them: contiguous float32 arrays (or torch tensors
left on an accelerator) and label arrays of the right length."""

from __future__ import annotations

from typing import Any

import numpy as np


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """``x`` as a float32 (n, d) array, checked: 2-D, not empty, finite (ValueError naming
    ``name`` otherwise)."""
    x = np.ascontiguousarray(_to_numpy(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _on_accelerator(x: Any) -> bool:
    """Whether ``x`` is a torch tensor on a non-CPU device (CUDA, MPS)."""
    dev = getattr(x, "device", None)
    return hasattr(x, "detach") and dev is not None and getattr(dev, "type", "cpu") != "cpu"


def _as_torch_embeddings(x: Any, name: str):
    """``x`` as a float32 (n, d) torch tensor on its own device (numpy: on the CPU), checked
    like ``as_embeddings``."""
    import torch

    t = x.detach() if hasattr(x, "detach") else torch.from_numpy(np.asarray(x))
    t = t.to(torch.float32).contiguous()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _as_labels(y: Any, n: int, name: str) -> np.ndarray:
    y = _to_numpy(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries but there are {n} embeddings")
    return y
