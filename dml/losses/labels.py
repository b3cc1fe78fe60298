"""Class memberships: hard labels as one-hot rows, soft labels as they are, mixed memberships,
and the soft pair targets the pair losses score."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _is_soft(labels: torch.Tensor) -> bool:
    return labels.dim() == 2


def as_membership(
    labels: torch.Tensor, num_classes: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Class memberships ``(N, num_classes)`` float from hard ``(N,)`` or soft ``(N, C)`` labels.

    Hard labels become one-hot rows; soft labels are returned as they are (cast to ``dtype``,
    default float32 for non-float input), after checking their width.
    """
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(
                f"soft labels have {labels.shape[1]} columns, expected {num_classes}"
            )
        if dtype is not None:
            return labels.to(dtype)
        return labels if labels.is_floating_point() else labels.float()
    if labels.dim() != 1:
        raise ValueError(f"labels must be (N,) hard or (N, C) soft, got shape {tuple(labels.shape)}")
    return F.one_hot(labels.long(), num_classes).to(dtype or torch.float32)


def mixed_membership(first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor | float,
                     num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class memberships ``(N, num_classes)`` of mixes: ``lam * onehot(first) + (1 - lam) *
    onehot(second)`` for hard labels ``first``, ``second`` (N,) and ``lam`` (scalar or (N,)),
    computed as ``lerp(onehot(second), onehot(first), lam)`` (a class that is both gets 1)."""
    lam = torch.as_tensor(lam, dtype=dtype, device=first.device)
    lam = lam[:, None] if lam.dim() == 1 else lam
    return as_membership(second, num_classes, dtype).lerp_(as_membership(first, num_classes,
                                                                          dtype), lam)


def pair_targets(labels_a: torch.Tensor, labels_r: torch.Tensor) -> torch.Tensor:
    """Soft pair targets ``Y`` (A, R) in [0, 1]: the probability that anchor and reference share a class.

    hard x hard: ``[la_i == lr_j]``. Otherwise both become memberships (the hard side one-hot with
    the soft side's width C) and ``Y = Ma @ Mr.T``. For a clean anchor of class c and a reference
    mixing c and c' with weights lambda, 1 - lambda this is exactly the Metrix mixed label lambda.
    """
    if not _is_soft(labels_a) and not _is_soft(labels_r):
        return (labels_a[:, None] == labels_r[None, :]).float()
    if _is_soft(labels_a) and _is_soft(labels_r) and labels_a.shape[1] != labels_r.shape[1]:
        raise ValueError(
            f"soft labels disagree on the number of classes: {labels_a.shape[1]} vs {labels_r.shape[1]}"
        )
    num_classes = labels_a.shape[1] if _is_soft(labels_a) else labels_r.shape[1]
    dtype = labels_a.dtype if _is_soft(labels_a) else labels_r.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    ma = as_membership(labels_a, num_classes, dtype)
    mr = as_membership(labels_r, num_classes, dtype)
    return (ma @ mr.T).clamp_(0.0, 1.0)
