"""Embedding Expansion, Symmetrical Synthesis and Proxy Synthesis: geometry of the synthetic
points, hard negative pair mining against brute force, HPHN positives, proxy bookkeeping, and
short training runs on the bundled digits."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dml.losses import build_loss
from dml.mixing import build_mixing
from dml.losses import PairLoss
from dml.mixing.expansion import (
    expand_embeddings,
    hardest_negative_pairs,
    hardest_negatives_per_anchor,
    same_class_pairs,
    synthetic_pair_loss,
)
from dml.mixing.synthesis import (
    mix_with_proxies,
    proxy_mixtures,
    reflect,
    symmetric_points,
)

PAIR_LOSSES = ["triplet", "lifted-structure", "n-pair", "multi-similarity"]
PROXY_LOSSES = ["normalized-softmax", "proxy-nca++", "proxy-anchor"]


def pk_batch(p=4, k=4, d=8, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)
    if shuffle:
        labels = labels[torch.randperm(p * k, generator=g)]
    emb = F.normalize(torch.randn(p * k, d, generator=g, dtype=torch.float64), dim=1)
    return emb, labels


# --------------------------------------------------------------------------- EE points


@pytest.mark.parametrize("n", [1, 2, 5])
def test_ee_points_lie_on_the_segment_at_k_over_n_plus_1(n):
    emb, labels = pk_batch()
    pts, lab, parents, weight = expand_embeddings(emb, labels, n=n, normalize=False)
    i, j = parents[:, 0], parents[:, 1]
    expected = weight[:, None] * emb[i] + (1 - weight[:, None]) * emb[j]
    torch.testing.assert_close(pts, expected)
    # every pair gets exactly the weights k / (n + 1), k = 1..n
    per_pair = (weight * (n + 1)).reshape(-1, n).sort(1).values
    torch.testing.assert_close(per_pair, torch.arange(1, n + 1, dtype=weight.dtype).expand_as(per_pair))
    assert torch.equal(lab, labels[i]) and torch.equal(labels[i], labels[j])
    # normalised: unit norm and the same direction
    pts_n, *_ = expand_embeddings(emb, labels, n=n, normalize=True)
    torch.testing.assert_close(pts_n.norm(dim=1), torch.ones(len(pts_n), dtype=pts_n.dtype))
    torch.testing.assert_close(pts_n, F.normalize(pts, dim=1))


def test_ee_hand_worked_points():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pts, lab, parents, weight = expand_embeddings(emb, torch.tensor([3, 3]), n=2, normalize=False)
    # x_k = (k x_j + (3 - k) x_i) / 3, k = 1, 2
    torch.testing.assert_close(pts, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(weight, torch.tensor([2 / 3, 1 / 3]))
    assert parents.tolist() == [[0, 1], [0, 1]] and lab.tolist() == [3, 3]
    pts_n, *_ = expand_embeddings(emb, torch.tensor([3, 3]), n=2)
    torch.testing.assert_close(pts_n, torch.tensor([[2.0, 1.0], [1.0, 2.0]]) / math.sqrt(5))


@pytest.mark.parametrize("p,k", [(4, 4), (3, 6), (8, 2)])
def test_ee_counts_for_all_and_consecutive_pairing(p, k):
    emb, labels = pk_batch(p, k)
    n = 3
    pts, *_ = expand_embeddings(emb, labels, n=n, pairing="all")
    assert len(pts) == p * k * (k - 1) // 2 * n
    pts, *_ = expand_embeddings(emb, labels, n=n, pairing="consecutive")
    assert len(pts) == p * (k // 2) * n
    i, j = same_class_pairs(labels, "consecutive")
    used = torch.cat([i, j])
    assert len(used.unique()) == len(used)            # each example in at most one pair
    assert torch.equal(labels[i], labels[j]) and bool((i != j).all())


def test_consecutive_pairing_is_the_official_batch_order():
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0, 2])
    i, j = same_class_pairs(labels, "consecutive")
    # class 0 at 0, 1, 4, 7 -> (0, 1), (4, 7); class 1 at 2, 3, 6 -> (2, 3); class 2 at 5, 8 -> (5, 8)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (2, 3), (4, 7), (5, 8)]


# --------------------------------------------------------------------------- symmetrical points


def test_symmetrical_points_keep_norm_and_similarity_to_the_partner():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(4)
    emb = torch.randn(12, 6, generator=g, dtype=torch.float64) * torch.rand(12, 1, generator=g,
                                                                             dtype=torch.float64) * 3
    pts, lab, parents, weight = symmetric_points(emb, labels)
    assert len(pts) == 2 * 3 * 6 and torch.equal(lab, labels[parents[:, 0]])
    assert torch.isnan(weight).all()                 # a reflection is no interpolation
    src, axis = parents[:, 0], parents[:, 1]         # parent 0 reflected about parent 1's axis
    torch.testing.assert_close(pts.norm(dim=1), emb[src].norm(dim=1))
    torch.testing.assert_close((pts * emb[axis]).sum(1), (emb[src] * emb[axis]).sum(1))
    assert not torch.allclose(pts, emb[src])


def test_symmetrical_hand_worked_2d():
    xk = torch.tensor([[1.0, 0.0]])
    xl = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    # r = (xk . xl^) xl^ = (1/2, 1/2); x'_k = 2 r - xk = (0, 1)
    torch.testing.assert_close(reflect(xk, xl), torch.tensor([[0.0, 1.0]]))
    pts, _, parents, _ = symmetric_points(torch.cat([xk, xl]), torch.tensor([0, 0]))
    torch.testing.assert_close(pts, torch.tensor([[0.0, 1.0], [1 / math.sqrt(2), -1 / math.sqrt(2)]]))
    assert parents.tolist() == [[0, 1], [1, 0]]      # (reflected, axis)
    # a non-unit axis gives the same reflection; the norm of the reflected point is its own
    torch.testing.assert_close(reflect(2 * xk, 5 * xl), torch.tensor([[0.0, 2.0]]))


# --------------------------------------------------------------------------- mining


def brute_force_hardest(points, labels, c, c2):
    best, arg = -math.inf, None
    for u in torch.nonzero(labels == c).flatten().tolist():
        for v in torch.nonzero(labels == c2).flatten().tolist():
            s = float(points[u] @ points[v])
            if s > best:
                best, arg = s, (u, v)
    return best, arg


@pytest.mark.parametrize("balanced", [True, False])
def test_hardest_negative_pair_equals_brute_force(balanced):
    emb, labels = pk_batch(4, 4, d=5, seed=3)
    if not balanced:                                   # unequal class sizes: padded layout
        keep = torch.tensor([0, 1, 2, 3, 5, 6, 9, 10, 11, 12, 15])
        emb, labels = emb[keep], labels[keep]
    pts, plab, *_ = expand_embeddings(emb, labels, n=2)
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    neg = hardest_negative_pairs(allp, alll)
    cls = neg.classes.tolist()
    for a, b in itertools.permutations(range(len(cls)), 2):
        best, _ = brute_force_hardest(allp, alll, cls[a], cls[b])
        assert math.isclose(float(neg.sim[a, b]), best, rel_tol=0, abs_tol=1e-12)
        assert int(alll[neg.u[a, b]]) == cls[a] and int(alll[neg.v[a, b]]) == cls[b]
        assert math.isclose(float(allp[neg.u[a, b]] @ allp[neg.v[a, b]]), best, abs_tol=1e-12)
    assert not bool(neg.valid.diagonal().any())


def brute_force_anchor_negatives(points, labels, parents, b):
    """Per anchor i and other class c: max s(u, v) over u in {i} + {synthetic points with i as a
    parent} and v of class c (loops; the official HPHN reshape-min, generalised to any loss)."""
    out = {}
    for i in range(b):
        own = [i] + [b + s for s in range(len(parents)) if i in parents[s].tolist()]
        for c in sorted(set(labels.tolist()) - {int(labels[i])}):
            out[i, c] = max((float(points[u] @ points[v]), u, v) for u in own
                            for v in torch.nonzero(labels == c).flatten().tolist())
    return out


@pytest.mark.parametrize("maker", ["ee-all", "ee-consecutive", "symmetrical"])
@pytest.mark.parametrize("balanced", [True, False])
def test_hardest_negatives_per_anchor_equal_brute_force(maker, balanced):
    emb, labels = pk_batch(4, 4, d=5, seed=4)
    if not balanced:
        keep = torch.tensor([0, 1, 2, 3, 5, 6, 9, 10, 11, 12, 15])
        emb, labels = emb[keep], labels[keep]
    if maker == "symmetrical":
        pts, plab, parents, _ = symmetric_points(emb, labels)
    else:
        pts, plab, parents, _ = expand_embeddings(emb, labels, n=2, pairing=maker[3:])
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    neg = hardest_negatives_per_anchor(allp, alll, parents)
    want = brute_force_anchor_negatives(allp, alll, parents, len(emb))
    cls = neg.classes.tolist()
    for i in range(len(emb)):
        for col, c in enumerate(cls):
            assert bool(neg.valid[i, col]) == (c != int(labels[i]))
            if c == int(labels[i]):
                continue
            best, _, _ = want[i, c]
            assert math.isclose(float(neg.sim[i, col]), best, abs_tol=1e-12)
            u, v = int(neg.u[i, col]), int(neg.v[i, col])
            assert int(alll[v]) == c and int(alll[u]) == int(labels[i])
            assert u == i or i in parents[u - len(emb)].tolist()        # u is the anchor's own
            assert math.isclose(float(allp[u] @ allp[v]), best, abs_tol=1e-12)


class HardestNegativeSide(PairLoss):
    """The negative side of batch-hard triplet alone: the sum over anchors of the similarity of
    their hardest valid negative reference (no positive term, no hinge)."""

    def _pair_loss(self, sim, y, valid):
        neg = valid & (y == 0)
        return torch.where(neg, sim, float("-inf")).amax(1)[neg.any(1)].sum()


@pytest.mark.parametrize("strategy", ["embedding-expansion", "symmetrical-synthesis"])
def test_every_anchor_gets_negative_side_gradient(strategy):
    # docs/METHODS.md section 4: with per-anchor mining (the official HPHN reshape-min) each
    # anchor's negative involves the anchor or a point made from it, so every anchor that has a
    # negative in the batch is pushed. The class-pair mining pushed only the ends of one pair per
    # class pair: in a 16 x 4 batch about a quarter of the anchors.
    emb, labels = pk_batch(16, 4, d=32, seed=0)
    emb.requires_grad_(True)
    res = build_mixing(strategy, "triplet").embedding_loss(HardestNegativeSide(), emb, labels)
    res.loss.backward()
    pushed = emb.grad.norm(dim=1) > 0
    assert int(pushed.sum()) == 64, f"{int(pushed.sum())} of 64 anchors got a negative gradient"
    # the class-pair option is kept for comparison, and shows the defect
    emb.grad = None
    strat = build_mixing(strategy, "triplet", negatives="class-pair")
    strat.embedding_loss(HardestNegativeSide(), emb, labels).loss.backward()
    assert int((emb.grad.norm(dim=1) > 0).sum()) < 40


def test_strategy_hardest_flags_mark_the_mined_synthetic_points():
    torch.manual_seed(0)
    emb, labels = pk_batch(3, 4, d=3, seed=5)
    pts, plab, parents, _ = expand_embeddings(emb, labels, n=3)
    loss_fn = build_loss("triplet")
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    _, hardest, frac = synthetic_pair_loss(loss_fn, emb, labels, pts, plab, parents,
                                           negatives="class-pair")
    ends = set()
    for c, c2 in itertools.permutations(range(3), 2):
        ends.update(brute_force_hardest(allp, alll, c, c2)[1])
    expected = {e - len(emb) for e in ends if e >= len(emb)}
    assert set(torch.nonzero(hardest).flatten().tolist()) == expected
    assert 0.0 <= float(frac) <= 1.0
    _, hardest, frac = synthetic_pair_loss(loss_fn, emb, labels, pts, plab, parents)
    ends = set()
    for _, u, v in brute_force_anchor_negatives(allp, alll, parents, len(emb)).values():
        ends.update((u, v))
    expected = {e - len(emb) for e in ends if e >= len(emb)}
    assert set(torch.nonzero(hardest).flatten().tolist()) == expected
    assert float(frac) == pytest.approx(
        sum(u >= 12 or v >= 12 for _, u, v in brute_force_anchor_negatives(
            allp, alll, parents, 12).values()) / 24)


def test_hphn_triplet_takes_the_hardest_positive_among_originals_only():
    # class 0: a, b, c with b, c at 100 degrees from a; the normalised points between b and c
    # lie near -a, so a synthetic positive would be the hardest positive (similarity ~ -0.47).
    t = math.radians(100)
    a, b, c = [1.0, 0.0, 0.0], [math.cos(t), math.sin(t), 0.0], [math.cos(t), -math.sin(t), 0.0]
    d, e = [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]                     # class 1
    emb = torch.tensor([a, b, c, d, e], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    pts, plab, parents, _ = expand_embeddings(emb, labels, n=2)
    s = emb @ emb.T
    syn_pos = (emb[0] @ pts[plab == 0].T).min()
    assert float(syn_pos) < float(s[0, 1:3].min()) - 0.2         # the trap is set
    margin = 5.0                                                 # every triplet active
    loss_fn = build_loss("triplet", margin=margin)               # batch-hard
    loss, *_ = synthetic_pair_loss(loss_fn, emb, labels, pts, plab, parents)
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    negs = brute_force_anchor_negatives(allp, alll, parents, 5)  # one negative class each
    expected = []
    for i in range(5):
        pos = [float(s[i, j]) for j in range(5) if j != i and labels[j] == labels[i]]
        expected.append(negs[i, 1 - int(labels[i])][0] - min(pos) + margin)
    assert math.isclose(float(loss), sum(expected) / 5, rel_tol=1e-9)


def test_point_negatives_equal_the_loss_forward_with_a_mask():
    emb, labels = pk_batch(4, 4, d=6, seed=2)
    pts, plab, parents, _ = expand_embeddings(emb, labels, n=2)
    for name in PAIR_LOSSES:
        loss_fn = build_loss(name)
        got, hardest, _ = synthetic_pair_loss(loss_fn, emb, labels, pts, plab, parents,
                                              negatives="point")
        refs, ref_labels = torch.cat([emb, pts]), torch.cat([labels, plab])
        mask = torch.cat([~torch.eye(16, dtype=torch.bool), labels[:, None] != plab[None, :]], 1)
        want = build_loss(name)(emb, labels, refs, ref_labels, mask=mask)
        torch.testing.assert_close(got, want)
        assert hardest.shape == (len(pts),)


# --------------------------------------------------------------------------- proxy synthesis


def test_proxy_mixtures_hand_worked():
    # classes in order of first appearance: 2 (k=0), 0 (k=1), 1 (k=2); c_k is mixed with
    # c_{k-1}: 2 with 1, 0 with 2, 1 with 0; member r with member r of the previous class.
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    i, j, group, g = proxy_mixtures(labels)
    assert g == 3
    got = sorted(zip(i.tolist(), j.tolist(), group.tolist()))
    # 2s at 0, 4; 0s at 1, 3; 1s at 2, 5
    assert got == [(0, 2, 0), (1, 0, 1), (2, 1, 2), (3, 4, 1), (4, 5, 0), (5, 3, 2)]
    # mu = 2/3 keeps the first int(3 * 2/3) = 2 class pairs; two classes give one pair, one none
    assert proxy_mixtures(labels, mu=2 / 3)[3] == 2
    assert set(proxy_mixtures(labels, mu=2 / 3)[2].tolist()) == {0, 1}
    assert proxy_mixtures(torch.tensor([1, 1, 0, 0]))[3] == 1
    assert proxy_mixtures(torch.tensor([1, 1, 1]))[3] == 0


def test_proxy_mixtures_one_image_per_class_is_the_official_roll():
    # official proxy_synthesis: sample i mixed with sample i - 1 (torch.roll(x, 1)), class C + i
    labels = torch.tensor([5, 3, 9, 0, 7])
    i, j, group, g = proxy_mixtures(labels)
    assert g == 5 and i.tolist() == [0, 1, 2, 3, 4] and j.tolist() == [4, 0, 1, 2, 3]
    assert group.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("p,k", [(4, 4), (8, 2), (3, 5), (16, 1)])
def test_proxy_mixtures_one_synthetic_class_per_distinct_class_pair(p, k):
    emb, labels = pk_batch(p, k, seed=p * k)
    i, j, group, g = proxy_mixtures(labels)
    assert bool((labels[i] != labels[j]).all())
    pairs = {}
    for a, b_, grp in zip(labels[i].tolist(), labels[j].tolist(), group.tolist()):
        pairs.setdefault(grp, set()).add((a, b_))
    assert all(len(v) == 1 for v in pairs.values())          # one class pair per synthetic class
    unordered = [frozenset(next(iter(v))) for v in pairs.values()]
    assert len(set(unordered)) == len(unordered) == g        # and no class pair twice
    assert len(i) == p * k                                   # every example mixed once


def test_mixed_proxies_and_embeddings():
    g = torch.Generator().manual_seed(0)
    proxies = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    emb = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    li, lj = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    lam = 0.3
    mixed, mp = mix_with_proxies(emb[:3], li, emb[3:], lj, proxies, lam)
    ph = F.normalize(proxies, dim=1)
    torch.testing.assert_close(mp, lam * ph[li] + (1 - lam) * ph[lj])     # not re-normalised
    torch.testing.assert_close(mixed, F.normalize(lam * emb[:3] + (1 - lam) * emb[3:], dim=1))
    mixed1, mp1 = mix_with_proxies(emb[:3], li, emb[3:], lj, proxies, 1.0)
    torch.testing.assert_close(mixed1, emb[:3])
    torch.testing.assert_close(mp1, ph[li])


class Identity(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def _capture_loss_inputs(loss_fn):
    seen = {}

    def hook(module, args, kwargs):
        seen["emb"], seen["labels"] = args
        seen["proxies"] = kwargs["proxies"]

    loss_fn.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_proxy_synthesis_adds_one_class_and_proxy_per_class_pair(mu):
    torch.manual_seed(0)
    c, b, d = 6, 16, 5
    labels = torch.arange(4).repeat_interleave(4)
    x = torch.randn(b, d)
    strat = build_mixing("proxy-synthesis", "normalized-softmax", mu=mu, fixed_lambda=0.25)
    loss_fn = build_loss("normalized-softmax", num_classes=c, embedding_dim=d)
    seen = _capture_loss_inputs(loss_fn)
    res = strat.step(Identity(), loss_fn, x, labels)
    g = int(4 * mu)                                          # synthetic classes
    s = g * 4                                                # their members, 4 each
    syn = res.synthetic
    assert len(syn) == s and seen["proxies"].shape == (c + g, d) and seen["emb"].shape == (b + s, d)
    assert seen["labels"][:b].tolist() == labels.tolist()
    assert sorted(seen["labels"][b:].tolist()) == sorted(list(range(c, c + g)) * 4)
    i, j = syn.parents[:, 0], syn.parents[:, 1]
    assert bool((labels[i] != labels[j]).all())
    ph = F.normalize(loss_fn.proxies.detach(), dim=1)
    torch.testing.assert_close(seen["proxies"][:c].detach(), ph)
    members = seen["labels"][b:] - c
    torch.testing.assert_close(seen["proxies"][c + members].detach(),
                               0.25 * ph[labels[i]] + 0.75 * ph[labels[j]])
    # membership over the real classes: the lambda-mix of the two parents' classes
    want = 0.25 * F.one_hot(labels[i], c) + 0.75 * F.one_hot(labels[j], c)
    torch.testing.assert_close(syn.membership, want.float())
    torch.testing.assert_close(syn.weight, torch.full((s,), 0.25))
    assert syn.kind == "proxy-synthesis" and math.isfinite(res.terms["loss"])
    # lambda forced to 1: every synthetic embedding is its parent 0
    strat.fixed_lambda = 1.0
    res = strat.step(Identity(), loss_fn, x, labels)
    emb = F.normalize(x, dim=1)
    torch.testing.assert_close(res.synthetic.embeddings, emb[res.synthetic.parents[:, 0]])


@pytest.mark.parametrize("loss", PROXY_LOSSES)
def test_proxy_synthesis_no_two_synthetic_classes_share_a_proxy(loss):
    # P x K batches: K mixtures of a class pair with one lambda are one class, not K classes
    # with identical proxies that are each other's negatives.
    torch.manual_seed(0)
    emb, labels = pk_batch(16, 4, d=32, seed=1)
    loss_fn = build_loss(loss, num_classes=20, embedding_dim=32)
    seen = _capture_loss_inputs(loss_fn)
    strat = build_mixing("proxy-synthesis", loss)
    strat.draw_lambda = lambda: 0.3
    strat.step(Identity(), loss_fn, emb, labels)
    syn_proxies = F.normalize(seen["proxies"][20:].detach(), dim=1)
    gap = torch.cdist(syn_proxies, syn_proxies) + torch.eye(len(syn_proxies)) * 9
    assert len(syn_proxies) == 16 and float(gap.min()) > 1e-3


def test_proxy_synthesis_loss_goes_to_its_minimum_on_the_proxies():
    # 4 classes x 4 samples, orthonormal proxies e_0..e_3, every embedding on its class's proxy,
    # lambda = 1/2, normalised softmax at T = 0.05 (logit = 20 s). Synthetic classes (c_k, c_{k-1})
    # of the cycle have proxies (e_a + e_b) / sqrt(2).  Worked by hand, per sample:
    #   real sample of class c: own 20; 3 real proxies at s = 0; 2 synthetic proxies with c at
    #     s = 1/sqrt2, 2 without at 0:  CE_r = log(1 + 5 e^{-20} + 2 e^{20 (1/sqrt2 - 1)})
    #   synthetic sample (a, b) = its proxy: own 20; real a, b at 1/sqrt2; 2 other real at 0;
    #     2 synthetic proxies sharing one class at s = 1/2, 1 sharing none at 0:
    #     CE_s = log(1 + 2 e^{20 (1/sqrt2 - 1)} + 3 e^{-20} + 2 e^{-10})
    # Duplicated synthetic classes (4 identical proxies per class pair) put a floor of log 4 on
    # CE_s instead.
    r2 = 1 / math.sqrt(2)
    ce_r = math.log(1 + 5 * math.exp(-20) + 2 * math.exp(20 * (r2 - 1)))
    ce_s = math.log(1 + 2 * math.exp(20 * (r2 - 1)) + 3 * math.exp(-20) + 2 * math.exp(-10))
    labels = torch.arange(4).repeat_interleave(4)
    loss_fn = build_loss("normalized-softmax", num_classes=4, embedding_dim=8)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.eye(4, 8))
    x = torch.eye(4, 8)[labels].double()
    loss_fn.double()
    strat = build_mixing("proxy-synthesis", "normalized-softmax")
    strat.draw_lambda = lambda: 0.5
    res = strat.step(Identity(), loss_fn, x, labels)
    assert float(res.loss.detach()) == pytest.approx((16 * ce_r + 16 * ce_s) / 32, rel=1e-9)
    assert float(res.loss.detach()) < 0.01 < math.log(4) / 2


def test_proxy_synthesis_lambda_is_beta_distributed():
    torch.manual_seed(0)
    strat = build_mixing("proxy-synthesis", "proxy-anchor", alpha=0.4)
    lams = torch.tensor([strat.draw_lambda() for _ in range(2000)])
    assert 0.0 <= float(lams.min()) and float(lams.max()) <= 1.0
    assert abs(float(lams.mean()) - 0.5) < 0.05
    assert abs(float(lams.var()) - 0.25 / 1.8) < 0.03        # Beta(a, a) variance 1 / (4 (2a + 1))


# --------------------------------------------------------------------------- registry


def test_unsupported_pairs_and_bad_parameters_raise():
    with pytest.raises(ValueError, match="embedding-expansion: contrastive, multi-similarity, "
                                         "triplet, lifted-structure, n-pair;"):
        build_mixing("embedding-expansion", "proxy-anchor")
    with pytest.raises(ValueError, match="it needs a pair-based loss.*proxy-synthesis: "
                                         "proxy-anchor, proxy-nca\\+\\+, normalized-softmax"):
        build_mixing("symmetrical-synthesis", "normalized-softmax")
    with pytest.raises(ValueError, match="proxy-synthesis"):
        build_mixing("proxy-synthesis", "triplet")
    with pytest.raises(ValueError, match="pairing"):
        build_mixing("embedding-expansion", "triplet", pairing="random")
    with pytest.raises(ValueError, match="negatives"):
        build_mixing("symmetrical-synthesis", "triplet", negatives="nope")
    with pytest.raises(ValueError, match="n "):
        build_mixing("embedding-expansion", "triplet", n=0)
    with pytest.raises(ValueError, match="mu"):
        build_mixing("proxy-synthesis", "proxy-anchor", mu=1.5)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits_batches():
    from dml.data import load_dataset
    from dml.data.transforms import make_transform

    ds = load_dataset("digits")
    y_all = torch.searchsorted(ds.train.classes(), ds.train.labels)
    g = torch.Generator().manual_seed(0)
    tf = make_transform(ds, train=False)
    batches = []
    for _ in range(3):
        idx = torch.cat([torch.nonzero(y_all == c).flatten()[torch.randperm(int((y_all == c).sum()),
                                                                            generator=g)[:6]]
                         for c in range(len(ds.train.classes()))])
        batches.append((tf(ds.train.load(idx)), y_all[idx]))
    return ds, batches, len(ds.train.classes())


@pytest.mark.parametrize("strategy,loss", [(s, l) for s in ("embedding-expansion", "symmetrical-synthesis")
                                           for l in PAIR_LOSSES]
                         + [("proxy-synthesis", l) for l in PROXY_LOSSES])
def test_each_strategy_and_loss_trains_on_digits(digits_batches, strategy, loss):
    from dml.models import build_model

    ds, batches, c = digits_batches
    torch.manual_seed(0)
    model = build_model("small-cnn", ds.channels, ds.image_size, 16, width=16)
    loss_fn = build_loss(loss, num_classes=c, embedding_dim=16)
    strat = build_mixing(strategy, loss)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3)
    for x, y in batches:
        res = strat.step(model, loss_fn, x, y)
        opt.zero_grad()
        res.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(res.loss) and grads
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
        opt.step()
        syn = res.synthetic
        assert len(syn) > 0 and syn.membership.shape == (len(syn), c)
        assert syn.parents.shape == (len(syn), 2) and syn.weight.shape == (len(syn),)
        assert bool(torch.isfinite(syn.embeddings).all()) and "loss" in res.terms
        assert all(isinstance(v, float) for v in res.terms.values())
    model.eval()
    snap = strat.synthesize(model, loss_fn, *batches[0])
    assert snap is not None and not snap.embeddings.requires_grad


def test_train_end_to_end_with_embedding_expansion_stores_synthetic_points(tmp_path):
    from dml.config import RunConfig
    from dml.runs import open_run
    from dml.train import train

    cfg = RunConfig().with_overrides(["train.projections=none", 
        "data.name=digits", "loss.name=triplet", "mixing.name=embedding-expansion",
        "mixing.params.n=2", "train.epochs=1", "train.iterations_per_epoch=3",
        "model.params.width=8", "model.embedding_dim=16", "train.threads=1"])
    run = open_run(train(cfg, tmp_path, progress=False))
    assert run.status()["state"] == "finished"
    ev = run.load_eval(1)
    for key in ("embeddings", "membership", "parents", "weight", "hardest", "kind", "top_classes"):
        assert f"synthetic_{key}" in ev, key
    n_syn = len(ev["synthetic_embeddings"])
    assert n_syn > 0 and ev["synthetic_embeddings"].shape[1] == 16
    assert set(ev["synthetic_kind"].tolist()) == {"ee"}
    r = ev["synthetic_weight"]
    assert bool(((abs(r - 1 / 3) < 1e-6) | (abs(r - 2 / 3) < 1e-6)).all())
    assert run.metrics()[-1]["synthetic_points"] == n_syn
