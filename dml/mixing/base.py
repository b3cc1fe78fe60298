"""The one abstraction every mixing strategy implements, and the one record type for the
synthetic points it makes.

A strategy turns a clean batch into a training loss::

    result = strategy.step(model, loss_fn, images, labels)   # StepResult
    result.loss.backward()

and reports the synthetic points it used (``result.synthetic``) so the trainer can store them
with their provenance and the app can show them against the real classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn


@dataclass
class SyntheticPoints:
    """Synthetic points of one batch, with where they came from. S points, batch of B.

    embeddings: (S, D) the points in embedding space.
    labels: (S, C) float class memberships (a mix of classes c, c' with weights ratio, 1-ratio);
        for expansion-style points a one-hot row.
    parents: (S, 2) long indices into the batch of the two examples mixed.
    ratio: (S,) float, lambda (Metrix, Proxy Synthesis) or k/(n+1) (Embedding Expansion):
        the weight of parent 0.
    hardest: (S,) bool, whether the point was chosen as (part of) a hardest pair.
    kind: short name of the strategy/level that made the points ("metrix-embed", "ee", ...), or
        one name per point when a strategy combines others.
    images: (S, C, H, W) the mixed input images (input-level mixing only).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    parents: torch.Tensor
    ratio: torch.Tensor
    kind: str | list[str]
    hardest: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def kinds(self) -> list[str]:
        """The kind of every point."""
        return [self.kind] * len(self) if isinstance(self.kind, str) else list(self.kind)

    def subset(self, index: torch.Tensor) -> "SyntheticPoints":
        """The points at ``index`` (S',), same provenance fields."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SyntheticPoints(self.embeddings[index], self.labels[index], self.parents[index],
                               self.ratio[index],
                               self.kind if isinstance(self.kind, str)
                               else [self.kind[int(i)] for i in index], pick(self.hardest),
                               pick(self.images))

    @staticmethod
    def concat(parts: list["SyntheticPoints"]) -> "SyntheticPoints":
        """One record from several (used when a strategy combines others); kinds per point."""
        parts = [p for p in parts if p is not None]
        opt = lambda name: (None if any(getattr(p, name) is None for p in parts)  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts]))
        width = max(p.labels.shape[1] for p in parts)
        return SyntheticPoints(torch.cat([p.embeddings for p in parts]),
                               torch.cat([torch.nn.functional.pad(p.labels,
                                                                  (0, width - p.labels.shape[1]))
                                          for p in parts]),
                               torch.cat([p.parents for p in parts]),
                               torch.cat([p.ratio for p in parts]),
                               [k for p in parts for k in p.kinds()],
                               opt("hardest"), opt("images"))

    def to_numpy(self, class_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Arrays for an npz. ``class_ids`` maps membership columns to data set class ids."""
        memb = self.labels.detach().float().cpu().numpy()
        top2 = np.argsort(-memb, axis=1)[:, :2] if memb.shape[1] > 1 else \
            np.zeros((len(memb), 2), dtype=np.int64)
        out = {
            "embeddings": self.embeddings.detach().float().cpu().numpy(),
            "membership": memb.astype(np.float32),
            "parents": self.parents.detach().cpu().numpy().astype(np.int64),
            "ratio": self.ratio.detach().float().cpu().numpy(),
            "hardest": (self.hardest if self.hardest is not None
                        else torch.zeros(len(self), dtype=torch.bool)).detach().cpu().numpy(),
            "kind": np.array(self.kinds()),
            "top_classes": top2 if class_ids is None else class_ids[top2],
        }
        if self.images is not None:
            out["images"] = self.images.detach().cpu().numpy()
        return out


@dataclass
class StepResult:
    loss: torch.Tensor                                    # scalar, to backpropagate
    terms: dict[str, float] = field(default_factory=dict)  # detached parts, for logging
    synthetic: SyntheticPoints | None = None


class MixingStrategy(nn.Module):
    """Base class: subclasses set ``name`` and ``supported_losses`` and implement ``step``.

    ``supported_losses = None`` means every loss. Parameters are keyword arguments of
    ``__init__`` with the papers' defaults; ``build_mixing`` validates names and pairs.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1   # raised when the strategy's results change (docs/METHODS.md §12)
    supported_losses: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, loss_name: str):
        super().__init__()
        self.loss_name = loss_name

    def step(self, model: nn.Module, loss_fn: nn.Module, images: torch.Tensor,
             labels: torch.Tensor) -> StepResult:
        raise NotImplementedError

    @torch.no_grad()
    def synthesize(self, model: nn.Module, loss_fn: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor) -> SyntheticPoints | None:
        """The synthetic points this strategy would make for a batch (no gradients)."""
        return self.step(model, loss_fn, images, labels).synthetic

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}"


def loss_terms(loss_fn: nn.Module, prefix: str = "") -> dict[str, float]:
    """The loss's last component values as floats, keys prefixed."""
    out = {}
    for k, v in getattr(loss_fn, "last_terms", {}).items():
        out[prefix + k] = float(v)
    return out


MIXINGS: dict[str, type[MixingStrategy]] = {}


def register_mixing(cls: type[MixingStrategy]) -> type[MixingStrategy]:
    """Class decorator: make a strategy available by its ``name`` (CLI --mixing NAME)."""
    if not cls.name or cls.name in MIXINGS:
        raise ValueError(f"mixing strategy name {cls.name!r} is empty or already registered")
    MIXINGS[cls.name] = cls
    return cls


@register_mixing
class NoMixing(MixingStrategy):
    """The clean loss: ``E = l(embeddings, labels)``."""

    name = "none"

    def step(self, model, loss_fn, images, labels) -> StepResult:
        emb = model(images)
        loss = loss_fn(emb, labels)
        return StepResult(loss, {"loss": float(loss.detach()), **loss_terms(loss_fn)})

    @torch.no_grad()
    def synthesize(self, model, loss_fn, images, labels):
        return None
