"""Symmetrical Synthesis (Gu & Ko, AAAI 2020) and Proxy Synthesis (Gu, Ko & Kim, AAAI 2021),
docs/METHODS.md section 5.

Symmetrical Synthesis, for a same-class pair (x_k, x_l)::

    x'_k = 2 r - x_k,   r = (x_k . x_l / |x_l|^2) x_l        (reflection of x_k about the axis of x_l)

and symmetrically x'_l. The reflection keeps the norm (|x'_k| = |x_k|) and the similarity to the
partner (x'_k . x_l = x_k . x_l), so the positive side of the loss is unchanged; the synthetic
points are hard negatives for the other classes. Then hard negative mining over the original
and synthetic points, per anchor by default (the anchor with the reflections made from its
pairs against every point of another class), and the pair loss, exactly as for Embedding
Expansion (``dml.mixing.expansion.synthetic_pair_loss``). Official code
(clovaai/symmetrical-synthesis, TensorFlow): N-pair batches of one (anchor, positive) pair per
class, ``sym1`` = reflection of the positive about the anchor, ``sym2`` = of the anchor about the
positive; the N-pair logit of (i, j) is the maximum similarity over six fixed combinations of
the point sets (A_i P_j, A_i sym1_j, A_i sym2_j, P_i sym1_j, P_i sym2_j, sym1_i sym2_j); its
positive logit is max(A.P, cos 2t, cos 3t), the anchor-positive similarity for unit vectors
less than 90 degrees apart. Tango's per-anchor mining takes the maximum over
{A_i, sym1_i, sym2_i} x {every point of class j} instead (docs/METHODS.md section 5 states the
difference). Paper defaults alpha = 2, beta = 1
(``x' = alpha r - beta x``), i.e. the plain reflection; the points are not re-normalised (not
needed: the norm is kept). The paper evaluates triplet, N-pair, lifted structure and angular
losses; multi-similarity is supported here through the same mined similarity matrix (not in the
paper). ``pairing="consecutive"`` reproduces the official one-pair-per-class layout on P x 2
batches; ``"all"`` (default) uses every same-class pair of a P x K batch.

Proxy Synthesis, per batch (official code navervision/proxy-synthesis, ``proxy_synthesis``)::

    lambda ~ Beta(alpha, alpha)                                              (alpha = 0.4)
    e~_i = normalize(lambda e_i + (1 - lambda) e_j(i)),   p~ = lambda p^_{y_i} + (1 - lambda) p^_{y_j(i)}

with e normalised embeddings, p^ normalised proxies and j(i) a batch example of another class.
Each mixed class pair is a new synthetic class whose proxy is p~; the proxy loss runs over the
real and synthetic embeddings against the real and synthetic proxies. The official code samples
one image per class and mixes each sample with the previous one in the batch
(``torch.roll(x, 1)``), so every class pair is mixed once. Tango does the same on the batch's
classes (``proxy_mixtures``): in order of first appearance (the balanced sampler draws classes
in random order), class c_k is mixed with c_{k-1}, cyclically. With P x K batches member r of c_k
is mixed with member r of c_{k-1}, and all K mixtures of that class pair belong to *one*
synthetic class with one proxy. (Mixing each sample with a different partner into its own
synthetic class, as Tango first did, made K synthetic classes with identical proxies, each a
negative of the others: an irreducible loss floor of log K for normalised softmax.) With
``data.samples_per_class=1`` this is exactly the official computation (tests/test_official.py).
``mu`` (official ``ps_mu``, default 1.0) is the number of synthetic classes as a fraction of the
classes in the batch: the first ``int(P mu)`` class pairs are kept (official: the first
``int(B mu)`` mixtures of a one-image-per-class batch of B).
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
from dml.losses import mixed_membership
from dml.mixing.expansion import PairSynthesisStrategy, same_class_pairs

__all__ = ["symmetric_points", "reflect", "SymmetricalSynthesis", "proxy_mixtures",
           "mix_with_proxies", "ProxySynthesis"]



# --------------------------------------------------------------------------- symmetrical synthesis


def reflect(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Reflection of each row of ``x`` (N, D) about the line spanned by the row of ``axis`` (N, D):
    ``2 r - x`` with ``r = (x . axis / |axis|^2) axis`` (Symm, eq. 1 with alpha = 2, beta = 1)."""
    coef = (x * axis).sum(1, keepdim=True) / (axis * axis).sum(1, keepdim=True).clamp_min(1e-12)
    return 2.0 * coef * axis - x


def symmetric_points(emb: torch.Tensor, labels: torch.Tensor, pairing: str = "all"):
    """Symmetrical Synthesis points of every same-class pair (i, j) (``same_class_pairs``).

    Returns ``points`` (2 Q, D): for pair q, row 2q = x'_i (x_i reflected about x_j's axis), row
    2q + 1 = x'_j (x_j reflected about x_i's axis); ``labels`` (2 Q,); ``parents`` (2 Q, 2):
    (the reflected point, the axis), (i, j) for x'_i and (j, i) for x'_j; ``weight`` (2 Q,) NaN (a
    reflection is not an interpolation of its parents).
    """
    i, j = same_class_pairs(labels, pairing)
    xi, xj = emb[i], emb[j]
    pts = torch.stack([reflect(xi, xj), reflect(xj, xi)], 1).reshape(-1, emb.shape[1])
    parents = torch.stack([torch.stack([i, j], 1), torch.stack([j, i], 1)], 1).reshape(-1, 2)
    weight = torch.full((pts.shape[0],), float("nan"), dtype=emb.dtype, device=emb.device)
    return pts, labels[i].repeat_interleave(2), parents, weight


@register_mixing
class SymmetricalSynthesis(PairSynthesisStrategy):
    """Symmetrical Synthesis (Gu & Ko, AAAI 2020): each point of a same-class pair reflected about
    the other's axis, hard negative pair mining over original + synthetic points, for triplet,
    lifted structure, N-pair and multi-similarity losses. Hyperparameter free.

    Args:
        pairing: ``"all"`` same-class pairs (default) or ``"consecutive"`` (the official code's
            one pair per class of N-pair batches, 1st-2nd, 3rd-4th, ... of a class).
        negatives: ``"anchor"`` (default: per anchor and class, the hardest pair between the
            anchor with the reflections made from its pairs and the points of the other class),
            ``"class-pair"`` (one hardest pair per pair of classes, shared by the class's
            anchors) or ``"point"`` (synthetic points as extra negative references of each
            anchor); see ``dml.mixing.expansion``.

    Synthetic record: kind "symmetrical", membership one-hot of the pair's class, parents (the
    reflected point, the axis), weight NaN (not an interpolation), hardest = end of a mined
    hardest negative pair.
    """

    name = "symmetrical-synthesis"
    kind = "symmetrical"
    version = 2   # 2: per-anchor negatives by default (docs/METHODS.md §11, defect 2)

    def __init__(self, loss, pairing: str = "all", negatives: str = "anchor"):
        super().__init__(loss, pairing, negatives)

    def make_points(self, emb, labels):
        return symmetric_points(emb, labels, self.pairing)


# --------------------------------------------------------------------------- proxy synthesis


def proxy_mixtures(labels: torch.Tensor, mu: float = 1.0):
    """Which batch examples Proxy Synthesis mixes: one synthetic class per mixed class pair.

    The P classes of the batch in order of first appearance, c_0 .. c_{P-1}; class c_k is
    mixed with c_{k-1} (cyclically, the official ``torch.roll(x, 1)`` on a one-image-per-class
    batch), member r of c_k (batch order) with member ``r mod K'`` of c_{k-1}. The mixtures of
    (c_k, c_{k-1}) form synthetic class k. The first ``int(P mu)`` class pairs are kept; with
    P = 2 only one (the other would be the same pair of classes), with P = 1 none.

    Returns ``i`` (M,), ``j`` (M,) batch indices of the two parents (i weighted by lambda),
    ``group`` (M,) the synthetic class of each mixture in 0..G-1, and G.
    """
    labels = labels.reshape(-1)
    b, dev = labels.numel(), labels.device
    classes, inv = torch.unique(labels, return_inverse=True)
    p = classes.numel()
    groups = min(int(p * mu), 1 if p == 2 else p) if p >= 2 else 0
    arange = torch.arange(b, device=dev)
    first = torch.full((p,), b, device=dev).scatter_reduce(0, inv, arange, "amin")
    appearance = torch.argsort(first)                     # k -> class index c_k
    position = torch.empty_like(appearance)
    position[appearance] = torch.arange(p, device=dev)    # class index -> k
    order = torch.sort(inv, stable=True).indices          # members of each class, batch order
    counts = torch.bincount(inv, minlength=p)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = arange - starts[inv[order]]             # member r of its class
    k = position[inv]                                     # (B,) synthetic class of each example
    prev = appearance[(k - 1) % p]                        # class index of c_{k-1}
    j = order[starts[prev] + rank % counts[prev]]
    keep = k < groups
    return arange[keep], j[keep], k[keep], groups


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
        mu: number of synthetic classes / number of classes in the batch (official ``ps_mu``,
            default 1.0; the official batches hold one image per class), in [0, 1].
        fixed_lambda: use this lambda instead of drawing one (for analysis and tests).

    The loss is ``loss_fn(cat(emb, mixed), labels of width C + G, proxies=cat(normalize(P),
    mixed_proxies))``: each mixed class pair (``proxy_mixtures``) is one synthetic class with
    its mixed proxy, and its K mixtures are that class's members. Synthetic record: kind
    "proxy-synthesis", membership over the C real classes ``lam [y_i] + (1 - lam) [y_j]`` (for
    display between its parents; the loss uses the new class), parents (i, j), weight lam,
    hardest None.
    """

    name = "proxy-synthesis"
    kind = "proxy-synthesis"
    version = 2   # 2: one synthetic class per mixed class pair (docs/METHODS.md §11, defect 3)
    needs = frozenset({"proxies"})

    requires = "a proxy loss"

    def __init__(self, loss, alpha: float = 0.4, mu: float = 1.0,
                 fixed_lambda: float | None = None):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu (synthetic classes per batch class) must be in [0, 1], got {mu}")
        if fixed_lambda is not None and not 0.0 < fixed_lambda < 1.0:
            raise ValueError(f"fixed_lambda must be in (0, 1) or None (at 0 or 1 a synthetic "
                             f"proxy would equal a real one), got {fixed_lambda}")
        self.alpha = float(alpha)
        self.mu = float(mu)
        self.fixed_lambda = fixed_lambda
        super().__init__(loss)

    def check_loss(self, loss) -> None:
        if not self.accepts(loss):
            raise ValueError(f"{self.name} mixes proxies into synthetic classes: it needs a Tango "
                             f"proxy loss that takes extra proxies; {type(loss).__name__} "
                             f"does not")

    def draw_lambda(self) -> float:
        """The batch's mixing factor, lambda ~ Beta(alpha, alpha) (torch's global RNG)."""
        if self.fixed_lambda is not None:
            return float(self.fixed_lambda)
        a = torch.tensor(self.alpha)
        return float(torch.distributions.Beta(a, a).sample())

    def _step(self, loss_fn, emb: torch.Tensor, labels: torch.Tensor,
              record: bool = True) -> StepResult:
        if labels.dim() != 1:
            raise ValueError(f"{self.name} needs hard labels (B,), got shape {tuple(labels.shape)}")
        c = loss_fn.proxies.shape[0]
        lam = self.draw_lambda()
        i, j, group, groups = proxy_mixtures(labels, self.mu)
        mixed, mixed_proxies = mix_with_proxies(emb[i], labels[i], emb[j], labels[j],
                                                loss_fn.proxies, lam)
        # one proxy per synthetic class: the mixtures of a class pair share it (identical rows)
        first = torch.full((groups,), len(group), device=group.device).scatter_reduce(
            0, group, torch.arange(len(group), device=group.device), "amin")
        proxies = torch.cat([F.normalize(loss_fn.proxies, dim=1),
                             mixed_proxies[first].to(loss_fn.proxies.dtype)])   # (C + G, D)
        loss = loss_fn(torch.cat([emb, mixed]), torch.cat([labels, c + group]), proxies=proxies)
        synthetic = None
        if record:
            memb = mixed_membership(labels[i], labels[j], lam, c, emb.dtype)
            synthetic = SyntheticPoints(mixed.detach(), memb, torch.stack([i, j], 1),
                                        torch.full((len(i),), lam, dtype=emb.dtype,
                                                   device=emb.device), self.kind)
        values = {"loss": loss.detach(), **loss_terms(loss_fn), "lambda": lam,
                  "synthetic_classes": float(groups)}
        return StepResult(loss, values, synthetic)

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}, alpha={self.alpha}, mu={self.mu}"
