"""Tango against the official computations of the papers (docs/METHODS.md, "Official code").

The references are ``tests/oracles.py``: loop-based transcriptions of the official code, written
from the official repositories without reading ``dml/``. Each test runs Tango's vectorised code
in the setting that reproduces an official one and compares values and gradients in float64.
Where Tango deliberately differs (a reduction, a fixed official bug), the test says so and checks
the stated relation instead of equality.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dml.losses import ContrastiveLoss, MultiSimilarityLoss, build_loss
from dml.mixing import build_mixing
from tests.oracles import (
    official_contrastive,
    official_hphn_triplet,
    official_metrix_embed_contrastive,
    official_metrix_embed_multisimilarity,
    official_multisimilarity,
    official_proxy_synthesis,
    official_symm_npair,
)

DTYPE = torch.float64
OFFICIAL_MS = dict(alpha=17.97, beta=75.66, base=0.77)   # Metrix main.py


class Unit(torch.nn.Module):
    """'Images' are the embeddings: the model only L2-normalises."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def clustered(p, k, d=16, seed=0, spread=0.9, grouped=True):
    """P x K unit embeddings around class centres; grouped by class (official samplers) or not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)
    if not grouped:
        labels = labels[torch.randperm(p * k, generator=g)]
    x = torch.randn(p, d, generator=g, dtype=DTYPE)[labels]
    x = x + spread * torch.randn(p * k, d, generator=g, dtype=DTYPE)
    return F.normalize(x, dim=1), labels


def grads(value, x):
    return torch.autograd.grad(value, x)[0]


# --------------------------------------------------------------------------- Metrix: contrastive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_equals_the_official_distance_form(seed):
    e, y = clustered(5, 4, seed=seed, grouped=False)
    x1, x2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    ours = ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance="euclidean")(Unit()(x1), y)
    theirs = official_contrastive(Unit()(x2), y, 0.0, 0.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    torch.testing.assert_close(grads(ours, x1), grads(theirs, x2), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.83])
@pytest.mark.parametrize("seed", [0, 3])
def test_metrix_embed_contrastive_equals_the_official_mixing(lam, seed):
    # Official embed_metrix_contrastive (layer_mix == 0): each anchor's FIRST positive mixed with
    # every negative, pos loss lam [d]_+, neg loss (1 - lam) [0.5 - d]_+, each averaged over its
    # non-zero pairs; total clean + 0.4 mixed. Tango: metrix-embed, first_parents="first",
    # contrastive in the distance form. Deliberate difference: the official tuple list repeats an
    # anchor's tuples once per positive pair; Tango forms each (anchor, mixed point) once. In a
    # P x K batch every anchor has K - 1 positives, so the averages are the same.
    e, y = clustered(4, 3, seed=seed, grouped=False)
    x1, x2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    loss_fn = build_loss("contrastive", pos_margin=0.0, neg_margin=0.5, distance="euclidean")
    strat = build_mixing("metrix-embed", "contrastive", first_parents="first", fixed_lambda=lam)
    res = strat.step(Unit(), loss_fn, x1, y)
    clean, mixed = official_metrix_embed_contrastive(Unit()(x2), y, lam)
    assert res.terms["clean"] == pytest.approx(clean.item(), rel=1e-10)
    assert res.terms["mixed"] == pytest.approx(mixed.item(), rel=1e-10)
    torch.testing.assert_close(grads(res.loss, x1), grads(clean + 0.4 * mixed, x2),
                               rtol=1e-8, atol=1e-10)


def test_metrix_contrastive_mixed_loss_moves_with_lambda_as_the_official_one():
    # The defect this guards: a normaliser sum(y [h > 0]) cancelled lambda, so the mixed loss
    # of a batch was the same for every lambda. Official and Tango both move with lambda.
    e, y = clustered(4, 3, seed=5, grouped=False)
    loss_fn = build_loss("contrastive", pos_margin=0.0, neg_margin=0.5, distance="euclidean")
    ours, theirs = [], []
    for lam in (0.05, 0.5, 0.95):
        strat = build_mixing("metrix-embed", "contrastive", first_parents="first",
                             fixed_lambda=lam)
        ours.append(strat.step(Unit(), loss_fn, e, y).terms["mixed"])
        theirs.append(official_metrix_embed_contrastive(e, y, lam)[1].item())
    assert ours == pytest.approx(theirs, rel=1e-10)
    assert max(ours) - min(ours) > 0.1


# --------------------------------------------------------------------------- Metrix: MS


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_similarity_with_miner_equals_the_official_baseline(seed):
    e, y = clustered(6, 4, seed=seed, grouped=False)
    x1, x2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    ours = MultiSimilarityLoss(**OFFICIAL_MS, epsilon=0.39)(Unit()(x1), y)
    theirs = official_multisimilarity(Unit()(x2), y, epsilon=0.39, **OFFICIAL_MS)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    torch.testing.assert_close(grads(ours, x1), grads(theirs, x2), rtol=1e-8, atol=1e-12)


def test_metrix_embed_multi_similarity_states_its_differences_from_the_official_code():
    # Tango deliberately does not repeat three defects of the official embed_metrix_multi-
    # similarity (docs/METHODS.md section 2): it writes the mixed negative mask into the clean
    # mask (the mixed negative term is always 0), scales the clean sums by lambda, and puts the
    # 0.4 inside the log. Tango computes E = l_clean + w l_mixed with the generic soft-label
    # loss, on the same pairs: the miner's (pml MultiSimilarityMiner) first, i.e. least similar,
    # positive of each anchor mixed with each of its mined negatives. Checked: (1) Tango's clean
    # term is the official baseline with miner; (2) at lambda = 1 the mixed points are copies of
    # the first positives (label 1) and at lambda = 0 of the mined negatives (label 0), where the
    # mixed term is worked out below from pml's mined pairs; (3) the official value differs.
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    e, y = clustered(6, 4, seed=2, grouped=False)
    a1, p, a2, n = MultiSimilarityMiner(epsilon=0.39)(e, y)
    al, be, b = OFFICIAL_MS["alpha"], OFFICIAL_MS["beta"], OFFICIAL_MS["base"]
    s = e @ e.T
    pos_terms, neg_terms = [], []
    for i in range(len(y)):
        mp, mn = p[a1 == i].tolist(), n[a2 == i].tolist()
        if not mp or not mn:                     # no positive or no negative: nothing mixed
            continue
        first = mp[0]                            # pml's order: the least similar positive
        pos_terms.append(math.log(1 + len(mn) * math.exp(-al * (s[i, first] - b))) / al)
        neg_terms.append(math.log(1 + sum(math.exp(be * (s[i, j] - b)) for j in mn)) / be)
    assert 0 < len(pos_terms) < len(y)
    loss_fn = MultiSimilarityLoss(**OFFICIAL_MS, epsilon=0.39)
    for lam, want in ((1.0, sum(pos_terms) / len(pos_terms)),
                      (0.0, sum(neg_terms) / len(neg_terms))):
        strat = build_mixing("metrix-embed", "multi-similarity", first_parents="hardest",
                             mined=True, fixed_lambda=lam)
        res = strat.step(Unit(), loss_fn, e, y)
        assert res.terms["mixed"] == pytest.approx(want, rel=1e-9)
    lam = 0.6
    strat = build_mixing("metrix-embed", "multi-similarity", first_parents="hardest", mined=True,
                         fixed_lambda=lam)
    res = strat.step(Unit(), loss_fn, e, y)
    baseline = official_multisimilarity(e, y, epsilon=0.39, **OFFICIAL_MS)
    assert res.terms["clean"] == pytest.approx(baseline.item(), rel=1e-10)
    assert res.terms["mixed_neg"] > 0
    official = official_metrix_embed_multisimilarity(e, y, epsilon=0.39, lam=lam, **OFFICIAL_MS)
    assert abs(official.item() - res.terms["loss"]) > 1e-3


# --------------------------------------------------------------------------- Embedding Expansion


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_hphn_triplet_with_expansion_equals_the_official_loss(n, seed):
    # Official HPHNTripletLoss (euclidean distance, consecutive pairs (0,1), (2,3), ... of
    # class-grouped batches, hardest positive among originals, per-anchor reshape-min over the
    # anchor and its segment's points). Tango: embedding-expansion, pairing="consecutive",
    # negatives="anchor", triplet in the distance form. Deliberate difference: the official
    # gluon loss is the per-anchor vector, back-propagated as its sum; Tango averages over the
    # anchors with a non-zero loss (pml's AvgNonZeroReducer). So Tango x (#non-zero) = sum.
    e, y = clustered(6, 4, seed=seed, spread=1.2)          # grouped, K = 4 even (official)
    margin = 0.3
    theirs = official_hphn_triplet(e, y, n_inner_pts=n, margin=margin)
    loss_fn = build_loss("triplet", margin=margin, distance="euclidean")
    if n == 0:
        ours = loss_fn(e, y)
    else:
        strat = build_mixing("embedding-expansion", "triplet", n=n, pairing="consecutive",
                             negatives="anchor")
        ours = strat.embedding_loss(loss_fn, e, y).loss
    active = int((theirs > 0).sum())
    assert active > 0
    assert ours.item() * active == pytest.approx(theirs.sum().item(), rel=1e-8)


def test_hphn_triplet_gradient_equals_the_official_one_without_tied_copies():
    # Gradients: with n = 0 there are no synthetic points and the gradients agree exactly.
    # With n >= 1 the official point set holds every synthetic point twice (inner point k of
    # x_i and inner point n + 1 - k of its partner are the same vector) and MXNet's min gives
    # the full gradient to both copies, doubling the push on a synthetic hardest negative;
    # Tango forms each point once. docs/METHODS.md states this difference.
    e, y = clustered(6, 4, seed=4, spread=1.2)
    x1, x2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    theirs = official_hphn_triplet(Unit()(x2), y, n_inner_pts=0, margin=0.3)
    ours = build_loss("triplet", margin=0.3, distance="euclidean")(Unit()(x1), y)
    active = int((theirs > 0).sum())
    torch.testing.assert_close(grads(ours, x1) * active, grads(theirs.sum(), x2),
                               rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- Symmetrical Synthesis


def test_symmetrical_synthesis_against_the_official_npair_logits():
    # Official symm_npair_loss: one (anchor, positive) pair per class; logit (i, j) = max over
    # six fixed combinations (A_i P_j, A_i S1_j, A_i S2_j, P_i S1_j, P_i S2_j, S1_i S2_j).
    # Tango (pairing="consecutive" on a P x 2 batch, n-pair loss): the positive logit is A_i.P_i,
    # as the official one for unit vectors at an angle below 90 degrees (the official diagonal
    # is max(A.P, cos 2t, cos 3t), which exceeds A.P beyond that); the negative logit of anchor A_i for class j is the per-anchor
    # maximum over {A_i, S1_i, S2_i} x {A_j, P_j, S1_j, S2_j}. It contains four of the official
    # combinations but not the two with the positive P_i on the anchor side, so
    #     official(i, j) <= max(Tango(i, j), P_i.S1_j, P_i.S2_j)      and
    #     Tango(i, j) >= max(A_i.P_j, A_i.S1_j, A_i.S2_j, S1_i.S2_j),
    # and the two agree where the official maximum is not attained on the P_i side.
    p = 6
    e, y = clustered(p, 2, seed=3, spread=1.0)
    anchor, pos = e[0::2], e[1::2]
    _, logits = official_symm_npair(anchor, pos, y[0::2])
    torch.testing.assert_close(logits.diagonal(), (anchor * pos).sum(1))
    seen = {}

    class Capture(torch.nn.Module):
        def pair_loss(self, sim, yy, valid):
            seen.update(sim=sim.detach(), y=yy, valid=valid)
            return sim.sum() * 0

    strat = build_mixing("symmetrical-synthesis", "n-pair", pairing="consecutive")
    strat.embedding_loss(Capture(), e, y)
    sim, valid = seen["sim"], seen["valid"]
    b = 2 * p
    s1 = torch.stack([2 * (pp @ a) * a - pp for a, pp in zip(anchor, pos)])   # P about A
    s2 = torch.stack([2 * (a @ pp) * pp - a for a, pp in zip(anchor, pos)])   # A about P
    agree = 0
    for i in range(p):
        assert sim[2 * i, 2 * i + 1].item() == pytest.approx(logits[i, i].item(), abs=1e-12)
        for j in range(p):
            if j == i:
                continue
            ours = sim[2 * i, b + j].item()
            assert bool(valid[2 * i, b + j])
            p_side = max((pos[i] @ s1[j]).item(), (pos[i] @ s2[j]).item())
            common = max((anchor[i] @ pos[j]).item(), (anchor[i] @ s1[j]).item(),
                         (anchor[i] @ s2[j]).item(), (s1[i] @ s2[j]).item())
            own = (anchor[i], s1[i], s2[i])                   # the anchor and its reflections
            other = (anchor[j], pos[j], s1[j], s2[j])         # every point of class j
            assert ours == pytest.approx(max((u @ v).item() for u in own for v in other),
                                         abs=1e-12)
            assert logits[i, j].item() <= max(ours, p_side) + 1e-12
            assert ours >= common - 1e-12
            if logits[i, j].item() > p_side and abs(ours - common) < 1e-12:
                assert ours == pytest.approx(logits[i, j].item(), abs=1e-12)
                agree += 1
    assert agree > 0


# --------------------------------------------------------------------------- Proxy Synthesis


@pytest.mark.parametrize("loss", ["normalized-softmax", "proxy-nca++"])
@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_proxy_synthesis_one_image_per_class_equals_the_official_loss(loss, mu):
    # Official proxy_synthesis + Norm_SoftMax (scale 23) / Proxy_NCA: one image per class, each
    # sample mixed with the previous one (torch.roll), one synthetic class each, the first
    # int(B mu) kept. Tango with data.samples_per_class=1 is the same computation: normalised
    # softmax with temperature 1/23; ProxyNCA++ logits -||x - p||^2 / T with T = 1/scale.
    c, b, d, scale, lam = 12, 8, 16, 23.0, 0.3
    g = torch.Generator().manual_seed(0)
    labels = torch.randperm(c, generator=g)[:b]              # distinct classes, random order
    e = F.normalize(torch.randn(b, d, generator=g, dtype=DTYPE), dim=1)
    name = {"normalized-softmax": "norm_softmax", "proxy-nca++": "proxy_nca"}[loss]
    loss_fn = build_loss(loss, num_classes=c, embedding_dim=d, temperature=1 / scale).double()
    raw = loss_fn.proxies.detach().clone()
    x1, x2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    p2 = raw.clone().requires_grad_()
    res = build_mixing("proxy-synthesis", loss, mu=mu, fixed_lambda=lam).step(
        Unit(), loss_fn, x1, labels)
    theirs = official_proxy_synthesis(Unit()(x2), labels, p2, lam, mu, loss=name, scale=scale)
    assert res.loss.item() == pytest.approx(theirs.item(), rel=1e-10)
    res.loss.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(loss_fn.proxies.grad, p2.grad, rtol=1e-8, atol=1e-12)
    assert len(res.synthetic) == int(b * mu)
    assert math.isfinite(res.terms["lambda"])
