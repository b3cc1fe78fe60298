"""Mixing strategies as loss wrappers, also created by name from a registry.

Use them in any training loop, like a loss::

    from dml.losses import MultiSimilarityLoss, TripletLoss
    from dml.mixing import EmbeddingExpansion, MetrixEmbedding

    criterion = MetrixEmbedding(MultiSimilarityLoss(), alpha=2.0, w=0.4)
    loss = criterion(embeddings, labels)          # l_clean + w * l_mixed
    criterion = EmbeddingExpansion(TripletLoss(), n=2)

A pytorch-metric-learning pair or tuple loss works inside Embedding Expansion and Symmetrical
Synthesis with ``negatives="point"``; Metrix needs a loss on soft labels (a Tango loss). Metrix
at the input or a feature map needs the network: ``MetrixInput(loss)(model, images, labels)``.
"""

from __future__ import annotations

import inspect
from typing import Any

from dml.config import check_params
from dml.mixing.base import (MIXINGS, MixingStrategy, NoMixing, StepResult, SyntheticPoints,
                             loss_capabilities, register_mixing)

# Each module registers its strategies with @register_mixing when imported.
from dml.mixing import expansion, metrix, combination, synthesis  # noqa: E402,F401
from dml.mixing.expansion import EmbeddingExpansion  # noqa: E402
from dml.mixing.metrix import MetrixEmbedding, MetrixFeature, MetrixInput  # noqa: E402
from dml.mixing.synthesis import ProxySynthesis, SymmetricalSynthesis  # noqa: E402



def list_mixings() -> list[str]:
    """The registered strategy names, in registration order."""
    return MIXINGS.names()


def mixing_params(name: str) -> dict[str, Any]:
    """Constructor parameters of a strategy with their defaults (for config UIs)."""
    sig = inspect.signature(MIXINGS[name].__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "loss", "loss_name") and p.default is not inspect.Parameter.empty}


def compatible_losses(name: str) -> list[str]:
    """The registered losses strategy ``name`` can wrap, by what they can do (``accepts``)."""
    from dml.losses import LOSSES

    cls = MIXINGS[name]
    return [l for l, loss_cls in LOSSES.items() if cls.accepts(loss_cls)]


def supported_pairs() -> list[tuple[str, str]]:
    """Every (strategy, loss) pair of the registries that can be trained."""
    return [(m, l) for m in MIXINGS for l in compatible_losses(m)]


def mixing_version(name: str) -> int:
    """The version of strategy ``name``'s computation (raised whenever its results change)."""
    return int(MIXINGS[name].version)


def build_mixing(name: str, loss, **params) -> MixingStrategy:
    """Strategy ``name`` wrapping ``loss`` (a loss object, or a registry name to check a
    configuration without building the loss). An unknown name or parameter, or a loss the
    strategy cannot wrap, fails here, at start-up, with the valid choices."""
    from dml.losses import LOSSES

    from dml.mixing.base import loss_registry_name

    cls = MIXINGS[name]        # an unknown name raises ValueError listing the valid ones
    loss_name = loss if isinstance(loss, str) else loss_registry_name(loss)
    if (isinstance(loss, str) or loss_name in LOSSES) and not cls.accepts(LOSSES[loss_name]):
        pairs = "; ".join(f"{m}: {', '.join(compatible_losses(m))}" for m in MIXINGS)
        raise ValueError(f"mixing {name!r} does not support loss {loss_name!r}: it needs "
                         f"{cls.requires}. Supported losses per strategy: {pairs}")
    valid = mixing_params(name)
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for mixing {name!r}; valid: {sorted(valid)}")
    check_params(f"mixing {name!r}", params, valid)
    return cls(loss, **params)


__all__ = ["register_mixing", "MixingStrategy", "StepResult", "SyntheticPoints", "MIXINGS",
           "build_mixing", "list_mixings", "compatible_losses", "mixing_params", "mixing_version", "supported_pairs",
           "loss_capabilities", "NoMixing", "MetrixInput", "MetrixFeature", "MetrixEmbedding",
           "EmbeddingExpansion", "SymmetricalSynthesis", "ProxySynthesis"]
