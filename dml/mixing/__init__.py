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

from dml.mixing.base import (MIXINGS, MixingStrategy, NoMixing, StepResult, SyntheticPoints,
                             loss_capabilities, register_mixing)

# Each module registers its strategies with @register_mixing when imported.
from dml.mixing import expansion, metrix, synthesis  # noqa: E402,F401
from dml.mixing.expansion import EmbeddingExpansion  # noqa: E402
from dml.mixing.metrix import MetrixEmbedding, MetrixFeature, MetrixInput  # noqa: E402
from dml.mixing.synthesis import ProxySynthesis, SymmetricalSynthesis  # noqa: E402



def mixing_names() -> list[str]:
    return list(MIXINGS)


def mixing_params(name: str) -> dict[str, Any]:
    """Constructor parameters of a strategy with their defaults (for config UIs)."""
    sig = inspect.signature(MIXINGS[name].__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "loss", "loss_name") and p.default is not inspect.Parameter.empty}


def supported_pairs() -> list[tuple[str, str]]:
    from dml.losses import loss_names

    return [(m, l) for m, cls in MIXINGS.items() for l in loss_names()
            if cls.supported_losses is None or l in cls.supported_losses]


def mixing_version(name: str) -> int:
    """The version of strategy ``name``'s computation (raised whenever its results change)."""
    if name not in MIXINGS:
        raise ValueError(f"unknown mixing strategy {name!r}; valid: {', '.join(MIXINGS)}")
    return int(MIXINGS[name].version)


def build_mixing(name: str, loss, **params) -> MixingStrategy:
    """Strategy ``name`` wrapping ``loss`` (a loss object, or a registry name to check a
    configuration without building the loss). An unknown name or parameter, or a pair the
    registry does not support, fails here, at start-up, with the valid choices."""
    from dml.mixing.base import loss_registry_name

    if name not in MIXINGS:
        raise ValueError(f"unknown mixing strategy {name!r}; valid: {', '.join(MIXINGS)}")
    loss_name = loss if isinstance(loss, str) else loss_registry_name(loss)
    cls = MIXINGS[name]
    if cls.supported_losses is not None and loss_name not in cls.supported_losses:
        pairs = "; ".join(f"{m}: {', '.join(c.supported_losses) if c.supported_losses else 'any loss'}"
                          for m, c in MIXINGS.items())
        raise ValueError(f"mixing {name!r} does not support loss {loss_name!r}. "
                         f"Supported losses per strategy: {pairs}")
    valid = mixing_params(name)
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for mixing {name!r}; valid: {sorted(valid)}")
    return cls(loss, **params)


__all__ = ["register_mixing", "MixingStrategy", "StepResult", "SyntheticPoints", "MIXINGS",
           "build_mixing", "mixing_names", "mixing_params", "mixing_version", "supported_pairs",
           "loss_capabilities", "NoMixing", "MetrixInput", "MetrixFeature", "MetrixEmbedding",
           "EmbeddingExpansion", "SymmetricalSynthesis", "ProxySynthesis"]
