"""Proxy losses: one learnable proxy per class, with an optional proxy override (real +
synthetic proxies for Proxy Synthesis): proxy anchor, ProxyNCA++, Normalized-SoftMax."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _HParamsRepr, _log1p_weighted_sum_exp, _safe_div
from .labels import as_membership


class ProxyLoss(_HParamsRepr, nn.Module):
    """Base class of proxy losses: one learnable proxy per class, ``self.proxies`` (C, D).

    ``forward(embeddings, labels, proxies=None)``: embeddings (N, D) L2-normalised; labels (N,)
    hard or (N, P) soft memberships over the proxies; ``proxies`` (P, D) overrides
    ``self.proxies`` (e.g. real + synthetic proxies). Proxies are L2-normalised here. It forms
    ``S = embeddings @ normalize(proxies).T`` (N, P), ``Y = as_membership(labels, P)`` and returns
    ``proxy_loss(S, Y)``.
    """

    uses_proxies = True
    version = 1

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.reset_parameters()
        self.last_terms: dict[str, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proxies)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor | None = None
    ) -> torch.Tensor:
        prox = self.proxies if proxies is None else proxies
        prox = F.normalize(prox.to(embeddings.dtype), dim=1)  # (P, D)
        sim = embeddings @ prox.T  # (N, P)
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
        y = as_membership(labels.to(sim.device), prox.shape[0], sim.dtype)  # (N, P)
        return self.proxy_loss(sim, y)

    def proxy_loss(self, sim: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss from similarities ``sim`` (N, P) to normalised proxies and memberships ``y`` (N, P)."""
        raise NotImplementedError


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor loss (Kim et al., CVPR 2020, eq. 4; pml ``ProxyAnchorLoss``), anchor = proxy.

    For proxy p over the batch embeddings x with membership y_xp (docs/METHODS.md §1, proxy anchor row):
    ``pos(p) = log(1 + sum_x y e^{-alpha (s - delta)})``,
    ``neg(p) = log(1 + sum_x (1-y) e^{alpha (s + delta)})``;
    loss = sum_p pos(p) / #{p: sum_x y_xp > 0}  +  sum_p neg(p) / P.
    Proxies are initialised with kaiming-normal (fan_out) as in pml and the official code.

    last_terms: ``pos``, ``neg``.
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, alpha: float = 32.0, margin: float = 0.1
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        self.alpha = alpha
        self.margin = margin

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def proxy_loss(self, sim, y):
        pos = _log1p_weighted_sum_exp(-self.alpha * (sim - self.margin), y, dim=0)  # (P,)
        neg = _log1p_weighted_sum_exp(self.alpha * (sim + self.margin), 1.0 - y, dim=0)
        with_pos = (y.sum(0) > 0).to(sim.dtype).sum().clamp_min(1.0)
        pos_m = pos.sum() / with_pos
        neg_m = neg.sum() / sim.shape[1]
        self.last_terms = {"pos": pos_m.detach(), "neg": neg_m.detach()}
        return pos_m + neg_m


class _SoftmaxProxyLoss(ProxyLoss):
    """Cross-entropy over proxies with soft targets: ``mean_x  -sum_p y_xp log softmax_p(logits_x)``."""

    def logits(self, sim: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def proxy_loss(self, sim, y):
        per_sample = -(y * F.log_softmax(self.logits(sim), dim=1)).sum(1)  # (N,)
        loss = per_sample.mean() if per_sample.numel() else sim.sum() * 0.0
        self.last_terms = {
            "ce": loss.detach(),
            "pos_sim": _safe_div((y * sim).sum(), y.sum()).detach(),
        }
        return loss


class ProxyNCAPlusPlusLoss(_SoftmaxProxyLoss):
    """ProxyNCA++ (Teh et al., ECCV 2020, eq. 5 with temperature): softmax over all proxies of
    ``-||x - p||^2 / T`` on unit vectors, i.e. of ``2 s / T`` up to a constant (docs/METHODS.md §1,
    ProxyNCA++ row, with its T equal to T/2 here), T = 1/9 as in the paper (official code: x and
    p scaled by 3 = sqrt(1/T)). Soft targets: cross-entropy ``-sum_p y_p log softmax_p``. The
    positive proxy is in the denominator (the "++" change), so this equals pml ``ProxyNCALoss``
    with ``softmax_scale = 1/T`` on hard labels. Only the loss; fast proxy learning rates, global
    max pooling etc. belong to the trainer.

    last_terms: ``ce``, ``pos_sim`` (mean similarity to the target proxies).
    """

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 1.0 / 9.0) -> None:
        super().__init__(num_classes, embedding_dim)
        self.temperature = temperature

    def logits(self, sim):
        return (2.0 * sim - 2.0) / self.temperature  # -||x - p||^2 / T for unit x, p


class NormalizedSoftmaxLoss(_SoftmaxProxyLoss):
    """Normalized softmax (Zhai & Wu, BMVC 2019, eq. 2; pml ``NormalizedSoftmaxLoss``): softmax
    cross-entropy over ``s / T`` with unit-norm class weights (= proxies), T = 0.05. Soft targets:
    ``-sum_p y_p log softmax_p``.

    last_terms: ``ce``, ``pos_sim``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__(num_classes, embedding_dim)
        self.temperature = temperature

    def logits(self, sim):
        return sim / self.temperature
