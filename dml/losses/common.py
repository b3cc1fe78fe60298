"""Numerics shared by the losses (weighted log-sum-exp over masks, safe means) and their repr."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def _weighted_logsumexp(
    x: torch.Tensor, w: torch.Tensor, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sum_j w_j exp(x_j)`` over entries with ``w_j > 0``, and whether any entry exists.

    Rows without any entry get value 0 (no gradient) instead of -inf, so that callers can mask
    them without NaN gradients.
    """
    keep = w > 0
    nonempty = keep.any(dim)
    tiny = torch.finfo(x.dtype).tiny
    z = torch.where(keep, x + torch.log(w.clamp_min(tiny)), float("-inf"))
    z = torch.where(nonempty.unsqueeze(dim), z, 0.0)  # empty rows: finite dummies
    lse = torch.logsumexp(z, dim=dim)
    return torch.where(nonempty, lse, 0.0), nonempty


def _log1p_weighted_sum_exp(x: torch.Tensor, w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(1 + sum_j w_j exp(x_j))``, stable; 0 for rows with no positive weight."""
    lse, nonempty = _weighted_logsumexp(x, w, dim)
    return torch.where(nonempty, F.softplus(lse), 0.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, or ``num`` (= 0, keeping its graph) where ``den <= 0``. Dividing by 1 there,
    rather than by a tiny number, keeps the backward pass free of inf * 0."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``keep`` (bool, same shape); 0 with a grad path if none kept."""
    keep_f = keep.to(values.dtype)
    return (values * keep_f).sum() / keep_f.sum().clamp_min(1.0)


class _HParamsRepr:
    """``extra_repr`` listing the constructor's hyperparameters (for logs)."""

    def extra_repr(self) -> str:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))
