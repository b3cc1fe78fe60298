"""Metric-learning losses on hard or soft labels.

Every loss has one call, ``loss(embeddings, labels)``. Labels are either hard, a LongTensor
``(N,)``, or soft, a FloatTensor ``(N, C)`` of class memberships whose rows sum to 1 (a mix of
classes c and c' with weights lambda, 1 - lambda). Embeddings are expected L2-normalised; similarities
are plain dot products (= cosine similarities on unit vectors).

Pair losses (:class:`PairLoss`) are written once on a similarity matrix ``S`` (A, R) between
anchors and references, with soft pair targets ``Y`` (A, R) in [0, 1] (``pair_targets``) and a
validity mask. They follow the generic form of docs/METHODS.md section 1 (Metrix, Venkataramanan et al.,
ICLR 2022, eq. 6):

    l(a) = tau( sigma_plus ( sum_x  y      * rho_plus (s(a, x)) )
              + sigma_minus( sum_x (1 - y) * rho_minus(s(a, x)) ) )

so a reference with target ``y`` contributes ``y`` times its positive term and ``1 - y`` times its
negative term. With hard labels every loss reduces exactly to its standard definition (tests check
this against pytorch-metric-learning). Mixing strategies call ``forward`` with extra references
(mixed embeddings with soft labels) and masks, or ``pair_loss`` directly.

Proxy losses (:class:`ProxyLoss`) own learnable proxies ``(C, D)``; ``forward`` accepts a proxy
override ``(P, D)`` (real + synthetic proxies for Proxy Synthesis) with soft labels of width P.

Every loss fills ``last_terms`` (name -> detached 0-d tensor) with its components on each call,
for plotting; call ``float()`` on a value to read it (that is the only host sync).

Layout: ``labels.py`` (memberships, pair targets), ``pairs.py`` (pair losses), ``proxies.py``
(proxy losses), ``common.py`` (shared numerics); the registry is here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from dml.config import check_params
from dml.registry import Registry

from .labels import as_membership, mixed_membership, pair_targets
from .pairs import (ContrastiveLoss, LiftedStructureLoss, MultiSimilarityLoss, NPairLoss, PairLoss,
                    TripletLoss)
from .proxies import NormalizedSoftmaxLoss, ProxyAnchorLoss, ProxyLoss, ProxyNCAPlusPlusLoss

__all__ = [
    "as_membership",
    "mixed_membership",
    "pair_targets",
    "PairLoss",
    "ProxyLoss",
    "ContrastiveLoss",
    "MultiSimilarityLoss",
    "TripletLoss",
    "LiftedStructureLoss",
    "NPairLoss",
    "ProxyAnchorLoss",
    "ProxyNCAPlusPlusLoss",
    "NormalizedSoftmaxLoss",
    "LOSSES",
    "build_loss",
    "list_losses",
    "loss_defaults",
    "loss_version",
]


LOSSES: Registry[type[nn.Module]] = Registry("loss")
for _name, _cls in (("contrastive", ContrastiveLoss), ("multi-similarity", MultiSimilarityLoss),
                    ("proxy-anchor", ProxyAnchorLoss), ("proxy-nca++", ProxyNCAPlusPlusLoss),
                    ("triplet", TripletLoss), ("lifted-structure", LiftedStructureLoss),
                    ("n-pair", NPairLoss), ("normalized-softmax", NormalizedSoftmaxLoss)):
    LOSSES.register(_name, _cls)

_STRUCTURAL = ("self", "num_classes", "embedding_dim")


def list_losses() -> list[str]:
    """The CLI names of the losses, in registry order."""
    return LOSSES.names()


def _loss_class(name: str) -> type[nn.Module]:
    return LOSSES[name]      # an unknown name raises ValueError listing the valid ones


def _hyperparameters(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in _STRUCTURAL}


def loss_version(name: str) -> int:
    """The version of loss ``name``'s computation (raised whenever its results change)."""
    return int(_loss_class(name).version)


def loss_defaults(name: str) -> dict[str, Any]:
    """Constructor defaults of loss ``name`` (without num_classes / embedding_dim)."""
    return {n: p.default for n, p in _hyperparameters(_loss_class(name)).items()}


def build_loss(
    name: str, num_classes: int | None = None, embedding_dim: int | None = None, **params: Any
) -> nn.Module:
    """Loss ``name`` with hyperparameters ``params``; proxy losses also need num_classes and
    embedding_dim (ignored by pair losses). Unknown names or parameters raise ValueError listing
    the valid ones."""
    cls = _loss_class(name)
    valid = _hyperparameters(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for loss {name!r}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )
    check_params(f"loss {name!r}", params, loss_defaults(name))
    if getattr(cls, "uses_proxies", False):
        if num_classes is None or embedding_dim is None:
            raise ValueError(f"loss {name!r} needs num_classes and embedding_dim")
        return cls(num_classes=int(num_classes), embedding_dim=int(embedding_dim), **params)
    return cls(**params)
