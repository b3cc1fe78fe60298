"""Embedding Expansion (Ko & Gu, CVPR 2020; docs/METHODS.md section 4): synthetic points on the
segments between same-class embeddings, then hard negative pair mining over original + synthetic
points, plugged into a pair loss.

Two steps per batch of B L2-normalised embeddings::

    x_k = (k * x_j + (n + 1 - k) * x_i) / (n + 1),  k = 1..n        (EE eq. 1, then L2-normalised)
    (u*, v*) = argmax_{u in class c, v in class c'} s(u, v)          (hard negative pair mining)

over every original and synthetic point u, v of each pair of classes (c, c') in the batch.

How the losses use the points (docs/METHODS.md section 4):

- Anchors are the B original embeddings; positives are the anchor's original same-class
  embeddings only (EE's "HPHN": the hardest positive comes from the originals; synthetic points
  are never positives).
- Negatives, ``negatives="anchor"`` (the default, the official HPHN mining): for anchor i and
  every other class c' of the batch one negative, the similarity of the hardest pair between
  G(i) = {x_i and the synthetic points made from x_i} and all original and synthetic points of
  c'. The loss's ``pair_loss(S, Y, valid)`` runs on this mined (B, B + P) similarity matrix
  (P = classes in the batch), so every pair loss keeps its own form: batch-hard triplet = HPHN
  triplet (the official code's reshape-min over the anchor's rows), lifted structure =
  log-sum-exp over the anchor's hardest pairs with the other classes, N-pair = softmax over
  them, multi-similarity = its weighting over them. Gradients reach both ends of every mined
  pair (a synthetic end carries them back to its two parents), and every anchor gets a push of
  its own.
- ``negatives="class-pair"``: one hardest pair per pair of classes, over all their points,
  shared by every anchor of the class. This was Tango's default until the review against the
  official code (docs/METHODS.md, errata): the negative gradient reaches only the two ends of
  each class pair, about a quarter of the anchors of a 16 x 4 batch. Kept for comparison.
- ``negatives="point"``: each anchor sees every original and synthetic point of the other classes
  as its own negative references (the loss's ``forward`` with ``ref_embeddings = cat(originals,
  synthetics)`` and a mask hiding same-class synthetic references); the loss's own mining picks
  among them (batch-hard triplet: the hardest negative of the anchor itself).

Official code (clovaai/embedding-expansion, MXNet, HPHN triplet only) pairs consecutive batch
samples (0, 1), (2, 3), ... (``pairing="consecutive"``, floor(K/2) pairs per class of K) instead
of all K (K - 1) / 2 same-class pairs (``pairing="all"``, the paper's description, default); with
``pairing="consecutive"``, ``negatives="anchor"`` and ``TripletLoss(distance="euclidean")`` the
loss equals the official one up to its reduction (tests/test_official.py). The official
Symmetrical Synthesis code (see ``synthesis.py``) builds its N-pair logits from a fixed set of
point combinations of one pair per class; Tango uses the same per-anchor mining for both methods.

No extra parameters, no Python loop over pairs: pair enumeration, interpolation and mining are
batched tensor operations (the mining is one (T, T) similarity over the T = B + S points).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dml.losses import as_membership
from dml.mixing.base import (
    MixingStrategy,
    StepResult,
    SyntheticPoints,
    loss_capabilities,
    loss_terms,
    register_mixing,
)

__all__ = [
    "PAIRINGS",
    "NEGATIVES",
    "same_class_pairs",
    "expand_embeddings",
    "NegativePairs",
    "hardest_negative_pairs",
    "hardest_negatives_per_anchor",
    "synthetic_pair_loss",
    "PairSynthesisStrategy",
    "EmbeddingExpansion",
]

PAIRINGS = ("all", "consecutive")
NEGATIVES = ("anchor", "class-pair", "point")
# The losses the EE paper plugs into (triplet incl. HPHN, lifted structure, N-pair, multi-similarity).


# --------------------------------------------------------------------------- pairs and points


def same_class_pairs(labels: torch.Tensor, pairing: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(i, j)`` (Q,), (Q,) of same-class batch examples, ``i != j``.

    ``"all"``: every unordered pair ``i < j`` of a class (K (K - 1) / 2 per class of K examples).
    ``"consecutive"``: the official EE code's pairing: within each class, in batch order, the 1st
    with the 2nd, the 3rd with the 4th, ... (floor(K / 2) per class; an odd one out is unpaired).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {list(PAIRINGS)}, got {pairing!r}")
    labels = labels.reshape(-1)
    b = labels.numel()
    if pairing == "all":
        i, j = torch.triu_indices(b, b, 1, device=labels.device)
        keep = labels[i] == labels[j]
        return i[keep], j[keep]
    order = torch.sort(labels, stable=True).indices
    ls = labels[order]
    pos = torch.arange(b, device=labels.device)
    starts = torch.ones(b, dtype=torch.bool, device=labels.device)
    starts[1:] = ls[1:] != ls[:-1]
    run_start = torch.cummax(torch.where(starts, pos, 0), 0).values
    rank = pos - run_start                                   # position within its class
    p = torch.nonzero((rank[:-1] % 2 == 0) & (ls[1:] == ls[:-1])).flatten()
    return order[p], order[p + 1]


def expand_embeddings(emb: torch.Tensor, labels: torch.Tensor, n: int = 2, pairing: str = "all",
                      normalize: bool = True):
    """Embedding Expansion's synthetic points (EE eq. 1).

    For each same-class pair (x_i, x_j) (``same_class_pairs``) and k = 1..n:
    ``x_k = (k x_j + (n + 1 - k) x_i) / (n + 1)``, L2-normalised if ``normalize``.

    Returns ``points`` (Q n, D), ``labels`` (Q n,) (the pair's class), ``parents`` (Q n, 2) = (i, j)
    and ``weight`` (Q n,) = (n + 1 - k) / (n + 1), the weight of parent 0 (x_i), so that before
    normalisation ``point = weight x_i + (1 - weight) x_j``; the weights of a pair are
    {1/(n+1), ..., n/(n+1)}. Points are pair-major (the n points of pair 0 first).
    """
    if n < 1:
        raise ValueError(f"n (synthetic points per pair) must be >= 1, got {n}")
    i, j = same_class_pairs(labels, pairing)
    q, d = i.numel(), emb.shape[1]
    k = torch.arange(1, n + 1, device=emb.device, dtype=emb.dtype)
    weight = (n + 1 - k) / (n + 1)                                          # (n,)
    pts = weight[None, :, None] * emb[i][:, None] + (1 - weight)[None, :, None] * emb[j][:, None]
    pts = pts.reshape(q * n, d)
    if normalize:
        pts = F.normalize(pts, dim=1)
    parents = torch.stack([i, j], 1).repeat_interleave(n, 0)               # (Q n, 2)
    return pts, labels[i].repeat_interleave(n), parents, weight.repeat(q)


# --------------------------------------------------------------------------- mining


def _class_grid(labels: torch.Tensor):
    """Points laid out per class in a padded (P, m) grid (m = largest class size).

    Returns ``classes`` (P,) sorted, ``grid`` (P m,) point indices with T (= no point) as
    padding, ``m`` and ``pad`` (P m,) bool.
    """
    classes, inv = torch.unique(labels, return_inverse=True)
    p, t, dev = classes.numel(), labels.numel(), labels.device
    counts = torch.bincount(inv, minlength=p)
    m = int(counts.max()) if t else 0
    order = torch.sort(inv, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    slot = inv[order] * m + (torch.arange(t, device=dev) - starts[inv[order]])
    grid = torch.full((p * m,), t, dtype=torch.long, device=dev)           # t = padding
    grid[slot] = order
    return classes, grid, m, grid == t


def _grid_similarity(points: torch.Tensor, rows: torch.Tensor, grid: torch.Tensor,
                     pad: torch.Tensor) -> torch.Tensor:
    """Similarities (len(rows), P m) of the points ``rows`` to the grid's points, -inf on pads."""
    e = torch.cat([points.detach(), points.new_zeros(1, points.shape[1])])
    s = e[rows] @ e[grid].T
    return s.masked_fill_(pad[None, :], float("-inf")) if bool(pad.any()) else s


@dataclass
class NegativePairs:
    """Mined hardest negative pairs, one per row and class of the batch.

    A row is a class (class-pair mining, ``hardest_negative_pairs``: (P, P) fields) or an anchor
    (per-anchor mining, ``hardest_negatives_per_anchor``: (B, P) fields). classes: (P,) the
    classes present, sorted; u: index of the row's end of the pair (a point of the row's class;
    per anchor: the anchor itself or one of its synthetic points); v: index of the other end, a
    point of classes[col]; sim: their similarity (no grad); valid: False where the column is
    the row's own class.
    """

    classes: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    sim: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
def hardest_negative_pairs(points: torch.Tensor, labels: torch.Tensor) -> NegativePairs:
    """Class-pair mining (``negatives="class-pair"``): for classes (c, c'),
    ``argmax_{u in c, v in c'} s(u, v)`` over all points (original and synthetic) of the two
    classes. ``points`` (T, D), ``labels`` (T,).

    Vectorised: points are laid out per class in a padded (P, m) grid and one (P m, P m)
    similarity matrix is reduced per block (m = largest class size; for a balanced batch P m = T).
    """
    classes, grid, m, pad = _class_grid(labels)
    p, dev = classes.numel(), points.device
    s = _grid_similarity(points, grid, grid, pad)                          # (P m, P m)
    if bool(pad.any()):                                                     # padded rows too
        s.masked_fill_(pad[:, None], float("-inf"))
    # block maxima: over u of each class for every v (a fast strided amax), then over v
    s3 = s.view(p, m, p * m)                                                # (class of u, u, v)
    best, arg_v = s3.amax(1).view(p, p, m).max(-1)                          # (P, P)
    rows = torch.arange(p, device=dev)
    v_slot = rows[None, :] * m + arg_v                                      # (P, P) slot of v
    # best u of class c for that v: s is symmetric, so read row v over class c's columns
    arg_u = s.view(p * m, p, m)[v_slot, rows[:, None]].argmax(-1)         # (P, P)
    u = grid[rows[:, None] * m + arg_u]
    v = grid[v_slot]
    valid = ~torch.eye(p, dtype=torch.bool, device=dev)
    return NegativePairs(classes, u, v, best, valid)


@torch.no_grad()
def hardest_negatives_per_anchor(points: torch.Tensor, labels: torch.Tensor,
                                 parents: torch.Tensor) -> NegativePairs:
    """The official HPHN mining, per anchor: for anchor i of class c and every other class c',

        (u*, v*) = argmax_{u in G(i), v in c'} s(u, v),   G(i) = {x_i} + {synthetic points with i
                                                                       as a parent}

    over original and synthetic points v (clovaai/embedding-expansion ``hard_example_mining``
    takes, per anchor, the minimum distance over the anchor and the synthetic points of its own
    segment to every point of another class). Every anchor gets its own negative, which
    involves the anchor or a point made from it, so every anchor receives negative-side gradient.

    points (T, D): the B originals first, then the S synthetic points; labels (T,);
    parents (S, 2) batch indices of each synthetic point's parents.
    """
    t = points.shape[0]
    b, dev = t - parents.shape[0], points.device
    classes, grid, m, pad = _class_grid(labels)
    p = classes.numel()
    s = _grid_similarity(points, torch.arange(t, device=dev), grid, pad)   # (T, P m)
    to_class, slot = s.view(t, p, m).max(-1)                                # (T, P) best v per class
    # every (owner anchor, point of G(owner)) entry; the anchor itself first
    syn = torch.arange(b, t, device=dev)
    owner = torch.cat([torch.arange(b, device=dev), parents[:, 0], parents[:, 1]])   # (E,)
    point = torch.cat([torch.arange(b, device=dev), syn, syn])
    val = to_class[point]                                                   # (E, P)
    idx = owner[:, None].expand_as(val)
    best = val.new_full((b, p), float("-inf")).scatter_reduce(0, idx, val, "amax")
    entry = torch.arange(len(point), device=dev)[:, None].expand_as(val)
    hit = torch.where(val == best[owner], entry, -1)
    pick = hit.new_full((b, p), -1).scatter_reduce(0, idx, hit, "amax")     # (B, P) an argmax
    u = point[pick]
    v = grid[torch.arange(p, device=dev)[None, :] * m + slot[u, torch.arange(p, device=dev)]]
    valid = labels[:b, None] != classes[None, :]
    return NegativePairs(classes, u, v, best, valid)


def synthetic_pair_loss(loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor,
                        syn: torch.Tensor, syn_labels: torch.Tensor, parents: torch.Tensor,
                        negatives: str = "anchor", record: bool = True):
    """A pair loss over original anchors with synthetic points as extra negatives.

    emb (B, D) originals, labels (B,) hard; syn (S, D) synthetic points of classes syn_labels
    (S,), made from the batch examples ``parents`` (S, 2). Positives are the anchor's original
    same-class embeddings (never synthetic points: EE's "hardest positive among originals").

    - ``"anchor"`` (default; the official HPHN mining): for each anchor and each other class c'
      of the batch one negative, the hardest pair between the anchor's own points (itself and
      the synthetic points made from it) and the points of c' (``hardest_negatives_per_anchor``);
      the loss runs as ``loss_fn.pair_loss`` on the mined (B, B + P) similarity matrix.
    - ``"class-pair"``: one hardest negative pair per pair of classes (c, c') over all their
      points, shared by every anchor of c (``hardest_negative_pairs``). The gradient then reaches
      only the two ends of each class pair: in a 16 x 4 batch with batch-hard triplet only about
      a quarter of the anchors receive any negative-side gradient. Kept for comparison.
    - ``"point"``: the anchor's references are all originals and the synthetic points of other
      classes (same-class synthetic references masked out); the loss's own mining applies. A
      pytorch-metric-learning loss gets exactly these pairs through ``ref_emb``, ``ref_labels``
      and ``indices_tuple``.

    Returns ``(loss, hardest, hard_synthetic)``: hardest (S,) bool, synthetic points that are an
    end of a mined pair ("anchor", "class-pair") or the hardest negative of some anchor
    ("point"), None unless ``record``; hard_synthetic, the fraction of those mined pairs with a
    synthetic end (0-d tensor, no grad, no host sync).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {list(NEGATIVES)}, got {negatives!r}")
    b = emb.shape[0]
    pts = torch.cat([emb, syn.to(emb.dtype)])                               # (T, D)
    pts_labels = torch.cat([labels, syn_labels])
    eye = torch.eye(b, dtype=torch.bool, device=emb.device)
    same = labels[:, None] == labels[None, :]
    if negatives == "point":
        valid = torch.cat([~eye, labels[:, None] != syn_labels[None, :]], 1)   # (B, T)
        y = labels[:, None] == pts_labels[None, :]
        if callable(getattr(loss_fn, "pair_loss", None)):
            sim = emb @ pts.T                                               # (B, T)
            loss = loss_fn.pair_loss(sim, y.to(sim.dtype), valid)
        else:   # a pytorch-metric-learning loss: the same pairs as an indices tuple
            a1, p = torch.nonzero(valid & y, as_tuple=True)
            a2, n = torch.nonzero(valid & ~y, as_tuple=True)
            loss = loss_fn(emb, labels, indices_tuple=(a1, p, a2, n), ref_emb=pts,
                           ref_labels=pts_labels)
        with torch.no_grad():
            negs = valid & ~y
            score = torch.where(negs, emb @ pts.T, float("-inf"))
            arg, used = score.argmax(1), negs.any(1)                        # (B,) each
            frac = ((arg >= b) & used).sum() / used.sum().clamp_min(1)
            hardest = None
            if record:
                hardest = torch.zeros(len(pts), dtype=torch.bool, device=emb.device)
                hardest[arg[used]] = True
                hardest = hardest[b:]
        return loss, hardest, frac
    if not callable(getattr(loss_fn, "pair_loss", None)):
        raise ValueError(f"negatives={negatives!r} scores mined pairs that need not contain the "
                         f"anchor, which only a Tango pair loss can (pair_loss); with "
                         f"{type(loss_fn).__name__} use negatives='point'")
    if negatives == "anchor":
        neg = hardest_negatives_per_anchor(pts, pts_labels, parents)
        u, v, neg_valid = neg.u, neg.v, neg.valid                           # (B, P) each
    else:
        neg = hardest_negative_pairs(pts, pts_labels)
        row = torch.searchsorted(neg.classes, labels)                       # (B,) anchor's class
        u, v, neg_valid = neg.u[row], neg.v[row], neg.valid[row]
    hn = (pts[u] * pts[v]).sum(-1)                                          # (B, P) with grad
    sim = torch.cat([emb @ emb.T, hn], 1)                                   # (B, B + P)
    y = torch.cat([same, torch.zeros_like(neg_valid)], 1).to(sim.dtype)
    valid = torch.cat([same & ~eye, neg_valid], 1)
    loss = loss_fn.pair_loss(sim, y, valid)
    with torch.no_grad():
        synthetic_end = ((u >= b) | (v >= b)) & neg_valid
        frac = synthetic_end.sum() / neg_valid.sum().clamp_min(1)
        hardest = None
        if record:
            hardest = torch.zeros(len(pts), dtype=torch.bool, device=emb.device)
            hardest[u[neg_valid]] = True
            hardest[v[neg_valid]] = True
            hardest = hardest[b:]
    return loss, hardest, frac


# --------------------------------------------------------------------------- strategies


class PairSynthesisStrategy(MixingStrategy):
    """Shared step of the embedding-level synthesis strategies for pair losses (Embedding
    Expansion, Symmetrical Synthesis): make synthetic points from same-class pairs of the
    embedded batch (``make_points``), mine hardest negatives and apply the pair loss
    (``synthetic_pair_loss``). Subclasses set ``name``, ``kind`` and implement ``make_points``.

    The loss is a Tango pair loss (any ``negatives``) or a pytorch-metric-learning pair or
    tuple loss (``negatives="point"``, which it takes through ``ref_emb`` and
    ``indices_tuple``).
    """

    kind = ""
    needs = frozenset({"pairs"})
    requires = "a pair-based loss"

    def __init__(self, loss, pairing: str = "all", negatives: str = "anchor"):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {list(PAIRINGS)}, got {pairing!r}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {list(NEGATIVES)}, got {negatives!r}")
        self.pairing = pairing
        self.negatives = negatives
        super().__init__(loss)

    @classmethod
    def accepts(cls, loss) -> bool:
        """A Tango pair loss, or a pytorch-metric-learning pair or tuple loss."""
        return bool(loss_capabilities(loss) & {"pairs", "references"})

    def check_loss(self, loss) -> None:
        caps = loss_capabilities(loss)
        if "pairs" in caps:
            return
        if "references" in caps:
            if self.negatives != "point":
                raise ValueError(
                    f"{self.name} with negatives={self.negatives!r} scores mined pairs that "
                    f"need not contain the anchor, which {type(loss).__name__} cannot take; "
                    f"with a pytorch-metric-learning loss use negatives='point' (each anchor's "
                    f"negatives among the original and synthetic points of other classes)")
            return
        what = ("compares embeddings with proxies" if "proxies" in caps or hasattr(loss, "W")
                or hasattr(loss, "proxies") else "does not score pairs of embeddings")
        raise ValueError(f"{self.name} needs a pair-based loss (a Tango pair loss, or a "
                         f"pytorch-metric-learning pair or tuple loss); {type(loss).__name__} "
                         f"{what}")

    def make_points(self, emb: torch.Tensor, labels: torch.Tensor):
        """-> points (S, D), labels (S,), parents (S, 2), weight of parent 0 (S,) (NaN when the
        point is not an interpolation)."""
        raise NotImplementedError

    def _step(self, loss_fn, emb: torch.Tensor, labels: torch.Tensor,
              record: bool = True) -> StepResult:
        if labels.dim() != 1:
            raise ValueError(f"{self.name} needs hard labels (B,), got shape {tuple(labels.shape)}")
        pts, pts_labels, parents, weight = self.make_points(emb, labels)
        loss, hardest, frac = synthetic_pair_loss(loss_fn, emb, labels, pts, pts_labels, parents,
                                                  self.negatives, record)
        values = {"loss": loss.detach(), **loss_terms(loss_fn), "hard_synthetic": frac}
        synthetic = None
        if record:
            width = int(labels.max()) + 1 if labels.numel() else 1
            width = max(width, int(getattr(loss_fn, "num_classes", 0) or 0))
            synthetic = SyntheticPoints(pts.detach(), as_membership(pts_labels, width, emb.dtype),
                                        parents, weight.detach().to(emb.dtype), self.kind, hardest)
        return StepResult(loss, values, synthetic)

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}, pairing={self.pairing!r}, negatives={self.negatives!r}"


@register_mixing
class EmbeddingExpansion(PairSynthesisStrategy):
    """Embedding Expansion (Ko & Gu, CVPR 2020): ``n`` L2-normalised points dividing each
    same-class segment into n + 1 equal parts, hard negative pair mining over original + synthetic
    points, for triplet (HPHN with batch-hard mining), lifted structure, N-pair and
    multi-similarity losses.

    Args:
        n: synthetic points per pair (paper default 2; 2-8 best).
        pairing: ``"all"`` same-class pairs (paper, K (K-1)/2 per class) or ``"consecutive"``
            (official code, floor(K/2) per class). With "all" the point count grows as K^2: a
            32 x 4 batch gives 384 points (mining over 512, a few ms per step on one CPU core),
            an 8 x 16 batch 1920 (mining over 2048, tens of ms); prefer "consecutive" for large K.
        normalize: L2-normalise the synthetic points (paper default).
        negatives: ``"anchor"`` (hardest negative pair per anchor and class, the official HPHN
            mining, default), ``"class-pair"`` (one hardest pair per pair of classes, shared by
            the class's anchors) or ``"point"`` (synthetic points as extra negative references
            of each anchor); see the module doc.

    Synthetic record: kind "ee", membership one-hot of the pair's class, parents (i, j),
    weight of x_i = (n + 1 - k) / (n + 1), hardest = end of a mined hardest negative pair.
    """

    name = "embedding-expansion"
    kind = "ee"
    version = 2   # 2: per-anchor negatives by default (docs/METHODS.md §11, defect 2)

    def __init__(self, loss, n: int = 2, pairing: str = "all", normalize: bool = True,
                 negatives: str = "anchor"):
        if int(n) != n or n < 1:
            raise ValueError(f"n (synthetic points per pair) must be an integer >= 1, got {n}")
        self.n = int(n)
        self.normalize = bool(normalize)
        super().__init__(loss, pairing, negatives)

    def make_points(self, emb, labels):
        return expand_embeddings(emb, labels, self.n, self.pairing, self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, normalize={self.normalize}"
