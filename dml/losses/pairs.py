"""Pair losses, written once on an anchor x reference similarity matrix with soft pair targets
(docs/METHODS.md section 1): contrastive, multi-similarity, triplet, lifted structure, N-pair."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (_HParamsRepr, _log1p_weighted_sum_exp, _masked_mean, _safe_div,
                     _weighted_logsumexp)
from .labels import _is_soft, pair_targets


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
