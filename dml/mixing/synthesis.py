"""Symmetrical Synthesis (Gu & Ko, AAAI 2020) and Proxy Synthesis (Gu, Ko & Kim, AAAI 2021),
METHODS.md section 5.

Symmetrical Synthesis, for a same-class pair (x_k, x_l)::

    x'_k = 2 r - x_k,   r = (x_k . x_l / |x_l|^2) x_l        (reflection of x_k about the axis of x_l)

and symmetrically x'_l. The reflection keeps the norm (|x'_k| = |x_k|) and the similarity to the
partner (x'_k . x_l = x_k . x_l), so the positive side of the loss is unchanged; the synthetic
points are hard negatives for the other classes. Then hard negative pair mining over the original
and synthetic points of each pair of classes, and the pair loss, exactly as for Embedding Expansion
(``dml.mixing.expansion.synthetic_pair_loss``). Official code (clovaai/symmetrical-synthesis,
TensorFlow): N-pair batches of one (anchor, positive) pair per class, ``sym1`` = reflection of the
positive about the anchor, ``sym2`` = of the anchor about the positive; the N-pair logits are the
max similarity over combinations of the 4 point sets of two classes (a class-pair hardest negative
pair; its positive logit is the anchor-positive similarity). Paper defaults alpha = 2, beta = 1
(``x' = alpha r - beta x``), i.e. the plain reflection; the points are not re-normalised (not
needed: the norm is kept). The paper evaluates triplet, N-pair, lifted structure and angular
losses; multi-similarity is supported here through the same mined similarity matrix (not in the
paper). ``pairing="consecutive"`` reproduces the official one-pair-per-class layout on P x 2
batches; ``"all"`` (default) uses every same-class pair of a P x K batch.

Proxy Synthesis, per batch (official code navervision/proxy-synthesis, ``proxy_synthesis``)::

    lambda ~ Beta(alpha, alpha)                                              (alpha = 0.4)
    e~_i = normalize(lambda e_i + (1 - lambda) e_j(i)),   p~_i = lambda p^_{y_i} + (1 - lambda) p^_{y_j(i)}

with e normalised embeddings, p^ normalised proxies and j(i) a batch neighbour of another class.
Each mixture is a new class whose proxy is p~_i; the proxy loss runs over the real and synthetic
embeddings against the real and synthetic proxies (C + S of them). The official code mixes each
sample with the previous one in the batch (``torch.roll(x, 1)``) on batches of distinct classes;
on class-sorted P x K batches that would pair mostly same-class samples, so here the neighbour is
the sample ``m`` places earlier in class-sorted order (m = largest class count), which always has
another class when no class fills more than half the batch (pairs that would mix one class with
itself are dropped). ``mu`` (official ``ps_mu``, default 1.0) is the number of synthetic classes
as a fraction of the batch: the official code keeps the first ``int(B mu)`` mixtures, here a random
subset of that size (class-sorted batches would otherwise favour the first classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.mixing.base import (
    MixingStrategy,
    StepResult,
    SyntheticPoints,
    loss_terms,
    register_mixing,
)
from dml.mixing.expansion import PairSynthesisStrategy, same_class_pairs

__all__ = ["symmetric_points", "reflect", "SymmetricalSynthesis", "proxy_partners",
           "mix_with_proxies", "ProxySynthesis", "PROXY_SYNTHESIS_LOSSES"]

PROXY_SYNTHESIS_LOSSES = ("normalized-softmax", "proxy-nca++", "proxy-anchor")


# --------------------------------------------------------------------------- symmetrical synthesis


def reflect(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Reflection of each row of ``x`` (N, D) about the line spanned by the row of ``axis`` (N, D):
    ``2 r - x`` with ``r = (x . axis / |axis|^2) axis`` (Symm, eq. 1 with alpha = 2, beta = 1)."""
    coef = (x * axis).sum(1, keepdim=True) / (axis * axis).sum(1, keepdim=True).clamp_min(1e-12)
    return 2.0 * coef * axis - x


def symmetric_points(emb: torch.Tensor, labels: torch.Tensor, pairing: str = "all"):
    """Symmetrical Synthesis points of every same-class pair (i, j) (``same_class_pairs``).

    Returns ``points`` (2 Q, D): for pair q, row 2q = x'_i (x_i reflected about x_j's axis), row
    2q + 1 = x'_j (x_j reflected about x_i's axis); ``labels`` (2 Q,); ``parents`` (2 Q, 2) = (i, j)
    for both; ``ratio`` (2 Q,) = 1 for x'_i (the reflection of parent 0), 0 for x'_j (of parent 1).
    """
    i, j = same_class_pairs(labels, pairing)
    xi, xj = emb[i], emb[j]
    pts = torch.stack([reflect(xi, xj), reflect(xj, xi)], 1).reshape(-1, emb.shape[1])
    parents = torch.stack([i, j], 1).repeat_interleave(2, 0)
    ratio = torch.tensor([1.0, 0.0], dtype=emb.dtype, device=emb.device).repeat(i.numel())
    return pts, labels[i].repeat_interleave(2), parents, ratio


@register_mixing
class SymmetricalSynthesis(PairSynthesisStrategy):
    """Symmetrical Synthesis (Gu & Ko, AAAI 2020): each point of a same-class pair reflected about
    the other's axis, hard negative pair mining over original + synthetic points, for triplet,
    lifted structure, N-pair and multi-similarity losses. Hyperparameter free.

    Args:
        pairing: ``"all"`` same-class pairs (default) or ``"consecutive"`` (the official code's
            one pair per class of N-pair batches, 1st-2nd, 3rd-4th, ... of a class).
        negatives: ``"pair"`` (hardest negative pair per class pair, paper and official code) or
            ``"point"`` (synthetic points as extra negative references of each anchor).

    Synthetic record: kind "symmetrical", membership one-hot of the pair's class, parents (i, j),
    ratio 1 for the reflection of parent 0 (x_i about x_j), 0 for the reflection of parent 1,
    hardest = end of a mined hardest negative pair.
    """

    name = "symmetrical-synthesis"
    kind = "symmetrical"

    def __init__(self, loss_name: str, pairing: str = "all", negatives: str = "pair"):
        super().__init__(loss_name, pairing, negatives)

    def make_points(self, emb, labels):
        return symmetric_points(emb, labels, self.pairing)


# --------------------------------------------------------------------------- proxy synthesis


def proxy_partners(labels: torch.Tensor) -> torch.Tensor:
    """For each batch example, a batch neighbour of (as far as possible) another class: the
    example ``m`` places earlier in class-sorted order, m = largest class count. (B,) indices.
    It differs in class from the example whenever no class has more than half the batch."""
    b = labels.numel()
    if b == 0:
        return labels.new_zeros(0, dtype=torch.long)
    m = int(torch.bincount(labels.long()).max())
    order = torch.sort(labels, stable=True).indices
    partner = torch.empty_like(order)
    partner[order] = torch.roll(order, m % b)
    return partner


def mix_with_proxies(emb_i: torch.Tensor, labels_i: torch.Tensor, emb_j: torch.Tensor,
                     labels_j: torch.Tensor, proxies: torch.Tensor, lam: float):
    """Proxy Synthesis mixtures (PS eq. 3-4) of examples i with partners j (S rows each):
    embeddings ``normalize(lam e_i + (1 - lam) e_j)`` (S, D) and proxies
    ``lam p^_{y_i} + (1 - lam) p^_{y_j}`` (S, D), p^ = the L2-normalised ``proxies`` (C, D). The
    mixed proxy is not re-normalised here (the proxy losses normalise the proxies they get)."""
    p_hat = F.normalize(proxies, dim=1)
    mixed = F.normalize(lam * emb_i + (1.0 - lam) * emb_j, dim=1)
    mixed_proxies = lam * p_hat[labels_i] + (1.0 - lam) * p_hat[labels_j]
    return mixed, mixed_proxies


@register_mixing
class ProxySynthesis(MixingStrategy):
    """Proxy Synthesis (Gu, Ko & Kim, AAAI 2021): synthetic classes from mixed embeddings and
    mixed proxies, for Normalized-SoftMax, ProxyNCA++ and Proxy-Anchor.

    Args:
        alpha: lambda ~ Beta(alpha, alpha), one draw per batch (paper and official default 0.4).
        mu: number of synthetic classes / batch size (official ``ps_mu``, default 1.0), in [0, 1].

    The loss is ``loss_fn(cat(emb, mixed), labels of width C + S, proxies=cat(normalize(P),
    mixed_proxies))``: every mixture is its own class S_i, with one positive (itself) and its mixed
    proxy. Synthetic record: kind "proxy-synthesis", membership over the C real classes
    ``lam [y_i] + (1 - lam) [y_j]`` (for display between its parents; the loss uses the new class),
    parents (i, j), ratio lam, hardest None.
    """

    name = "proxy-synthesis"
    kind = "proxy-synthesis"
    supported_losses = PROXY_SYNTHESIS_LOSSES

    def __init__(self, loss_name: str, alpha: float = 0.4, mu: float = 1.0):
        super().__init__(loss_name)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu (synthetic classes per batch example) must be in [0, 1], got {mu}")
        self.alpha = float(alpha)
        self.mu = float(mu)

    def draw_lambda(self) -> float:
        """The batch's mixing factor, lambda ~ Beta(alpha, alpha) (torch's global RNG)."""
        a = torch.tensor(self.alpha)
        return float(torch.distributions.Beta(a, a).sample())

    def step(self, model, loss_fn, images, labels) -> StepResult:
        if labels.dim() != 1:
            raise ValueError(f"{self.name} needs hard labels (B,), got shape {tuple(labels.shape)}")
        if not hasattr(loss_fn, "proxies"):
            raise ValueError(f"{self.name} needs a proxy loss ({', '.join(self.supported_losses)})")
        emb = model(images)                                                 # (B, D)
        b, c = emb.shape[0], loss_fn.proxies.shape[0]
        lam = self.draw_lambda()
        partner = proxy_partners(labels)
        keep = torch.nonzero(labels[partner] != labels).flatten()
        n_syn = min(int(b * self.mu), keep.numel())
        if n_syn < keep.numel():
            keep = keep[torch.randperm(keep.numel(), device=keep.device)[:n_syn]].sort().values
        i, j = keep, partner[keep]
        mixed, mixed_proxies = mix_with_proxies(emb[i], labels[i], emb[j], labels[j],
                                                loss_fn.proxies, lam)
        all_labels = torch.cat([labels, c + torch.arange(n_syn, device=labels.device)])
        proxies = torch.cat([F.normalize(loss_fn.proxies, dim=1), mixed_proxies.to(loss_fn.proxies.dtype)])
        loss = loss_fn(torch.cat([emb, mixed]), all_labels, proxies=proxies)
        memb = (lam * F.one_hot(labels[i], c) + (1.0 - lam) * F.one_hot(labels[j], c)).to(emb.dtype)
        synthetic = SyntheticPoints(mixed.detach(), memb, torch.stack([i, j], 1),
                                    torch.full((n_syn,), lam, dtype=emb.dtype, device=emb.device),
                                    self.kind)
        terms = {"loss": float(loss.detach()), **loss_terms(loss_fn), "lambda": lam}
        return StepResult(loss, terms, synthetic)

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}, alpha={self.alpha}, mu={self.mu}"
