"""Tests for dml.losses against independent truth: pytorch-metric-learning on hard labels,
brute-force loops of the documented (soft) formulas, and hand-worked numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from dml.losses import (
    LOSSES,
    ContrastiveLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    NPairLoss,
    PairLoss,
    ProxyAnchorLoss,
    ProxyLoss,
    ProxyNCAPlusPlusLoss,
    TripletLoss,
    as_membership,
    build_loss,
    loss_defaults,
    list_losses,
    pair_targets,
)

DTYPE = torch.float64
C, D = 8, 16
SEEDS = [0, 1, 2]


def make_batch(seed, num_classes=C, per_class=6, dim=D, dtype=DTYPE, spread=0.8):
    """Clustered random unit embeddings (so that similarities cover a wide range), shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g, dtype=dtype)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=dtype)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm]


def build(name, **kw):
    return build_loss(name, C, D, **kw).to(DTYPE)


def all_losses():
    return [build(n) for n in list_losses()] + [
        build("triplet", mining="all"),
        build("contrastive", distance="euclidean", pos_margin=0.0, neg_margin=0.5),
        build("triplet", distance="euclidean", margin=0.2)]


def loss_ids():
    return list_losses() + ["triplet-all", "contrastive-euclidean", "triplet-euclidean"]


# ------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------


def test_as_membership_hard_and_soft():
    m = as_membership(torch.tensor([2, 0]), 3)
    assert torch.equal(m, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    soft = torch.tensor([[0.3, 0.7, 0.0]])
    assert as_membership(soft, 3) is soft
    with pytest.raises(ValueError):
        as_membership(soft, 4)


def test_pair_targets_hard():
    y = pair_targets(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2, 1]))
    assert torch.equal(y, torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]]))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75, 1.0])
def test_pair_targets_of_lambda_mix_is_lambda(lam):
    # reference = lam * class 1 + (1 - lam) * class 4; anchors of class 1, 4 and 2
    one_hot = F.one_hot(torch.tensor([1, 4]), 6).double()
    ref = lam * one_hot[:1] + (1 - lam) * one_hot[1:]
    anchors = torch.tensor([1, 4, 2])
    y = pair_targets(anchors, ref)
    assert y.shape == (3, 1)
    assert torch.allclose(y[:, 0], torch.tensor([lam, 1 - lam, 0.0], dtype=y.dtype))
    # symmetric: soft anchors against hard references
    expected = torch.tensor([lam, 1 - lam, 0.0], dtype=y.dtype)
    assert torch.allclose(pair_targets(ref, anchors)[0], expected)


def test_pair_targets_soft_one_hot_equals_hard():
    la, lr = torch.randint(0, 5, (7,)), torch.randint(0, 5, (9,))
    hard = pair_targets(la, lr)
    assert torch.equal(pair_targets(F.one_hot(la, 5).float(), lr), hard)
    assert torch.equal(pair_targets(F.one_hot(la, 5).float(), F.one_hot(lr, 5).float()), hard)


# ------------------------------------------------------------------------------------------
# agreement with pytorch-metric-learning on hard labels
# ------------------------------------------------------------------------------------------


def _pml():
    return pytest.importorskip("pytorch_metric_learning")


def _pml_loss_and_ours(name):
    """(our loss, function(emb, labels) -> pml loss value) for the same hyperparameters."""
    _pml()
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import miners as M
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.reducers import MeanReducer
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    if name == "contrastive":
        ours = ContrastiveLoss(pos_margin=1.0, neg_margin=0.5)
        theirs = L.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity())
        return ours, lambda e, y: theirs(e, y), None
    if name == "contrastive-euclidean":
        # the official Metrix contrastive: pml LpDistance, pos_margin 0, neg_margin 0.5
        ours = ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance="euclidean")
        return ours, L.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance=LpDistance()), None
    if name == "multi-similarity":
        return MultiSimilarityLoss(), L.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), None
    if name == "multi-similarity-mined":
        # pml's MultiSimilarityMiner picks the pairs; the mean is over every anchor (the official
        # Metrix baseline's torch.mean, = pml MeanReducer; pml's default AvgNonZeroReducer would
        # skip anchors that kept no pair)
        miner = M.MultiSimilarityMiner(epsilon=0.1)
        ms = L.MultiSimilarityLoss(alpha=2, beta=50, base=0.5, reducer=MeanReducer())
        return MultiSimilarityLoss(epsilon=0.1), lambda e, y: ms(e, y, miner(e, y)), None
    if name == "triplet-all":
        # pml TripletMarginLoss(triplets_per_anchor="all") with its default AvgNonZeroReducer:
        # mean over the triplets whose loss is > 0.
        theirs = L.TripletMarginLoss(margin=0.1, distance=CosineSimilarity(), triplets_per_anchor="all")
        return TripletLoss(margin=0.1, mining="all"), theirs, None
    if name == "triplet-euclidean":
        # the official HPHN triplet's distance: euclidean on unit vectors, batch-hard
        miner = M.BatchHardMiner(distance=LpDistance())
        tl = L.TripletMarginLoss(margin=0.2, distance=LpDistance())
        ours = TripletLoss(margin=0.2, mining="batch-hard", distance="euclidean")
        return ours, lambda e, y: tl(e, y, miner(e, y)), None
    if name == "triplet":
        miner = M.BatchHardMiner(distance=CosineSimilarity())
        tl = L.TripletMarginLoss(margin=0.1, distance=CosineSimilarity())
        return TripletLoss(margin=0.1, mining="batch-hard"), lambda e, y: tl(e, y, miner(e, y)), None
    if name == "lifted-structure":
        # we implement the anchor-wise ("generalized") lifted structure loss
        theirs = L.GeneralizedLiftedStructureLoss(
            pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity()
        )
        return LiftedStructureLoss(pos_margin=1.0, neg_margin=0.5), theirs, None
    if name == "n-pair":
        # pml picks one (anchor, positive) pair per class; we reproduce that selection with a mask:
        # each selected anchor sees only the selected positives of all classes.
        def mask_fn(labels):
            a, p = lmu.convert_to_pos_pairs_with_unique_labels(None, labels)
            mask = torch.zeros(len(labels), len(labels), dtype=torch.bool)
            mask[a[:, None], p[None, :]] = True
            return mask

        return NPairLoss(), L.NPairsLoss(), mask_fn
    if name == "proxy-anchor":
        ours = ProxyAnchorLoss(C, D, alpha=32, margin=0.1).to(DTYPE)
        theirs = L.ProxyAnchorLoss(C, D, margin=0.1, alpha=32).to(DTYPE)
        theirs.proxies = ours.proxies  # share the very same parameter
        return ours, theirs, None
    if name == "normalized-softmax":
        ours = NormalizedSoftmaxLoss(C, D, temperature=0.05).to(DTYPE)
        theirs = L.NormalizedSoftmaxLoss(C, D, temperature=0.05).to(DTYPE)
        theirs.W.data.copy_(ours.proxies.data.T)
        return ours, theirs, None
    if name == "proxy-nca++":
        # ProxyNCA++ is not in pml, but pml ProxyNCALoss (squared L2 distance on unit vectors,
        # softmax over *all* proxies) with softmax_scale = 1/T is exactly its formula.
        ours = ProxyNCAPlusPlusLoss(C, D, temperature=1 / 9).to(DTYPE)
        theirs = L.ProxyNCALoss(C, D, softmax_scale=9.0).to(DTYPE)
        theirs.proxies.data.copy_(ours.proxies.data)
        return ours, theirs, None
    raise KeyError(name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", loss_ids() + ["multi-similarity-mined"])
def test_matches_pml_on_hard_labels(name, seed):
    ours, theirs, mask_fn = _pml_loss_and_ours(name)
    per_class = 4 + seed * 2  # 32, 48, 64 samples
    x, labels = make_batch(seed, per_class=per_class)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    e1 = F.normalize(x1, dim=1)
    if mask_fn is None:
        v1 = ours(e1, labels)
    else:
        v1 = ours(e1, labels, mask=mask_fn(labels))
    v2 = theirs(F.normalize(x2, dim=1), labels)
    assert v2.item() > 0
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6, abs=1e-8)
    g1, g2 = torch.autograd.grad(v1, x1)[0], torch.autograd.grad(v2, x2)[0]
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.39])
def test_multi_similarity_miner_keeps_pml_pairs(seed, epsilon):
    _pml()
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    x, labels = make_batch(seed, per_class=5)
    e = F.normalize(x, dim=1)
    keep_pos, keep_neg = MultiSimilarityLoss(epsilon=epsilon).mined_pairs(e, labels)
    a1, p, a2, n = MultiSimilarityMiner(epsilon=epsilon)(e, labels)
    assert set(zip(*torch.nonzero(keep_pos).T.tolist())) == set(zip(a1.tolist(), p.tolist()))
    assert set(zip(*torch.nonzero(keep_neg).T.tolist())) == set(zip(a2.tolist(), n.tolist()))
    assert 0 < len(a2) < int((labels[:, None] != labels[None, :]).sum())   # mining did prune
    assert MultiSimilarityLoss().mined_pairs(e, labels) is None           # no miner by default


def test_multi_similarity_miner_applies_to_the_clean_batch_only():
    x, labels = make_batch(1, per_class=4)
    e = F.normalize(x, dim=1)
    mined, plain = MultiSimilarityLoss(epsilon=0.1), MultiSimilarityLoss()
    assert mined(e, labels).item() != pytest.approx(plain(e, labels).item())
    refs, ref_labels = e.flip(0), labels.flip(0)          # extra references: never mined
    assert mined(e, labels, refs, ref_labels).item() == pytest.approx(
        plain(e, labels, refs, ref_labels).item(), rel=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        MultiSimilarityLoss(epsilon=-1)


def test_matches_pml_in_float32():
    _pml()
    from pytorch_metric_learning import losses as L

    x, labels = make_batch(5, per_class=8, dtype=torch.float32)
    e = F.normalize(x, dim=1)
    assert MultiSimilarityLoss()(e, labels).item() == pytest.approx(
        L.MultiSimilarityLoss()(e, labels).item(), rel=1e-5
    )
    ours = ProxyAnchorLoss(C, D)
    theirs = L.ProxyAnchorLoss(C, D)
    theirs.proxies = ours.proxies
    assert ours(e, labels).item() == pytest.approx(theirs(e, labels).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------
# soft labels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx", range(len(loss_ids())), ids=loss_ids())
def test_one_hot_soft_labels_reproduce_hard(idx):
    loss = all_losses()[idx]
    x, labels = make_batch(3, per_class=5)
    e = F.normalize(x, dim=1)
    soft = F.one_hot(labels, C).to(DTYPE)
    hard_value = loss(e, labels)
    assert torch.allclose(loss(e, soft), hard_value, rtol=1e-12, atol=1e-12)
    if isinstance(loss, PairLoss):  # soft references, hard anchors (explicit refs, self masked)
        not_self = ~torch.eye(len(labels), dtype=torch.bool)
        v = loss(e, labels, ref_embeddings=e, ref_labels=soft, mask=not_self)
        assert torch.allclose(v, hard_value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("idx", range(len(loss_ids())), ids=loss_ids())
def test_lambda_0_or_1_mixes_reduce_to_clean_terms(idx, lam):
    """Mixing parents (i, j) with lam in {0, 1} yields a copy of one parent with its label."""
    loss = all_losses()[idx]
    x, labels = make_batch(4, per_class=4)
    e = F.normalize(x, dim=1)
    n = len(labels)
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, n, (10,), generator=g), torch.randint(0, n, (10,), generator=g)
    mixed = F.normalize(lam * e[i] + (1 - lam) * e[j], dim=1)
    soft = lam * F.one_hot(labels[i], C).to(DTYPE) + (1 - lam) * F.one_hot(labels[j], C).to(DTYPE)
    parent = labels[i] if lam == 1.0 else labels[j]
    if isinstance(loss, PairLoss):
        refs = torch.cat([e, mixed])
        mask = torch.cat([~torch.eye(n, dtype=torch.bool), torch.ones(n, len(i), dtype=torch.bool)], 1)
        soft_refs = torch.cat([F.one_hot(labels, C).to(DTYPE), soft])
        v_soft = loss(e, labels, ref_embeddings=refs, ref_labels=soft_refs, mask=mask)
        v_hard = loss(e, labels, ref_embeddings=refs, ref_labels=torch.cat([labels, parent]), mask=mask)
    else:
        emb = torch.cat([e, mixed])
        v_soft = loss(emb, torch.cat([F.one_hot(labels, C).to(DTYPE), soft]))
        v_hard = loss(emb, torch.cat([labels, parent]))
    assert torch.allclose(v_soft, v_hard, rtol=1e-10, atol=1e-12)


# brute-force references of the documented soft formulas (loops over anchors / pairs / triplets)


def ref_contrastive(S, Y, V, mp=1.0, mn=0.5):
    pn = pd = nn_ = nd = 0.0
    for a in range(S.shape[0]):
        for r in range(S.shape[1]):
            if not V[a, r]:
                continue
            s, y = S[a, r].item(), Y[a, r].item()
            tp, tn = y * max(mp - s, 0.0), (1 - y) * max(s - mn, 0.0)
            pn += tp
            pd += tp > 0  # normalisers count pairs (METHODS.md section 1), never sum weights
            nn_ += tn
            nd += tn > 0
    return (pn / pd if pd else 0.0) + (nn_ / nd if nd else 0.0)


def _anchor_rows(S, Y, V):
    for a in range(S.shape[0]):
        rows = [(S[a, r].item(), Y[a, r].item()) for r in range(S.shape[1]) if V[a, r]]
        yield rows


def ref_multi_similarity(S, Y, V, al=2.0, be=50.0, b=0.5):
    vals = []
    for rows in _anchor_rows(S, Y, V):
        if not rows:
            continue
        pos = math.log(1 + sum(y * math.exp(-al * (s - b)) for s, y in rows)) / al
        neg = math.log(1 + sum((1 - y) * math.exp(be * (s - b)) for s, y in rows)) / be
        vals.append(pos + neg)
    return sum(vals) / len(vals) if vals else 0.0


def ref_triplet_all(S, Y, V, m=0.1):
    num = den = 0.0
    for rows in _anchor_rows(S, Y, V):
        for ip, (sp, yp) in enumerate(rows):
            for in_, (sn, yn) in enumerate(rows):
                if ip == in_:
                    continue
                wh = yp * (1 - yn) * max(sn - sp + m, 0.0)
                num += wh
                den += wh > 0
    return num / den if den else 0.0


def ref_triplet_batch_hard(S, Y, V, m=0.1):
    num = den = 0.0
    for rows in _anchor_rows(S, Y, V):
        pos = [(s, y) for s, y in rows if y > 0]
        neg = [(s, y) for s, y in rows if y < 1]
        if not pos or not neg:
            continue
        sp, yp = min(pos)
        sn, yn = max(neg)
        wh = yp * (1 - yn) * max(sn - sp + m, 0.0)
        num += wh
        den += wh > 0
    return num / den if den else 0.0


def ref_lifted(S, Y, V, mp=1.0, mn=0.5):
    vals = []
    for rows in _anchor_rows(S, Y, V):
        if not rows:
            continue
        p = sum(y * math.exp(mp - s) for s, y in rows)
        n = sum((1 - y) * math.exp(s - mn) for s, y in rows)
        vals.append(max(math.log(p) + math.log(n), 0.0) if p > 0 and n > 0 else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def ref_npair(S, Y, V):
    vals = []
    for rows in _anchor_rows(S, Y, V):
        if not any(y > 0 for _, y in rows):
            continue
        inner = sum(yp * (1 - yn) * math.exp(sn - sp) for sp, yp in rows for sn, yn in rows)
        vals.append(math.log(1 + inner))
    return sum(vals) / len(vals) if vals else 0.0


PAIR_REFS = {
    "contrastive": (lambda: ContrastiveLoss(), ref_contrastive),
    "multi-similarity": (lambda: MultiSimilarityLoss(), ref_multi_similarity),
    "triplet-all": (lambda: TripletLoss(mining="all"), ref_triplet_all),
    "triplet-batch-hard": (lambda: TripletLoss(mining="batch-hard"), ref_triplet_batch_hard),
    "lifted-structure": (lambda: LiftedStructureLoss(), ref_lifted),
    "n-pair": (lambda: NPairLoss(), ref_npair),
}


def random_soft_problem(seed, a=12, r=30):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(a + r, 6, generator=g, dtype=DTYPE), dim=1)
    S = e[:a] @ e[a:].T
    Y = torch.rand(a, r, generator=g, dtype=DTYPE)
    kind = torch.randint(0, 3, (a, r), generator=g)
    Y = torch.where(kind == 0, 0.0, torch.where(kind == 1, 1.0, Y))  # exact 0s and 1s and mixes
    V = torch.rand(a, r, generator=g) < 0.8
    V[0] = False  # an anchor that sees nothing
    V[1] = V[1] & (Y[1] == 0)  # an anchor without positives
    V[2] = V[2] & (Y[2] == 1)  # an anchor without negatives
    return S, Y, V


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(PAIR_REFS))
def test_soft_pair_losses_match_brute_force(name, seed):
    make, ref = PAIR_REFS[name]
    S, Y, V = random_soft_problem(seed)
    v = make().pair_loss(S, Y, V)
    assert v.item() == pytest.approx(ref(S, Y, V), rel=1e-9, abs=1e-12)


def test_triplet_all_sorted_form_matches_brute_force_with_many_refs():
    S, Y, V = random_soft_problem(7, a=6, r=150)
    S.requires_grad_(True)
    loss = TripletLoss(mining="all", margin=0.2)
    v = loss.pair_loss(S, Y, V)
    # dense (A, R, R) autograd reference, excluding p == n
    w = Y[:, :, None] * (1 - Y[:, None, :]) * V[:, :, None] * V[:, None, :]
    w = w * ~torch.eye(S.shape[1], dtype=torch.bool)
    h = F.relu(S[:, None, :] - S[:, :, None] + 0.2)
    dense = (w * h).sum() / (w * h > 0).sum()   # over the number of non-zero triplets
    assert v.item() == pytest.approx(dense.item(), rel=1e-10)
    g1, g2 = torch.autograd.grad(v, S)[0], torch.autograd.grad(dense, S)[0]
    assert torch.allclose(g1, g2, atol=1e-12)


def ref_proxy_anchor(S, Y, alpha=32.0, delta=0.1):
    n, p = S.shape
    pos = neg = 0.0
    with_pos = 0
    for j in range(p):
        ys = [Y[i, j].item() for i in range(n)]
        ss = [S[i, j].item() for i in range(n)]
        pos += math.log(1 + sum(y * math.exp(-alpha * (s - delta)) for s, y in zip(ss, ys)))
        neg += math.log(1 + sum((1 - y) * math.exp(alpha * (s + delta)) for s, y in zip(ss, ys)))
        with_pos += sum(ys) > 0
    return pos / max(with_pos, 1) + neg / p


def ref_soft_ce(logits, Y):
    total = 0.0
    for i in range(logits.shape[0]):
        z = [v.item() for v in logits[i]]
        lse = math.log(sum(math.exp(v) for v in z))
        total += -sum(Y[i, j].item() * (z[j] - lse) for j in range(len(z)))
    return total / logits.shape[0]


@pytest.mark.parametrize("name", ["proxy-anchor", "proxy-nca++", "normalized-softmax"])
def test_soft_proxy_losses_with_synthetic_proxies_match_brute_force(name):
    """Proxy Synthesis style call: real + synthetic proxies (P > C), soft labels of width P."""
    loss = build(name)
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(20, D, generator=g, dtype=DTYPE), dim=1)
    lam = 0.35
    synth = lam * loss.proxies[:4] + (1 - lam) * loss.proxies[4:8]  # 4 synthetic proxies
    proxies = torch.cat([loss.proxies, synth])  # (12, D)
    labels = torch.randint(0, C + 4, (20,), generator=g)
    labels[:3] = torch.tensor([8, 9, 1])
    soft = F.one_hot(labels, C + 4).to(DTYPE)
    soft[5] = 0
    soft[5, 2], soft[5, 6] = lam, 1 - lam  # a mixed membership
    v = loss(e, soft, proxies=proxies)
    S = e @ F.normalize(proxies, dim=1).T
    if name == "proxy-anchor":
        expected = ref_proxy_anchor(S, soft)
    elif name == "proxy-nca++":
        expected = ref_soft_ce(-9.0 * (2 - 2 * S), soft)  # -||x - p||^2 / T, T = 1/9
    else:
        expected = ref_soft_ce(S / 0.05, soft)
    assert v.item() == pytest.approx(expected, rel=1e-9)
    v.backward()
    assert torch.isfinite(loss.proxies.grad).all() and loss.proxies.grad.abs().sum() > 0
    # hard labels with an override of the same proxies equal the default call
    hard = torch.tensor([0, 3, 5])
    assert torch.allclose(loss(e[:3], hard, proxies=loss.proxies), loss(e[:3], hard))


# ------------------------------------------------------------------------------------------
# hand-worked tiny cases
# ------------------------------------------------------------------------------------------

# e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0, 1); labels 0, 0, 1.
# s01 = 0.6, s02 = 0.0, s12 = 0.8.
TINY_E = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=DTYPE)
TINY_Y = torch.tensor([0, 0, 1])


def test_contrastive_hand_worked():
    # positive ordered pairs (0,1), (1,0): [1 - 0.6]_+ = 0.4 each -> mean of non-zero = 0.4
    # negative ordered pairs (0,2),(2,0): [0 - 0.5]_+ = 0; (1,2),(2,1): [0.8 - 0.5]_+ = 0.3
    #   -> mean of the non-zero ones = 0.3.   total = 0.7
    loss = ContrastiveLoss(pos_margin=1.0, neg_margin=0.5)
    assert loss(TINY_E, TINY_Y).item() == pytest.approx(0.7, abs=1e-12)
    assert float(loss.last_terms["pos"]) == pytest.approx(0.4)
    assert float(loss.last_terms["neg"]) == pytest.approx(0.3)


def test_contrastive_hand_worked_soft():
    # one anchor, refs r1 (s = 0.6, y = 0.25) and r2 (s = 0.8, y = 1):
    # pos = (0.25 * [1 - 0.6]_+ + 1 * [1 - 0.8]_+) / #{2 non-zero pairs} = (0.1 + 0.2) / 2 = 0.15
    # neg = (0.75 * [0.6 - 0.5]_+ + 0 * [0.8 - 0.5]_+) / #{1 non-zero pair} = 0.075. total 0.225
    S = torch.tensor([[0.6, 0.8]], dtype=DTYPE)
    Y = torch.tensor([[0.25, 1.0]], dtype=DTYPE)
    assert ContrastiveLoss().pair_loss(S, Y).item() == pytest.approx(0.225, abs=1e-12)


def _mixed_reference_problem(seed=0, a=10, r=16):
    """Clean anchors against mixed references that all carry the batch's one lambda."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(a + r, 8, generator=g, dtype=DTYPE), dim=1)
    return e[:a] @ e[a:].T


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("c", [0.1, 0.5, 2.0])
def test_contrastive_positive_part_scales_with_the_soft_label(distance, c):
    # METHODS.md section 1: the soft label multiplies each reference's term and survives the
    # averaging, so multiplying every y by c multiplies the positive part by c. (A normaliser
    # of sum(y [h > 0]) cancels c: every mix was pulled with full weight whatever lambda was.)
    S = _mixed_reference_problem()
    loss = ContrastiveLoss(**({"distance": distance, "pos_margin": 0.0}
                              if distance == "euclidean" else {}))
    Y = torch.full_like(S, 0.4)
    loss.pair_loss(S, Y)
    pos = float(loss.last_terms["pos"])
    loss.pair_loss(S, c * Y)
    assert pos > 0
    assert float(loss.last_terms["pos"]) == pytest.approx(c * pos, rel=1e-12)


def test_contrastive_mixed_loss_and_gradient_follow_lambda():
    # A mixed reference with y = lambda is pulled with weight lambda and pushed with 1 - lambda:
    # the loss changes with lambda, and d loss / d s of a pair whose both hinges are active is
    # -lambda / n_pos + (1 - lambda) / n_neg (worked from the formula with 1 anchor, 1 reference:
    # pos = lambda [1 - s]_+, neg = (1 - lambda) [s - 0.5]_+, each over 1 non-zero pair).
    values = []
    for lam in (0.1, 0.5, 0.9):
        s = torch.tensor([[0.7]], dtype=DTYPE, requires_grad=True)
        v = ContrastiveLoss().pair_loss(s, torch.tensor([[lam]], dtype=DTYPE))
        v.backward()
        assert v.item() == pytest.approx(lam * 0.3 + (1 - lam) * 0.2, abs=1e-12)
        assert s.grad.item() == pytest.approx(-lam + (1 - lam), abs=1e-12)
        values.append(v.item())
    assert len(set(round(x, 9) for x in values)) == 3


def test_contrastive_euclidean_hand_worked():
    # Distance form (official Metrix, pos_margin 0, neg_margin 0.5), same three points:
    # d01 = sqrt(2 - 1.2) = sqrt(0.8) = 0.894427191; d02 = sqrt(2); d12 = sqrt(0.4) = 0.632455532.
    # positives (0,1),(1,0): [d - 0]_+ = 0.894427191 each -> mean 0.894427191
    # negatives: [0.5 - d]_+ = 0 for all (every d > 0.5) -> 0.        total = 0.894427191
    loss = ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance="euclidean")
    assert loss(TINY_E, TINY_Y).item() == pytest.approx(math.sqrt(0.8), abs=1e-12)
    with pytest.raises(ValueError, match="pos_margin=0, neg_margin=0.5"):
        ContrastiveLoss(distance="euclidean")   # similarity margins 1.0 / 0.5 make no sense


def test_multi_similarity_hand_worked():
    # alpha = 2, beta = 50, base = 0.5, same three points.
    # anchor 0: pos {s=0.6}: 1/2 log(1 + e^{-2(0.6-0.5)}) = 0.5 log(1 + e^{-0.2}) = 0.29906943469
    #           neg {s=0.0}: 1/50 log(1 + e^{50(0-0.5)}) = log(1 + e^{-25}) / 50 = 2.7776e-13
    # anchor 1: pos {s=0.6}: 0.29906943469;  neg {s=0.8}: log(1 + e^{15}) / 50 = 0.30000000612
    # anchor 2: no positive: 0;  neg {0.0, 0.8}: log(1 + e^{-25} + e^{15}) / 50 = 0.30000000612
    # mean = (0.29906943469 * 2 + 2.7776e-13 + 0.30000000612 * 2) / 3 = 0.39937962721
    expected = (0.2990694346907959 * 2 + 2.777600371908914e-13 + 0.3000000061180455 * 2) / 3
    assert expected == pytest.approx(0.39937962721, abs=1e-10)
    loss = MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    assert loss(TINY_E, TINY_Y).item() == pytest.approx(expected, abs=1e-12)


def test_triplet_hand_worked():
    # anchor 0: hardest pos s=0.6, hardest neg s=0.0 -> [0 - 0.6 + 0.1]_+ = 0
    # anchor 1: pos 0.6, neg 0.8 -> [0.8 - 0.6 + 0.1]_+ = 0.3;  anchor 2 has no positive.
    # batch-hard = mean of non-zero = 0.3; "all" has the same two triplets -> 0.3
    assert TripletLoss(margin=0.1)(TINY_E, TINY_Y).item() == pytest.approx(0.3)
    assert TripletLoss(margin=0.1, mining="all")(TINY_E, TINY_Y).item() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------
# degenerate batches: no NaN, zero with a grad path
# ------------------------------------------------------------------------------------------


def _degenerate_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g, dtype=DTYPE)
    return {
        "single-class": (x, torch.zeros(6, dtype=torch.long), None),
        "all-distinct": (x, torch.arange(6), None),
        "two-points": (x[:2], torch.tensor([1, 1]), None),
        "all-masked": (x, torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6, 6, dtype=torch.bool)),
        "one-sample": (x[:1], torch.tensor([3]), None),
        "empty": (x[:0], torch.tensor([], dtype=torch.long), None),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
@pytest.mark.parametrize("idx", range(len(loss_ids())), ids=loss_ids())
def test_gradients_finite_on_degenerate_batches(idx, case):
    loss = all_losses()[idx]
    x, labels, mask = _degenerate_cases()[case]
    x = x.clone().requires_grad_(True)
    e = F.normalize(x, dim=1)
    if isinstance(loss, PairLoss):
        v = loss(e, labels, mask=mask)
    elif mask is None:
        v = loss(e, labels)
    else:  # proxy losses take no mask; their all-masked analogue is a batch without embeddings
        v = loss(e[:0], labels[:0])
    assert v.dim() == 0 and torch.isfinite(v)
    v.backward()
    assert x.grad is None or torch.isfinite(x.grad).all()
    needs_both = isinstance(loss, (TripletLoss, LiftedStructureLoss, NPairLoss))
    if case in ("all-masked", "empty") or (isinstance(loss, PairLoss) and case == "one-sample"):
        assert v.item() == 0.0  # no pairs at all
    if case in ("single-class", "two-points") and needs_both:
        assert v.item() == 0.0  # a loss that needs a positive and a negative
    assert all(torch.isfinite(torch.as_tensor(t)) for t in loss.last_terms.values())


def test_all_masked_returns_zero_with_grad_path():
    x = torch.randn(5, D, dtype=DTYPE, requires_grad=True)
    for loss in all_losses():
        if isinstance(loss, PairLoss):
            v = loss(F.normalize(x, dim=1), torch.arange(5) % 2, mask=torch.zeros(5, 5, dtype=torch.bool))
            assert v.item() == 0.0 and v.requires_grad


def test_mask_restricts_references():
    x, labels = make_batch(6, per_class=4)
    e = F.normalize(x, dim=1)
    keep = torch.arange(len(labels)) < 20  # only the first 20 samples exist
    mask = keep[:, None] & keep[None, :]
    for loss in all_losses():
        if isinstance(loss, PairLoss):
            assert torch.allclose(loss(e, labels, mask=mask), loss(e[:20], labels[:20]), atol=1e-12)


def test_last_terms_filled():
    x, labels = make_batch(8, per_class=4)
    e = F.normalize(x, dim=1)
    for loss in all_losses():
        loss(e, labels)
        terms = loss.last_terms
        assert terms and all(not torch.as_tensor(t).requires_grad for t in terms.values())


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def test_registry_names_and_classes():
    assert set(LOSSES) == {
        "contrastive", "multi-similarity", "proxy-anchor", "proxy-nca++", "triplet",
        "lifted-structure", "n-pair", "normalized-softmax",
    }
    assert list_losses() == list(LOSSES)
    for name, cls in LOSSES.items():
        obj = build_loss(name, C, D)
        assert isinstance(obj, cls)
        assert obj.uses_proxies == issubclass(cls, ProxyLoss)
        if cls.uses_proxies:
            assert obj.proxies.shape == (C, D) and obj.proxies.requires_grad


def test_defaults():
    assert loss_defaults("multi-similarity") == {"alpha": 2.0, "beta": 50.0, "base": 0.5,
                                                 "epsilon": None}
    assert loss_defaults("proxy-anchor") == {"alpha": 32.0, "margin": 0.1}
    assert loss_defaults("proxy-nca++") == {"temperature": pytest.approx(1 / 9)}
    assert loss_defaults("normalized-softmax") == {"temperature": 0.05}
    assert loss_defaults("contrastive") == {"pos_margin": 1.0, "neg_margin": 0.5,
                                            "distance": "cosine"}
    assert loss_defaults("triplet") == {"margin": 0.1, "mining": "batch-hard",
                                        "distance": "cosine"}
    assert loss_defaults("n-pair") == {}
    assert build_loss("triplet", C, D, margin=0.3).margin == 0.3


def test_build_loss_errors_list_valid_choices():
    with pytest.raises(ValueError) as err:
        build_loss("arcface", C, D)
    for name in LOSSES:
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        build_loss("multi-similarity", C, D, alpha=2, gamma=3)
    msg = str(err.value)
    assert "gamma" in msg and "alpha" in msg and "beta" in msg and "base" in msg
    with pytest.raises(ValueError, match="mining"):
        build_loss("triplet", C, D, mining="semi-hard")
    with pytest.raises(ValueError):
        build_loss("proxy-anchor")  # needs num_classes and embedding_dim
