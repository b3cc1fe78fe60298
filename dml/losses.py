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
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dml.registry import Registry

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


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# numerics shared by the losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# pair losses
# --------------------------------------------------------------------------------------------


class PairLoss(_HParamsRepr, nn.Module):
    """Base class of losses defined on anchor-reference similarities with soft pair targets.

    ``forward(embeddings, labels, ref_embeddings=None, ref_labels=None, mask=None)``:

    - embeddings: (A, D) L2-normalised anchors; labels: (A,) hard or (A, C) soft.
    - ref_embeddings: (R, D), default the anchors themselves (then self-pairs i == i are
      excluded); ref_labels: (R,) or (R, C), default ``labels``.
    - mask: (A, R) bool, optional: which references each anchor may see.

    It forms ``S = embeddings @ ref_embeddings.T`` (A, R), ``Y = pair_targets(labels, ref_labels)``
    and ``valid = mask & not-self``, and returns ``pair_loss(S, Y, valid)``, a scalar. Subclasses
    implement ``_pair_loss(S, Y, valid)``.
    """

    uses_proxies = False
    version = 1   # the method's version, raised when its results change (docs/METHODS.md §12)

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *args, **kwargs
                ) -> torch.Tensor:
        """``(embeddings, labels, ref_embeddings=None, ref_labels=None, mask=None)``: the loss of
        the pairs that ``pairs`` forms from these arguments."""
        return self.pair_loss(*self.pairs(embeddings, labels, *args, **kwargs))

    def pairs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sim, y, valid)`` of ``forward``'s arguments: similarities (A, R), soft pair targets
        (A, R) and the valid pairs (A, R) bool (the mask, without self-pairs)."""
        self_pairs = ref_embeddings is None
        if self_pairs:
            ref_embeddings = embeddings
        if ref_labels is None:
            ref_labels = labels
        a, r = embeddings.shape[0], ref_embeddings.shape[0]
        if labels.shape[0] != a or ref_labels.shape[0] != r:
            raise ValueError(
                f"labels ({labels.shape[0]}) / ref_labels ({ref_labels.shape[0]}) do not match "
                f"embeddings ({a}) / ref_embeddings ({r})"
            )
        sim = embeddings @ ref_embeddings.T  # (A, R)
        y = pair_targets(labels, ref_labels).to(device=sim.device, dtype=sim.dtype)  # (A, R)
        if mask is None:
            valid = torch.ones(a, r, dtype=torch.bool, device=sim.device)
        else:
            if tuple(mask.shape) != (a, r):
                raise ValueError(f"mask must be ({a}, {r}), got {tuple(mask.shape)}")
            valid = mask.to(device=sim.device, dtype=torch.bool)
        if self_pairs:
            valid = valid & ~torch.eye(a, dtype=torch.bool, device=sim.device)
        return sim, y, valid

    def mined_pairs(self, embeddings: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The positive and negative pairs (B, B) bool that the loss's miner keeps on a clean
        batch with hard labels, or None for a loss without a miner (every pair is used)."""
        return None

    def pair_loss(
        self, sim: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss (scalar) from similarities ``sim`` (A, R), targets ``y`` (A, R) in [0, 1] and
        ``valid`` (A, R) bool (default: all pairs). Anchors or batches without usable pairs
        contribute 0, never NaN."""
        if valid is None:
            valid = torch.ones_like(sim, dtype=torch.bool)
        if sim.numel() == 0:  # no anchors or no references
            self.last_terms = {}
            return sim.sum() * 0.0
        return self._pair_loss(sim, y.to(sim.dtype), valid.bool())

    def _pair_loss(self, sim: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _weights(y: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive weights ``y`` and negative weights ``1 - y``, zero on invalid pairs."""
        v = valid.to(y.dtype)
        return y * v, (1.0 - y) * v


class MarginPairLoss(PairLoss):
    """A pair loss with a positive and a negative similarity margin (contrastive, lifted)."""

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.5) -> None:
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin


DISTANCES = ("cosine", "euclidean")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}")


def _neg_euclidean(sim: torch.Tensor) -> torch.Tensor:
    """``-||a - r||`` from the cosine similarity of unit vectors (``||a - r||^2 = 2 - 2 s``).

    A score that grows with similarity, so the similarity-form code of a loss applies to the
    distance form unchanged. Below a squared distance of 1e-12 the value is clamped (no
    gradient), so identical points give no inf * 0 in the backward pass.
    """
    return -torch.sqrt((2.0 - 2.0 * sim).clamp_min(1e-12))


def _count(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype).sum()


class ContrastiveLoss(MarginPairLoss):
    """Contrastive loss (Hadsell et al. 2006; pml ``ContrastiveLoss``), docs/METHODS.md section 1.

    Per pair, with target ``y`` in [0, 1]:

    - ``distance="cosine"`` (default; pml with ``CosineSimilarity``), margins are similarities:
      ``y * [pos_margin - s]_+  +  (1 - y) * [s - neg_margin]_+``.
    - ``distance="euclidean"`` (pml with ``LpDistance``; the official Metrix code), margins are
      distances ``d = ||a - r|| = sqrt(2 - 2 s)`` on unit vectors:
      ``y * [d - pos_margin]_+  +  (1 - y) * [neg_margin - d]_+``. The official Metrix margins
      are ``pos_margin=0, neg_margin=0.5`` (a distance of 0.5 is a cosine of 0.875, not 0.5).

    Reduction (pml ``AvgNonZeroReducer`` on each part, summed): each part is the sum of its
    weighted terms divided by the *number of pairs* whose weighted term is non-zero,
    ``sum(y h+) / #{y h+ > 0}`` and ``sum((1-y) h-) / #{(1-y) h- > 0}``, as the official Metrix
    code averages ``lam * relu(d - m_pos)`` over its non-zero pairs. The soft label therefore
    survives the averaging: scaling every ``y`` by c scales the positive part by c (a normaliser
    of ``sum(y [h+ > 0])`` would cancel lambda, pulling a mix that is 80 % negative with full
    weight; tests/test_losses.py checks the property). With 0/1 targets this is pml's average.

    last_terms: ``pos``, ``neg`` (the two averages).
    """

    version = 2   # 2: normalisers count non-zero pairs (docs/METHODS.md §11, defect 1)

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.5,
                 distance: str = "cosine") -> None:
        super().__init__(pos_margin, neg_margin)
        _check_distance(distance)
        if distance == "euclidean" and not pos_margin < neg_margin:
            raise ValueError(
                f"with distance='euclidean' the margins are distances and pos_margin must be "
                f"< neg_margin, got pos_margin={pos_margin}, neg_margin={neg_margin}; the "
                f"official Metrix contrastive uses pos_margin=0, neg_margin=0.5")
        self.distance = distance

    def _pair_loss(self, sim, y, valid):
        wp, wn = self._weights(y, valid)
        if self.distance == "euclidean":   # -d grows with similarity; margins negate with it
            score, m_pos, m_neg = _neg_euclidean(sim), -self.pos_margin, -self.neg_margin
        else:
            score, m_pos, m_neg = sim, self.pos_margin, self.neg_margin
        tp = wp * F.relu(m_pos - score)  # (A, R) weighted positive terms
        tn = wn * F.relu(score - m_neg)
        pos = _safe_div(tp.sum(), _count(tp > 0, sim.dtype))
        neg = _safe_div(tn.sum(), _count(tn > 0, sim.dtype))
        self.last_terms = {"pos": pos.detach(), "neg": neg.detach()}
        return pos + neg


class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (Wang et al., CVPR 2019, eq. 5; pml ``MultiSimilarityLoss``).

    Per anchor a (docs/METHODS.md §1, multi-similarity row):
    ``1/alpha * log(1 + sum_x y e^{-alpha (s - base)})``
    ``+ 1/beta * log(1 + sum_x (1-y) e^{beta (s - base)})``, averaged over anchors that have at
    least one valid reference (all anchors when N >= 2).

    ``epsilon`` (default None: no mining) turns on the MS paper's pair mining (pml
    ``MultiSimilarityMiner``) for the clean batch, ``loss(embeddings, labels)`` with hard
    labels: an anchor keeps the positives with ``s_ap - epsilon < max_n s_an`` and the negatives
    with ``s_an + epsilon > min_p s_ap``; anchors keep nothing when the batch lacks positives or
    negatives. The mean is still over every anchor (the official Metrix and MS code divide by the
    batch, not pml's ``AvgNonZeroReducer``). Calls with extra references (mixed points) and
    ``pair_loss`` are not mined. The official Metrix setting is alpha 17.97, beta 75.66, base
    0.77, epsilon 0.39 (the MS paper: 2, 50, 0.5, 0.1).

    last_terms: ``pos``, ``neg`` (anchor means of the two parts).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: float | None = None) -> None:
        super().__init__()
        if epsilon is not None and not epsilon >= 0:
            raise ValueError(f"epsilon (miner margin) must be >= 0 or None, got {epsilon}")
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, mask=None):
        sim, y, valid = self.pairs(embeddings, labels, ref_embeddings, ref_labels, mask)
        if (self.epsilon is None or ref_embeddings is not None or _is_soft(labels)
                or sim.numel() == 0):
            return self.pair_loss(sim, y, valid)
        keep_pos, keep_neg = self._mine(sim.detach(), y, valid)
        return self._loss(sim, y, keep_pos | keep_neg, anchors=valid.any(1))

    def mined_pairs(self, embeddings, labels):
        if self.epsilon is None:
            return None
        sim, y, valid = self.pairs(embeddings.detach(), labels)
        return self._mine(sim, y, valid)

    def _mine(self, sim, y, valid):
        pos, neg = valid & (y == 1), valid & (y == 0)
        max_neg = torch.where(neg, sim, float("-inf")).amax(1, keepdim=True)  # (A, 1)
        min_pos = torch.where(pos, sim, float("inf")).amin(1, keepdim=True)
        both = pos.any() & neg.any()        # pml: no pairs at all without both kinds
        return (pos & (sim - self.epsilon < max_neg) & both,
                neg & (sim + self.epsilon > min_pos) & both)

    def _pair_loss(self, sim, y, valid):
        return self._loss(sim, y, valid, anchors=valid.any(1))

    def _loss(self, sim, y, valid, anchors):
        wp, wn = self._weights(y, valid)
        pos = _log1p_weighted_sum_exp(-self.alpha * (sim - self.base), wp) / self.alpha  # (A,)
        neg = _log1p_weighted_sum_exp(self.beta * (sim - self.base), wn) / self.beta
        pos_m, neg_m = _masked_mean(pos, anchors), _masked_mean(neg, anchors)
        self.last_terms = {"pos": pos_m.detach(), "neg": neg_m.detach()}
        return pos_m + neg_m


class TripletLoss(PairLoss):
    """Triplet margin loss (Schroff et al. 2015; Hermans et al. 2017 for batch-hard), on cosine
    similarity ``h(a, p, n) = [s(a, n) - s(a, p) + margin]_+`` (``distance="cosine"``, default)
    or on the euclidean distance of unit vectors ``h = [d(a, p) - d(a, n) + margin]_+`` with
    ``d = sqrt(2 - 2 s)`` (``distance="euclidean"``, the official Embedding Expansion HPHN
    triplet; its margin is a distance). Both select the same hardest pairs (d falls as s grows).

    Soft targets: triplet (a, p, n) has weight ``w = y_p * (1 - y_n)``; a reference with
    0 < y < 1 is both a positive and a negative (the degenerate triplet p == n is left out).

    - ``mining="all"``: every valid triplet; reduction = pml ``AvgNonZeroReducer``: the sum of
      the weighted losses over the *number* of triplets whose weighted loss is non-zero,
      ``sum(w h) / #{w h > 0}`` (docs/METHODS.md section 1: normalisers count, never sum weights).
      Computed exactly in O(A R log R), memory O(A R), by sorting each anchor's similarities
      (no (A, R, R) tensor), so large mixed reference sets are affordable.
    - ``mining="batch-hard"`` (default): per anchor, hardest positive = lowest similarity among
      references with y > 0, hardest negative = highest similarity among references with y < 1
      (pml ``BatchHardMiner``); that triplet has weight ``y_p (1 - y_n)``; reduction as above
      over anchors (pml ``TripletMarginLoss`` on the mined triplets).

    Anchors without a positive or a negative contribute nothing.

    last_terms: ``ap`` / ``an`` (mean anchor-positive / anchor-negative score used: the
    similarity, or minus the distance with ``distance="euclidean"``), ``active`` (fraction of
    the weighted triplets with a positive loss).
    """

    version = 2   # 2: the normaliser counts non-zero triplets

    MININGS = ("batch-hard", "all")

    def __init__(self, margin: float = 0.1, mining: str = "batch-hard",
                 distance: str = "cosine") -> None:
        super().__init__()
        if mining not in self.MININGS:
            raise ValueError(f"mining must be one of {list(self.MININGS)}, got {mining!r}")
        _check_distance(distance)
        self.margin = margin
        self.mining = mining
        self.distance = distance

    def _pair_loss(self, sim, y, valid):
        # [t_n - t_p + m]_+ with a score t that grows with similarity: t = s, or t = -d
        score = _neg_euclidean(sim) if self.distance == "euclidean" else sim
        if self.mining == "all":
            return self._all_triplets(score, y, valid)
        return self._batch_hard(score, y, valid)

    def _batch_hard(self, sim, y, valid):
        pos_ok = valid & (y > 0)
        neg_ok = valid & (y < 1)
        has = pos_ok.any(1) & neg_ok.any(1)  # (A,)
        sp, ip = torch.where(pos_ok, sim, float("inf")).min(1)  # hardest positive
        sn, in_ = torch.where(neg_ok, sim, float("-inf")).max(1)  # hardest negative
        sp = torch.where(has, sp, 0.0)
        sn = torch.where(has, sn, 0.0)
        w = y.gather(1, ip[:, None])[:, 0] * (1.0 - y.gather(1, in_[:, None])[:, 0])
        w = w * has.to(w.dtype)
        wh = w * F.relu(sn - sp + self.margin)
        active = _count(wh > 0, sim.dtype)
        loss = _safe_div(wh.sum(), active)
        self.last_terms = {
            "ap": _masked_mean(sp, has).detach(),
            "an": _masked_mean(sn, has).detach(),
            "active": _safe_div(active, _count(w > 0, sim.dtype)).detach(),
        }
        return loss

    def _all_triplets(self, sim, y, valid):
        # sum_{p,n} u_p v_n [s_n - s_p + m]_+ with u = y, v = 1 - y: for each positive p the active
        # negatives are those with s_n > s_p - m, a suffix of the anchor's sorted similarities, so
        # the sum is  u_p * (sum_{active} v_n s_n - (s_p - m) sum_{active} v_n)  from suffix sums;
        # the count of active triplets likewise from suffix counts of [v_n > 0].
        u, v = self._weights(y, valid)
        acc = torch.float64 if sim.device.type in ("cpu", "cuda") else sim.dtype
        s_sorted, order = sim.sort(dim=1)  # ascending, differentiable in the values
        v_sorted = v.gather(1, order).to(acc)
        ss = s_sorted.to(acc)

        def suffix(x):  # (A, R) -> (A, R + 1) suffix sums, last column 0
            return F.pad(x.flip(1).cumsum(1).flip(1), (0, 1))

        suffix_v, suffix_vs = suffix(v_sorted), suffix(v_sorted * ss)
        suffix_n = suffix((v_sorted > 0).to(acc))
        thresh = sim - self.margin  # (A, R): negative n is active for p iff s_n > s_p - m
        k = torch.searchsorted(s_sorted.detach().contiguous(), thresh.detach().contiguous(), right=True)
        u_acc, has_u = u.to(acc), (u > 0).to(acc)
        num = (u_acc * (suffix_vs.gather(1, k) - thresh.to(acc) * suffix_v.gather(1, k))).sum()
        den = (has_u * suffix_n.gather(1, k)).sum()
        if self.margin > 0:  # drop the degenerate triplets p == n (soft refs are both p and n)
            num = num - (u_acc * v.to(acc)).sum() * self.margin
            den = den - (has_u * (v > 0).to(acc)).sum()
        loss = _safe_div(num, den).to(sim.dtype)
        total = (has_u.sum(1) * (v > 0).to(acc).sum(1)).sum() - (has_u * (v > 0).to(acc)).sum()
        self.last_terms = {
            "ap": _safe_div((u * sim).sum(), u.sum()).detach(),
            "an": _safe_div((v * sim).sum(), v.sum()).detach(),
            "active": _safe_div(den, total).to(sim.dtype).detach(),
        }
        return loss


class LiftedStructureLoss(MarginPairLoss):
    """Lifted structure loss, anchor-wise ("generalized") form (Hermans et al. 2017, p. 4, a
    smooth per-anchor version of Song et al., CVPR 2016, eq. 4; pml ``GeneralizedLiftedStructureLoss``
    with ``CosineSimilarity``):

    ``l(a) = [ log sum_x y e^{pos_margin - s}  +  log sum_x (1 - y) e^{s - neg_margin} ]_+``

    (docs/METHODS.md §1 with tau = relu, sigma = log, rho_plus = e^{m_pos - s}, rho_minus = e^{s - m_neg}),
    averaged over anchors that have at least one valid reference. The pair-based original (pml
    ``LiftedStructureLoss``) needs the negatives of each *reference*, which an (anchors x
    references) similarity matrix with extra mixed references does not have; the anchor-wise form
    does not. Anchors with no positive or no negative contribute 0 (pml instead treats an empty
    log-sum-exp as 0; the two agree whenever every anchor has a positive and a negative).
    Margins are similarities (pml's defaults 0 / 1 are for distances).

    last_terms: ``pos``, ``neg`` (anchor means of the two log-sum-exps).
    """

    def _pair_loss(self, sim, y, valid):
        wp, wn = self._weights(y, valid)
        lp, okp = _weighted_logsumexp(self.pos_margin - sim, wp)  # (A,)
        ln, okn = _weighted_logsumexp(sim - self.neg_margin, wn)
        both = okp & okn
        per_anchor = torch.where(both, F.relu(lp + ln), 0.0)
        anchors = valid.any(1)
        self.last_terms = {
            "pos": _masked_mean(lp, both).detach(),
            "neg": _masked_mean(ln, both).detach(),
        }
        return _masked_mean(per_anchor, anchors)


class NPairLoss(PairLoss):
    """Multi-class N-pair loss (Sohn, NeurIPS 2016, eq. 7) on cosine similarity, generalised to
    several and soft positives:

    ``l(a) = log(1 + (sum_x (1 - y) e^{s}) * (sum_x y e^{-s}))``
    ``     = log(1 + sum_{p,n} y_p (1 - y_n) e^{s_n - s_p})``

    (docs/METHODS.md §1 with tau = softplus, sigma = log, rho_plus = e^{-s}, rho_minus = e^{s}). With one
    positive per anchor this is exactly Sohn's ``log(1 + sum_n e^{s_n - s_p})``; averaged over
    anchors with at least one valid positive (pml ``NPairsLoss`` = this loss with a mask that
    shows each class's first sample only its second sample and the other classes' second samples).
    No embedding-norm regulariser (embeddings are unit vectors).

    last_terms: ``pos`` (mean ``log sum y e^{-s}``), ``neg`` (mean ``log sum (1-y) e^{s}``).
    """

    def __init__(self) -> None:
        super().__init__()

    def _pair_loss(self, sim, y, valid):
        wp, wn = self._weights(y, valid)
        lp, okp = _weighted_logsumexp(-sim, wp)  # (A,)
        ln, okn = _weighted_logsumexp(sim, wn)
        per_anchor = torch.where(okp & okn, F.softplus(lp + ln), 0.0)
        self.last_terms = {
            "pos": _masked_mean(lp, okp).detach(),
            "neg": _masked_mean(ln, okn).detach(),
        }
        return _masked_mean(per_anchor, okp)


# --------------------------------------------------------------------------------------------
# proxy losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

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
    if getattr(cls, "uses_proxies", False):
        if num_classes is None or embedding_dim is None:
            raise ValueError(f"loss {name!r} needs num_classes and embedding_dim")
        return cls(num_classes=int(num_classes), embedding_dim=int(embedding_dim), **params)
    return cls(**params)
