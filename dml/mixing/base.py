"""The one abstraction every mixing strategy implements, and the one record type for the
synthetic points it makes.

A strategy wraps a loss and is used like one::

    criterion = EmbeddingExpansion(TripletLoss(), n=2)     # checks what the loss can do
    loss = criterion(model(images), labels)                # embedding level
    loss = MetrixInput(MultiSimilarityLoss())(model, images, labels)   # model level

and, asked for them (``step(..., record=True)``, ``synthesize``), reports the synthetic points
it made with their provenance, so the trainer can store them and the app can show them against
the real classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from dml.registry import Registry


@dataclass
class SyntheticPoints:
    """Synthetic points of one batch, with where they came from. S points, batch of B.

    embeddings: (S, D) the points in embedding space.
    membership: (S, C) float class memberships (a mix of classes c, c' with weights weight,
        1 - weight); for expansion-style points a one-hot row.
    parents: (S, 2) long indices into the batch of the two examples the point is made from.
    weight: (S,) float, the weight of parent 0 in an interpolated point: lambda (Metrix, Proxy
        Synthesis) or (n + 1 - k) / (n + 1) (Embedding Expansion); NaN for a point that is not an
        interpolation (Symmetrical Synthesis: parent 0 reflected about parent 1's axis).
    hardest: (S,) bool, whether the point was chosen as (part of) a hardest pair.
    kind: short name of the strategy/level that made the points ("metrix-embed", "ee", ...), or
        one name per point when a strategy combines others.
    images: (S, C, H, W) the mixed input images (input-level mixing only).
    """

    embeddings: torch.Tensor
    membership: torch.Tensor
    parents: torch.Tensor
    weight: torch.Tensor
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
        return SyntheticPoints(self.embeddings[index], self.membership[index],
                               self.parents[index], self.weight[index],
                               self.kind if isinstance(self.kind, str)
                               else [self.kind[int(i)] for i in index], pick(self.hardest),
                               pick(self.images))

    @staticmethod
    def concat(parts: list["SyntheticPoints"]) -> "SyntheticPoints":
        """One record from several (used when a strategy combines others); kinds per point."""
        parts = [p for p in parts if p is not None]
        opt = lambda name: (None if any(getattr(p, name) is None for p in parts)  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts]))
        width = max(p.membership.shape[1] for p in parts)
        pad = lambda m: torch.nn.functional.pad(m, (0, width - m.shape[1]))  # noqa: E731
        return SyntheticPoints(torch.cat([p.embeddings for p in parts]),
                               torch.cat([pad(p.membership) for p in parts]),
                               torch.cat([p.parents for p in parts]),
                               torch.cat([p.weight for p in parts]),
                               [k for p in parts for k in p.kinds()],
                               opt("hardest"), opt("images"))

    def to_numpy(self, class_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Arrays for an npz. ``class_ids`` maps membership columns to data set class ids."""
        memb = self.membership.detach().float().cpu().numpy()
        top2 = np.argsort(-memb, axis=1)[:, :2] if memb.shape[1] > 1 else \
            np.zeros((len(memb), 2), dtype=np.int64)
        out = {
            "embeddings": self.embeddings.detach().float().cpu().numpy(),
            "membership": memb.astype(np.float32),
            "parents": self.parents.detach().cpu().numpy().astype(np.int64),
            "weight": self.weight.detach().float().cpu().numpy(),
            "hardest": (self.hardest if self.hardest is not None
                        else torch.zeros(len(self), dtype=torch.bool)).detach().cpu().numpy(),
            "kind": np.array(self.kinds()),
            "top_classes": top2 if class_ids is None else class_ids[top2],
        }
        if self.images is not None:
            out["images"] = self.images.detach().cpu().numpy()
        return out


class StepResult:
    """What a strategy's step returns.

    loss: the scalar to backpropagate. values: its parts, name -> 0-d detached tensor (or a
    Python number), read to the host only when somebody asks: ``terms`` converts them to floats
    (one host sync per call), the trainer sums the tensors and reads them once per epoch.
    synthetic: the synthetic points with their provenance, only when the step was asked to
    record them (``record=True``).
    """

    def __init__(self, loss: torch.Tensor, values: dict[str, Any] | None = None,
                 synthetic: SyntheticPoints | None = None):
        self.loss = loss
        self.values = dict(values or {})
        self.synthetic = synthetic

    @property
    def terms(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}


def loss_registry_name(loss: Any) -> str:
    """The registry name of a Tango loss object (``"multi-similarity"``), else its class name."""
    from dml.losses import LOSSES

    for name, cls in LOSSES.items():
        if type(loss) is cls:
            return name
    return type(loss).__name__


def is_pml_loss(loss: Any) -> bool:
    cls = loss if isinstance(loss, type) else type(loss)
    return cls.__module__.startswith("pytorch_metric_learning.")


def loss_capabilities(loss: Any) -> set[str]:
    """What a loss object (or a Tango loss class, ``LOSSES[name]``) can do, for the mixing
    wrappers' checks and the registry's compatible pairs:

    - ``"soft"``: takes soft labels (class memberships), so mixed labels can be expressed;
    - ``"pairs"``: a Tango pair loss, scoring any (anchors x references) similarity matrix
      (``pair_loss``), so mined pairs that do not contain the anchor can be scored;
    - ``"proxies"``: a Tango proxy loss that accepts extra (synthetic) proxies;
    - ``"references"``: a pytorch-metric-learning pair or tuple loss, which takes extra
      reference embeddings with hard labels and the pairs to use (``ref_emb``, ``ref_labels``,
      ``indices_tuple``);
    - ``"mixing"``: an embedding-level mixing wrapper (its own loss is ``loss.loss``).
    """
    caps: set[str] = set()
    if isinstance(loss, MixingStrategy):
        caps.add("mixing")
    elif callable(getattr(loss, "pair_loss", None)):
        caps |= {"soft", "pairs"}
    elif getattr(loss, "uses_proxies", False) and callable(getattr(loss, "proxy_loss", None)):
        caps |= {"soft", "proxies"}
    elif is_pml_loss(loss) and not any(hasattr(loss, a) for a in ("proxies", "W")):
        caps.add("references")
    return caps


def loss_terms(loss_fn: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The loss's last component values (0-d detached tensors), keys prefixed."""
    return {prefix + k: v for k, v in getattr(loss_fn, "last_terms", {}).items()}


class MixingStrategy(nn.Module):
    """Base class of every strategy: a loss wrapper.

    A strategy wraps a loss object, ``Strategy(loss, **params)``, and checks when it is built
    that the loss can do what the strategy needs (``requires``, see ``loss_capabilities``),
    with an error naming what it lacks. Embedding-level strategies are then called like any loss, ``strategy(embeddings, labels)``; model-level ones (Metrix at
    the input or a feature map, ``needs_model = True``) need the network,
    ``strategy(model, images, labels)``. The
    trainer calls ``step(model, None, images, labels)``, which returns a :class:`StepResult`,
    with the synthetic points only when ``record=True``.

    Built from a loss *name* instead (``build_mixing(name, "triplet")``, for checking a
    configuration), a strategy is unbound: ``step`` then takes the loss object and checks its
    name. A strategy bound to a loss refuses to be stepped with another one.

    Which losses a strategy takes is decided by what the loss can do, never by its name:
    ``needs`` (capabilities, see ``loss_capabilities``) for ``accepts``, which also gives the
    registry's compatible pairs (``dml.mixing.supported_pairs``), and ``check_loss`` for a loss
    object (with the error saying what it lacks).

    Subclasses set ``name``, ``version``, ``needs_model``, ``needs``, ``requires`` (in words)
    and implement ``_step(loss_fn, ...)``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1   # raised when the strategy's results change (docs/METHODS.md §12)
    needs_model: ClassVar[bool] = False   # True: mixes inside the network (images, feature maps)
    needs: ClassVar[frozenset[str]] = frozenset()   # capabilities the loss must have
    requires: ClassVar[str] = "a loss"

    def __init__(self, loss: nn.Module | str):
        super().__init__()
        if isinstance(loss, str):
            self.loss = None
            self.loss_name = loss
        else:
            if not isinstance(loss, nn.Module) and not callable(loss):
                raise TypeError(f"{type(self).__name__} wraps a loss object (or a loss name), "
                                f"got {type(loss).__name__}")
            self.check_loss(loss)
            self.loss = loss
            self.loss_name = loss_registry_name(loss)
        self.last_terms: dict[str, torch.Tensor] = {}

    @classmethod
    def accepts(cls, loss: Any) -> bool:
        """Whether the strategy can wrap ``loss`` (an object, or a Tango loss class such as
        ``LOSSES[name]``), by its capabilities."""
        return cls.needs <= loss_capabilities(loss)

    def check_loss(self, loss: Any) -> None:
        """Raise ValueError when ``loss`` lacks a capability the strategy needs."""
        if not self.accepts(loss):
            raise ValueError(f"{self.name} needs {self.requires}; {type(loss).__name__} is not one")

    def bound(self, loss_fn: nn.Module | None = None) -> nn.Module:
        """The loss to use: the wrapped one (and ``loss_fn`` must be it or None), or, for an
        unbound strategy, ``loss_fn`` checked against the name it was built for."""
        if self.loss is not None:
            if loss_fn is not None and loss_fn is not self.loss:
                raise ValueError(
                    f"{self.name or type(self).__name__} was built for the loss object "
                    f"{type(self.loss).__name__} and cannot be stepped with another loss "
                    f"({type(loss_fn).__name__}); build it with that loss")
            return self.loss
        if loss_fn is None:
            raise ValueError(f"{self.name} was built from the loss name {self.loss_name!r} "
                             f"without a loss object: build it with the loss, e.g. "
                             f"{type(self).__name__}(loss), or pass the loss to step()")
        from dml.losses import LOSSES

        name = loss_registry_name(loss_fn)
        if name in LOSSES and name != self.loss_name:   # another registered loss than named
            raise ValueError(f"{self.name} was built for loss {self.loss_name!r} and stepped "
                             f"with {name!r}")
        self.check_loss(loss_fn)
        return loss_fn

    def step(self, model: nn.Module, loss_fn: nn.Module | None, images: torch.Tensor,
             labels: torch.Tensor, record: bool = True) -> StepResult:
        """The training loss of a batch of images; ``record``: also the synthetic points."""
        loss_fn = self.bound(loss_fn)
        if self.needs_model:
            return self._step(loss_fn, model, images, labels, record)
        return self._step(loss_fn, model(images), labels, record)

    def embedding_loss(self, loss_fn: nn.Module | None, emb: torch.Tensor,
                       labels: torch.Tensor, record: bool = True) -> StepResult:
        """The strategy's step on a batch already embedded: emb (B, D), labels (B,)."""
        if self.needs_model:
            raise TypeError(f"{self.name} mixes inside the network: it needs the network, "
                            f"strategy(model, images, labels)")
        return self._step(self.bound(loss_fn), emb, labels, record)

    def forward(self, *args) -> torch.Tensor:
        """``strategy(embeddings, labels)`` (embedding level) or ``strategy(model, images,
        labels)`` (model level): the training loss; its parts are in ``last_terms``."""
        if self.needs_model:
            if len(args) != 3:
                raise TypeError(f"{self.name} mixes inside the network: call it as "
                                f"strategy(model, images, labels)")
            result = self._step(self.bound(), *args, record=False)
        else:
            if len(args) != 2:
                raise TypeError(f"{self.name} is called like a loss: strategy(embeddings, "
                                f"labels)")
            result = self._step(self.bound(), *args, record=False)
        self.last_terms = result.values
        return result.loss

    def _step(self, loss_fn: nn.Module, x: Any, *rest) -> StepResult:
        raise NotImplementedError

    @torch.no_grad()
    def synthesize(self, model: nn.Module, loss_fn: nn.Module | None, images: torch.Tensor,
                   labels: torch.Tensor) -> SyntheticPoints | None:
        """The synthetic points this strategy would make for a batch (no gradients)."""
        return self.step(model, loss_fn, images, labels, record=True).synthetic

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}"


MIXINGS: Registry[type[MixingStrategy]] = Registry("mixing strategy")


def register_mixing(cls: type[MixingStrategy]) -> type[MixingStrategy]:
    """Class decorator: make a strategy available by its ``name`` (CLI --mixing NAME)."""
    return MIXINGS.register(cls.name, cls)


@register_mixing
class NoMixing(MixingStrategy):
    """The clean loss: ``E = l(embeddings, labels)``."""

    name = "none"

    def _step(self, loss_fn, emb, labels, record) -> StepResult:
        loss = loss_fn(emb, labels)
        return StepResult(loss, {"loss": loss.detach(), **loss_terms(loss_fn)})

    @torch.no_grad()
    def synthesize(self, model, loss_fn, images, labels):
        return None
