"""Metrix: mixup for deep metric learning (Venkataramanan et al., ICLR 2022; docs/METHODS.md section 2).

For every anchor of the batch the strategy mixes pairs of batch examples (parents) and adds the
mixed points, with mixed labels, as extra references of the generic loss::

    lambda ~ Beta(alpha, alpha)
    mixed  = lambda * h[first] + (1 - lambda) * h[second]        (h: image, feature map or embedding)
    label  = lambda * onehot(c_first) + (1 - lambda) * onehot(c_second)   (class memberships)
    E      = l_clean + w * l_mixed

Relative to a clean anchor of class c the label of a mixed point is
``lambda [c_first = c] + (1 - lambda) [c_second = c]`` (``dml.losses.pair_targets``), i.e. exactly
``lambda`` for a positive-negative mix. Three registered strategies differ only in where the
mixing happens:

- ``metrix-input``: pixels; every mixed image costs one forward/backward pass.
- ``metrix-feature``: the output of stage ``stage`` of the network (default: the last feature
  map before pooling), then through the rest of the network; ``stage=0`` is ``metrix-input``.
- ``metrix-embed``: L2-normalised embeddings, re-normalised after mixing; no extra forward pass.

Pairs, per anchor a (the anchor itself stays clean), ``pairs=``:

- ``"pos-neg"`` (default): first parent a positive of a, second parent a negative; label lambda.
  An anchor without a positive in the batch mixes *itself* with its negatives (anchor-negative
  fallback, also label lambda).
- ``"pos-pos"``: two distinct positives of a (label 1); with a single positive the anchor is the
  second parent.
- ``"neg-neg"``: two distinct negatives of a (label 0).

``first_parents="one"`` (default) takes one random first parent per anchor, ``"first"`` the
first candidate in batch order (the official code with all pairs), ``"hardest"`` the least
similar candidate (the official code with the multi-similarity miner, whose pairs come sorted
by similarity), ``"all"`` every candidate. The official
code mixes an anchor's *first* positive (batch order) with all its negatives at the embedding
level; in a P x K batch of randomly ordered images "one random positive" is the same in
distribution, and it lets the classmates of an anchor pick different positives. It keeps the
mixed set at about one mixed point per (anchor, negative): mixing every positive-negative pair
was a strong regulariser that cost accuracy (docs/METHODS.md, pitfalls).

Second parents: at the embedding level every candidate (all negatives for pos-neg; with proxy
losses 8 per anchor, see :class:`MetrixEmbedding`); at the input/feature level ``mixed_per_anchor =
k`` of them per first parent, chosen at random or hardest-first (``negatives="hardest"``: highest
clean similarity to the anchor for a negative, lowest for a positive; chosen without gradient).
The official input code takes the top-1 hardest negative per anchor-positive pair (with an
indexing bug: the sorted positions index the whole negative list instead of the anchor's own);
the default here is k = 1 random negative for one positive per anchor, so that the mixed pass
costs one extra forward of the batch size (about 2x a plain step). The official code also flips
a coin per batch between positive-negative mixing and anchor-negative mixing of the anchors
without positives (in a P x K batch every anchor has a positive, so those batches mix
nothing); here every anchor gets pos-neg mixes, anchor-negative ones only as its fallback.

Mixed points are deduplicated: the same ordered (first, second) pair built for several anchors is
forwarded once and shown to each of them through the loss mask, so the mixed pass never holds
more than ``B * k * first-parents`` feature maps (the official feature mode materialises one map
per anchor-positive-negative tuple).

Losses. Pair losses (contrastive, multi-similarity): ``loss_fn(clean, labels, ref_embeddings=
mixed, ref_labels=memberships, mask)``, the mask restricting each anchor to the mixed points built
for it; at the embedding level the same loss is evaluated on a compact (anchor, first, second)
similarity layout with ``loss_fn.pair_loss`` (identical value, computed from the clean similarity
matrix without forming the (anchors x mixed points) product, see :func:`mixed_similarities`).
Both terms of the generic loss act on every mixed point (the official multi-similarity embedding
mode dropped the mixed negative term). Proxy losses (proxy anchor, ProxyNCA++):
``loss_fn(mixed, memberships)``, a mixed point belonging to proxy p with weight
``lambda [c_first = p] + (1 - lambda) [c_second = p]``.

Randomness (parent choice, lambda) comes from the global CPU torch generator, so that
``torch.manual_seed`` reproduces a step and the trainer's saved RNG state resumes it.

BatchNorm: the mixed pass is a separate forward in the model's mode, so in training mode it
normalises with the statistics of the mixed batch and also updates the running statistics. The
official code freezes BatchNorm by default (``bn_freeze=1``: the backbone's BatchNorm layers in
eval mode, their affine parameters not trained); ``model.params.bn_freeze=true`` does the same
here (``dml.models``), and then clean and mixed passes both use the running statistics.

Official protocol options: ``first_parents="first"`` takes each anchor's first positive in batch
order (the official embedding-level layout with all pairs, first positive x every negative),
and ``mined=true`` mixes only the pairs the loss's miner keeps (official Metrix +
multi-similarity, with ``MultiSimilarityLoss(epsilon=0.39)``): the first parent among the
anchor's mined positives, the second parents among its mined negatives; the official code then
takes the miner's first positive, the least similar one (``first_parents="hardest"``). docs/METHODS.md lists the official
code's known defects that Tango does not repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dml.losses import mixed_membership
from dml.mixing.base import (MixingStrategy, StepResult, SyntheticPoints, loss_capabilities,
                             loss_terms, register_mixing)

PAIRS = ("pos-neg", "pos-pos", "neg-neg")
LAMBDA_PER = ("batch", "pair")
FIRST_PARENTS = ("one", "first", "hardest", "all")
NEGATIVES = ("random", "hardest")
PROXY_MIXED_PER_ANCHOR = 8   # metrix-embed default k with proxy losses (see MetrixEmbedding)


@dataclass
class MixPlan:
    """Which pairs are mixed and which anchor sees which mixed point. T (anchor, pair) tuples,
    U unique ordered pairs.

    anchor: (T,) batch index of the anchor; pair: (T,) index of its mixed point in 0..U-1.
    parents: (U, 2) batch indices (first, second); lam: (U,) lambda, the weight of the first.
    """

    anchor: torch.Tensor
    pair: torch.Tensor
    parents: torch.Tensor
    lam: torch.Tensor

    def __len__(self) -> int:
        return int(self.parents.shape[0])

    def mask(self, num_anchors: int) -> torch.Tensor:
        """(A, U) bool: anchor i may see mixed point u."""
        m = torch.zeros(num_anchors, len(self), dtype=torch.bool, device=self.parents.device)
        m[self.anchor, self.pair] = True
        return m


def mixed_similarities(sim: torch.Tensor, first: torch.Tensor, lam: torch.Tensor | float
                       ) -> torch.Tensor:
    """Dot product of each anchor with ``normalize(lam e_f + (1 - lam) e_g)`` (the cosine
    similarity for the unit-norm embeddings the losses use), for first
    parents ``first`` (A, J) and every second parent g, from the Gram matrix alone.

    sim: (B, B) = E @ E.T of the (A = B) batch embeddings; lam: scalar or (A, J, B). Returns
    (A, J, B)::

        s(a, m) = (lam S[a,f] + (1-lam) S[a,g]) / sqrt(lam^2 S[f,f] + (1-lam)^2 S[g,g] + 2 lam (1-lam) S[f,g])

    which is exact for any (also unnormalised) embeddings and costs O(A J B) instead of the
    O(A J B D) of forming the mixed embeddings and their products.
    """
    diag = sim.diagonal()                                        # (B,) squared norms
    s_af = sim.gather(1, first)[..., None]                       # (A, J, 1)
    s_ag = sim[:, None, :]                                       # (A, 1, B)
    s_fg = sim[first]                                            # (A, J, B)
    mu = 1.0 - lam
    num = lam * s_af + mu * s_ag
    sq = lam * lam * diag[first][..., None] + mu * mu * diag + 2.0 * lam * mu * s_fg
    return num * torch.rsqrt(sq.clamp_min(1e-12))


class MetrixBase(MixingStrategy):
    """Shared machinery of the three Metrix strategies; subclasses set ``level``."""

    needs = frozenset({"soft"})
    level: ClassVar[str] = ""          # "input", "feature" or "embed"

    requires = "a loss on soft labels"

    def __init__(self, loss, alpha: float = 2.0, w: float = 0.4,
                 pairs: str = "pos-neg", lambda_per: str = "batch", first_parents: str = "one",
                 fixed_lambda: float | None = None, mined: bool = False):
        _check_choice("pairs", pairs, PAIRS)
        if not isinstance(mined, bool):
            raise ValueError(f"mined must be true or false, got {mined!r}")
        _check_choice("lambda_per", lambda_per, LAMBDA_PER)
        _check_choice("first_parents", first_parents, FIRST_PARENTS)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (lambda ~ Beta(alpha, alpha)), got {alpha}")
        if not w >= 0:
            raise ValueError(f"w must be >= 0, got {w}")
        if fixed_lambda is not None and not 0.0 <= fixed_lambda <= 1.0:
            raise ValueError(f"fixed_lambda must be in [0, 1] or None, got {fixed_lambda}")
        self.alpha = float(alpha)
        self.w = float(w)
        self.pairs = pairs
        self.lambda_per = lambda_per
        self.first_parents = first_parents
        self.fixed_lambda = fixed_lambda
        self.mined = mined
        self.mixed_per_anchor: int | None = None   # None: every candidate (embedding level)
        self.negatives = "random"
        self.last_plan: MixPlan | None = None      # the plan of the latest recorded step
        super().__init__(loss)

    def check_loss(self, loss) -> None:
        caps = loss_capabilities(loss)
        if "mixing" in caps and not self.needs_model:   # Metrix on another strategy's loss
            inner = loss.loss
            if inner is None or "soft" not in loss_capabilities(inner):
                raise ValueError(f"{self.name} on {loss.name}: the inner strategy must wrap a "
                                 f"loss on soft labels (a Tango loss)")
            return
        if "soft" not in caps:
            hint = ""
            if "references" in caps:
                hint = ("; pytorch-metric-learning losses take hard labels only: use the "
                        "Tango loss of the same name from dml.losses, which takes soft labels")
            raise ValueError(f"{self.name} mixes labels, so it needs a loss that takes soft "
                             f"labels (class memberships); {type(loss).__name__} does not{hint}")

    def _base_loss(self, loss_fn):
        """The loss that scores the mixed points (the inner strategy's loss when composed)."""
        return loss_fn.loss if isinstance(loss_fn, MixingStrategy) else loss_fn

    def extra_repr(self) -> str:
        return (f"loss={self.loss_name}, alpha={self.alpha}, w={self.w}, pairs={self.pairs!r}, "
                f"lambda_per={self.lambda_per!r}, first_parents={self.first_parents!r}, "
                f"mined={self.mined}")

    # ------------------------------------------------------------------ pair construction

    def _mined(self, loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor):
        """The loss miner's (positive, negative) pairs of the clean batch when ``mined``."""
        if not self.mined:
            return None
        loss_fn = self._base_loss(loss_fn)
        kept = loss_fn.mined_pairs(emb.detach(), labels) if hasattr(loss_fn, "mined_pairs") \
            else None
        if kept is None:
            raise ValueError(f"{self.name} with mined=true mixes the pairs the loss's miner "
                             f"keeps, but {type(loss_fn).__name__} has no miner; use "
                             f"multi-similarity with loss.params.epsilon (official: 0.39)")
        return kept

    def _candidates(self, labels: torch.Tensor, sim: torch.Tensor | None,
                    mined: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First parents (A, J), their validity (A, J) and the chosen second parents (A, J, B)
        bool, for the batch's own examples as anchors (A = B). ``mined``: the (positive,
        negative) pairs a loss's miner kept; only those are mixed."""
        b = labels.shape[0]
        dev = labels.device
        ar = torch.arange(b, device=dev)
        eye = ar[:, None] == ar[None, :]
        same = labels[:, None] == labels[None, :]                 # (B, B)
        has_pos = (same & ~eye).any(1, keepdim=True)              # the anchor has a classmate
        pos, neg = (same & ~eye, ~same) if mined is None else mined
        if self.pairs == "pos-neg":
            cand = torch.where(has_pos, pos, eye)                 # fallback: the anchor
        elif self.pairs == "pos-pos":
            cand = pos
        else:
            cand = neg
        # first parents
        if self.first_parents == "one":
            score = torch.rand(b, b).to(dev).masked_fill(~cand, -1.0)
            first = score.argmax(1, keepdim=True)                 # (A, 1)
            first_ok = cand.any(1, keepdim=True)
        elif self.first_parents == "first":                       # official: first in batch order
            first = cand.to(torch.uint8).argmax(1, keepdim=True)
            first_ok = cand.any(1, keepdim=True)
        elif self.first_parents == "hardest":   # official with the MS miner: its first positive
            first = sim.masked_fill(~cand, float("inf")).argmin(1, keepdim=True)   # = least similar
            first_ok = cand.any(1, keepdim=True)
        else:
            j = max(int(cand.sum(1).max()), 1)
            first = cand.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :j]
            first_ok = cand.gather(1, first)
        # second parent candidates given (a, f)
        not_f = ar[None, None, :] != first[..., None]             # (A, J, B)
        if self.pairs == "pos-neg":
            second = neg[:, None, :].expand_as(not_f)
        elif self.pairs == "pos-pos":
            second = pos[:, None, :] & not_f
            second = torch.where(second.any(2, keepdim=True), second, eye[:, None, :])
        else:
            second = neg[:, None, :] & not_f
        second = second & first_ok[..., None]
        k = self.mixed_per_anchor
        if k is not None and k < b:                                # bounded: pick k per slot
            if self.negatives == "hardest":
                score = torch.where(same, -sim, sim)[:, None, :].expand_as(second)
            else:
                score = torch.rand(second.shape).to(dev)
            val, idx = score.masked_fill(~second, float("-inf")).topk(k, dim=2)
            second = torch.zeros_like(second).scatter_(2, idx, torch.isfinite(val))
        return first, first_ok, second

    def _plan(self, first: torch.Tensor, second: torch.Tensor) -> tuple[MixPlan, torch.Tensor]:
        """Unique ordered pairs of the chosen tuples and their lambdas; also the inverse index
        (T,) of every selected (a, j, g) entry, in ``second.nonzero()`` order."""
        b = second.shape[2]
        a_t, j_t, g_t = second.nonzero(as_tuple=True)
        f_t = first[a_t, j_t]
        keys, inv = torch.unique(f_t * b + g_t, return_inverse=True)
        parents = torch.stack([keys // b, keys % b], dim=1)
        lam = self._draw_lambda(len(keys), second.device)
        return MixPlan(a_t, inv, parents, lam), inv

    def _draw_lambda(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) mixing factors: one Beta(alpha, alpha) draw per batch or per pair."""
        if self.fixed_lambda is not None:   # float64: a given lambda is used exactly
            return torch.full((n,), float(self.fixed_lambda), dtype=torch.float64, device=device)
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        lam = beta.sample((1,)).repeat(n) if self.lambda_per == "batch" else beta.sample((n,))
        return lam.to(device=device, dtype=torch.float64)

    @staticmethod
    def _memberships(plan: MixPlan, labels: torch.Tensor, num_classes: int, dtype) -> torch.Tensor:
        """(U, C) lambda * onehot(c_first) + (1 - lambda) * onehot(c_second)."""
        return mixed_membership(labels[plan.parents[:, 0]], labels[plan.parents[:, 1]],
                                plan.lam.to(dtype), num_classes, dtype)

    # ------------------------------------------------------------------ the step

    def _mixed_loss(self, loss_fn: nn.Module, clean: torch.Tensor, labels: torch.Tensor,
                    mixed: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """The loss of the clean anchors against the mixed points built for them (pair
        losses), or of the mixed points against the proxies (proxy losses)."""
        if len(plan) == 0:
            loss_fn.last_terms = {}
            return clean.sum() * 0.0
        if getattr(loss_fn, "uses_proxies", False):
            memb = self._memberships(plan, labels, self._num_classes(loss_fn, labels),
                                     clean.dtype)
            return loss_fn(mixed, memb)
        sim = clean @ mixed.T                                        # (A, U)
        return loss_fn.pair_loss(sim, self._pair_targets(labels, plan, sim.dtype),
                                 plan.mask(clean.shape[0]))

    def _result(self, loss_fn, l_clean, clean_terms, l_mixed, synthetic) -> StepResult:
        loss = l_clean + self.w * l_mixed
        values = {"loss": loss.detach(), "clean": l_clean.detach(), "mixed": l_mixed.detach(),
                  **clean_terms, **loss_terms(loss_fn, "mixed_")}
        return StepResult(loss, values, synthetic)

    @staticmethod
    def _pair_targets(labels: torch.Tensor, plan: MixPlan, dtype) -> torch.Tensor:
        """(A, U) the mixed label of every mixed point relative to every anchor,
        ``lerp([c_a = c_second], [c_a = c_first], lambda)``: the same numbers as
        ``pair_targets(labels, memberships)`` without the (U, C) membership matrix."""
        f, g = plan.parents[:, 0], plan.parents[:, 1]
        y_f = (labels[:, None] == labels[f][None, :]).to(dtype)
        y_g = (labels[:, None] == labels[g][None, :]).to(dtype)
        return torch.lerp(y_g, y_f, plan.lam.to(dtype)[None, :])

    def _num_classes(self, loss_fn: nn.Module, labels: torch.Tensor) -> int:
        n = getattr(loss_fn, "num_classes", None)
        return int(n) if n is not None else (int(labels.max()) + 1 if labels.numel() else 1)


class _StagedMetrix(MetrixBase):
    """Mixing of a staged representation (stage 0 = the images), then through the network."""

    def _stage(self, model: nn.Module) -> int:
        return 0

    needs_model = True

    def _step(self, loss_fn, model, images, labels, record: bool = True) -> StepResult:
        stage = self._stage(model)
        h = images if stage == 0 else model.forward_to(images, stage)
        clean = model(images) if stage == 0 else model.forward_from(h, stage)
        l_clean = loss_fn(clean, labels)
        clean_terms = loss_terms(loss_fn, "clean_")

        hardest = self.negatives == "hardest" and self.mixed_per_anchor < len(labels)
        with torch.no_grad():
            sim = clean @ clean.T if hardest or self.first_parents == "hardest" else None
            first, _, second = self._candidates(labels, sim, self._mined(loss_fn, clean, labels))
            plan, _ = self._plan(first, second)
        f, g = plan.parents[:, 0], plan.parents[:, 1]
        lam = plan.lam.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        if len(plan):
            mixed_h = torch.lerp(h[g], h[f], lam)                  # lam * h[f] + (1-lam) * h[g]
            mixed = model(mixed_h) if stage == 0 else model.forward_from(mixed_h, stage)
        else:
            mixed_h = h[:0]
            mixed = clean[:0]
        l_mixed = self._mixed_loss(loss_fn, clean, labels, mixed, plan)
        synthetic = None
        if record:
            self.last_plan = plan
            memb = self._memberships(plan, labels, self._num_classes(loss_fn, labels),
                                     clean.dtype)
            synthetic = SyntheticPoints(
                mixed.detach(), memb, plan.parents, plan.lam.to(clean.dtype), self.name,
                hardest=torch.full((len(plan),), hardest, dtype=torch.bool,
                                   device=plan.parents.device),
                images=mixed_h.detach() if stage == 0 else None)
        return self._result(loss_fn, l_clean, clean_terms, l_mixed, synthetic)


@register_mixing
class MetrixInput(_StagedMetrix):
    """Metrix at the input: mix images, embed them (one extra forward per mixed image).

    Parameters: alpha (lambda ~ Beta(alpha, alpha)), w (E = l_clean + w l_mixed), pairs
    ("pos-neg", "pos-pos", "neg-neg"), lambda_per ("batch" or "pair"), first_parents ("one",
    "first", "hardest" or "all"), mixed_per_anchor (k second parents per first parent), negatives ("random"
    or "hardest"), fixed_lambda (use this lambda instead of drawing one; for analysis and
    tests), mined (mix only the pairs the loss's miner keeps).
    At most ``B * k`` mixed images per step (``B * k * (K - 1)`` with first_parents="all" and
    K images per class, ``B * k * (B - K)`` for "all" with neg-neg), fewer when anchors share
    a pair.
    """

    name = "metrix-input"
    level = "input"

    def __init__(self, loss, alpha: float = 2.0, w: float = 0.4,
                 pairs: str = "pos-neg", lambda_per: str = "batch", first_parents: str = "one",
                 mixed_per_anchor: int = 1, negatives: str = "random",
                 fixed_lambda: float | None = None, mined: bool = False):
        super().__init__(loss, alpha, w, pairs, lambda_per, first_parents, fixed_lambda,
                         mined)
        _check_choice("negatives", negatives, NEGATIVES)
        if int(mixed_per_anchor) != mixed_per_anchor or mixed_per_anchor < 1:
            raise ValueError(f"mixed_per_anchor must be an integer >= 1, got {mixed_per_anchor}")
        self.mixed_per_anchor = int(mixed_per_anchor)
        self.negatives = negatives

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", mixed_per_anchor={self.mixed_per_anchor}, "
                f"negatives={self.negatives!r}")


@register_mixing
class MetrixFeature(MetrixInput):
    """Metrix on a feature map: ``h = model.forward_to(x, stage)``, mix ``h``, finish with
    ``model.forward_from``; the clean pass reuses ``h``. ``stage=None`` is the last feature map
    before pooling (``model.num_stages``), ``stage=0`` the input (= ``metrix-input``). Other
    parameters as ``metrix-input``."""

    name = "metrix-feature"
    level = "feature"

    def __init__(self, loss, alpha: float = 2.0, w: float = 0.4,
                 pairs: str = "pos-neg", lambda_per: str = "batch", first_parents: str = "one",
                 mixed_per_anchor: int = 1, negatives: str = "random",
                 stage: int | None = None, fixed_lambda: float | None = None,
                 mined: bool = False):
        super().__init__(loss, alpha, w, pairs, lambda_per, first_parents,
                         mixed_per_anchor, negatives, fixed_lambda, mined)
        if stage is not None and (int(stage) != stage or stage < 0):
            raise ValueError(f"stage must be None or an integer >= 0, got {stage}")
        self.stage = None if stage is None else int(stage)

    def _stage(self, model: nn.Module) -> int:
        if not hasattr(model, "forward_to") or not hasattr(model, "num_stages"):
            raise TypeError("metrix-feature needs a staged model (forward_to / forward_from / "
                            f"num_stages, dml.models.EmbeddingNet), got {type(model).__name__}")
        stage = model.num_stages if self.stage is None else self.stage
        if not 0 <= stage <= model.num_stages:
            raise ValueError(f"metrix-feature stage must be in 0..{model.num_stages} "
                             f"(0 = input, {model.num_stages} = last feature map), got {stage}")
        return stage

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stage={self.stage}"


@register_mixing
class MetrixEmbedding(MetrixBase):
    """Metrix on the embeddings: mix L2-normalised embeddings and re-normalise; no extra forward.

    Per anchor: its first parent(s) (one random positive by default) with every second-parent
    candidate (all its negatives for pos-neg), as the official code. ``mixed_per_anchor=None``
    means exactly that with pair losses, whose mixed loss is computed on the compact similarity
    layout at O(B^2) cost. A proxy loss needs the similarity of every mixed point to every
    proxy (U x C, with U ~ B^2 for all negatives: 1.5 M entries for 128 Omniglot images, 1e8
    for SOP's 11k classes), so with proxy losses ``None`` means ``PROXY_MIXED_PER_ANCHOR`` (8)
    second parents per first parent, chosen as ``negatives`` says. Other parameters as
    ``metrix-input``.
    """

    name = "metrix-embed"
    level = "embed"

    def __init__(self, loss, alpha: float = 2.0, w: float = 0.4,
                 pairs: str = "pos-neg", lambda_per: str = "batch", first_parents: str = "one",
                 mixed_per_anchor: int | None = None, negatives: str = "random",
                 fixed_lambda: float | None = None, mined: bool = False):
        super().__init__(loss, alpha, w, pairs, lambda_per, first_parents, fixed_lambda,
                         mined)
        _check_choice("negatives", negatives, NEGATIVES)
        if mixed_per_anchor is not None and (int(mixed_per_anchor) != mixed_per_anchor
                                             or mixed_per_anchor < 1):
            raise ValueError(f"mixed_per_anchor must be None or an integer >= 1, "
                             f"got {mixed_per_anchor}")
        from dml.losses import LOSSES

        base = (LOSSES.get(loss) if isinstance(loss, str)
                else self._base_loss(loss))
        if mixed_per_anchor is None and getattr(base, "uses_proxies", False):
            mixed_per_anchor = PROXY_MIXED_PER_ANCHOR
        self.mixed_per_anchor = None if mixed_per_anchor is None else int(mixed_per_anchor)
        self.negatives = negatives

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", mixed_per_anchor={self.mixed_per_anchor}, "
                f"negatives={self.negatives!r}")

    def clean_loss(self, loss_fn, emb: torch.Tensor, labels: torch.Tensor,
                   record: bool = True) -> StepResult:
        """The l_clean term of E = l_clean + w l_mixed: the plain loss, or the inner strategy's
        loss when this wraps one (Metrix on top of Embedding Expansion). Terms prefixed
        ``clean_``."""
        if isinstance(loss_fn, MixingStrategy):
            inner = loss_fn.embedding_loss(None, emb, labels, record)
            return StepResult(inner.loss, {f"clean_{k}": v for k, v in inner.values.items()
                                           if k != "loss"}, inner.synthetic)
        loss = loss_fn(emb, labels)
        return StepResult(loss, loss_terms(loss_fn, "clean_"))

    def _step(self, loss_fn, emb, labels, record: bool = True) -> StepResult:
        clean = self.clean_loss(loss_fn, emb, labels, record)         # emb: (B, D)
        l_clean, clean_terms = clean.loss, clean.values
        loss_fn = self._base_loss(loss_fn)

        k = self.mixed_per_anchor
        hardest = self.negatives == "hardest" and k is not None and k < len(labels)
        with torch.no_grad():
            sim = emb @ emb.T if hardest or self.first_parents == "hardest" else None
            first, _, second = self._candidates(labels, sim,       # (A, J), (A, J, B)
                                                self._mined(loss_fn, emb, labels))
        one_lambda = self.lambda_per == "batch" or self.fixed_lambda is not None
        proxies = getattr(loss_fn, "uses_proxies", False)
        if not record and one_lambda and not proxies:
            # the lean path of training: no unique pairs, no memberships, no mixed vectors
            lam = self._draw_lambda(1, emb.device)[0]
            l_mixed = self._compact_pair_loss(loss_fn, emb, labels, first, second, lam)
            return self._result(loss_fn, l_clean, clean_terms, l_mixed, None)

        with torch.no_grad():
            plan, inv = self._plan(first, second)
        f, g = plan.parents[:, 0], plan.parents[:, 1]
        lam_u = plan.lam.to(emb.dtype)[:, None]

        def mix(e: torch.Tensor) -> torch.Tensor:                   # (U, D), re-normalised
            return F.normalize(torch.lerp(e.index_select(0, g), e.index_select(0, f), lam_u),
                               dim=1)

        if proxies or len(plan) == 0:
            mixed = mix(emb)
            l_mixed = self._mixed_loss(loss_fn, emb, labels, mixed, plan)
            mixed = mixed.detach()
        else:
            if one_lambda:
                lam: torch.Tensor = plan.lam[0]
            else:
                lam = torch.zeros(second.shape, dtype=emb.dtype, device=emb.device)
                lam[second] = plan.lam.to(emb.dtype)[inv]
            l_mixed = self._compact_pair_loss(loss_fn, emb, labels, first, second, lam)
            mixed = None
        synthetic = None
        if record:
            self.last_plan = plan
            if mixed is None:
                with torch.no_grad():
                    mixed = mix(emb)
            memb = self._memberships(plan, labels, self._num_classes(loss_fn, labels), emb.dtype)
            synthetic = SyntheticPoints(
                mixed, memb, plan.parents, plan.lam.to(emb.dtype), self.name,
                hardest=torch.full((len(plan),), hardest, dtype=torch.bool,
                                   device=plan.parents.device))
            if clean.synthetic is not None:
                synthetic = SyntheticPoints.concat([clean.synthetic, synthetic])
        return self._result(loss_fn, l_clean, clean_terms, l_mixed, synthetic)

    def _compact_pair_loss(self, loss_fn, emb, labels, first, second, lam):
        """The pair loss of every anchor against its mixed points, on an (A, J*B) layout:
        entry (a, j, g) is the mix of first parent ``first[a, j]`` and second parent g, valid
        where ``second``, with mixing factor ``lam`` (0-d: one per batch, or (A, J, B)).
        Equal to ``loss_fn(emb, labels, mixed, memberships, plan.mask(A))``."""
        a, j, b = second.shape
        sim = emb @ emb.T                                            # (B, B)
        s_mix = mixed_similarities(sim, first, lam)                  # (A, J, B)
        same = (labels[:, None] == labels[None, :]).to(emb.dtype)   # (A, B)
        y = lam * same.gather(1, first)[..., None] + (1.0 - lam) * same[:, None, :]
        y = torch.as_tensor(y).expand(a, j, b)
        return loss_fn.pair_loss(s_mix.reshape(a, j * b), y.reshape(a, j * b),
                                 second.reshape(a, j * b))


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


MetrixEmbed = MetrixEmbedding   # the earlier name

__all__ = [
    "MetrixBase",
    "MetrixEmbed",
    "MetrixEmbedding",
    "MetrixFeature",
    "MetrixInput",
    "MixPlan",
    "mixed_similarities",
]
