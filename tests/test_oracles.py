"""Checks of the independent reference oracles (tests/oracles.py) against trusted references:
pytorch-metric-learning where it computes the same thing, hand-worked numbers otherwise."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from tests.oracles import (
    official_contrastive,
    official_hphn_triplet,
    official_metrix_embed_contrastive,
    official_metrix_embed_multisimilarity,
    official_ms_miner,
    official_multisimilarity,
    official_proxy_synthesis,
    official_symm_npair,
)

DTYPE = torch.float64
# Metrix main.py hyper-parameters for multi-similarity
MS = dict(alpha=17.97, beta=75.66, base=0.77)


def batch(labels, dim=8, seed=0):
    torch.manual_seed(seed)
    return torch.randn(len(labels), dim, dtype=DTYPE), torch.tensor(labels)


def value_and_grad(fn, emb):
    x = emb.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# ---------------------------------------------------------------- 1. contrastive (pml)

@pytest.mark.parametrize("pos_margin,neg_margin", [(0.0, 0.5), (0.2, 1.0)])
def test_contrastive_matches_pml(pos_margin, neg_margin):
    emb, y = batch([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    pml = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=LpDistance())
    v_o, g_o = value_and_grad(lambda x: official_contrastive(x, y, pos_margin, neg_margin), emb)
    v_p, g_p = value_and_grad(lambda x: pml(x, y), emb)
    assert v_o > 0
    torch.testing.assert_close(v_o, v_p)
    torch.testing.assert_close(g_o, g_p)


def test_contrastive_without_positives_is_undefined_like_official():
    emb, y = batch([0, 1, 2, 3])
    with pytest.raises(ValueError):
        official_contrastive(emb, y)


# ---------------------------------------------------------------- 2. Metrix/embed contrastive

def test_metrix_embed_contrastive_clean_part_is_pml_criterion():
    emb, y = batch([0, 0, 0, 1, 1, 2, 2, 2])
    clean, _ = official_metrix_embed_contrastive(emb, y, lam=0.37)
    torch.testing.assert_close(clean, ContrastiveLoss(neg_margin=0.5)(emb, y))


def test_metrix_embed_contrastive_lam_one_weights_first_positive_by_tuple_count():
    # lam = 1: mixed = e_pos, so every tuple (a, firstpos(a), n) has d = ||x_a - x_firstpos(a)||,
    # the neg part is (1 - 1) * relu(.) = 0 everywhere (AvgNonZero -> 0), and the pos part is
    # the mean over tuples. Anchor a yields npos(a) * nneg(a) tuples (once per positive pair),
    # all with its FIRST positive (smallest index of its class other than a).
    labels = [0, 0, 0, 1, 1, 2]          # npos: 2,2,2,1,1,0   nneg: 3,3,3,4,4,5
    emb, y = batch(labels, seed=3)
    d = LpDistance()(emb)
    num, den = 0.0, 0
    for a, ya in enumerate(labels):
        same = [j for j, yj in enumerate(labels) if yj == ya and j != a]
        nneg = sum(yj != ya for yj in labels)
        if same:
            w = len(same) * nneg
            num += w * d[a, same[0]]
            den += w
    _, mixed = official_metrix_embed_contrastive(emb, y, lam=1.0)
    torch.testing.assert_close(mixed, num / den)


def test_metrix_embed_contrastive_small_hand_case():
    # labels [0, 0, 1]: pos pairs (0,1),(1,0); tuples (0, 1, 2) and (1, 0, 2).
    # mixed_0 = lam e1 + (1-lam) e2, mixed_1 = lam e0 + (1-lam) e2; d_t = ||x_a - x(mixed_t)||.
    emb, y = batch([0, 0, 1], dim=4, seed=5)
    lam = 0.3
    x = F.normalize(emb, dim=1)
    m0 = F.normalize(lam * emb[1] + (1 - lam) * emb[2], dim=0)
    m1 = F.normalize(lam * emb[0] + (1 - lam) * emb[2], dim=0)
    d = torch.stack([(x[0] - m0).norm(), (x[1] - m1).norm()])
    pos = lam * d                                   # all > 0
    neg = (1 - lam) * F.relu(0.5 - d)
    expect = pos.mean() + (neg[neg > 0].mean() if (neg > 0).any() else 0.0)
    _, mixed = official_metrix_embed_contrastive(emb, y, lam=lam)
    torch.testing.assert_close(mixed, torch.as_tensor(expect, dtype=DTYPE))


# ---------------------------------------------------------------- 3. MS miner (pml)

@pytest.mark.parametrize("epsilon", [0.1, 0.39])
def test_ms_miner_matches_pml(epsilon):
    emb, y = batch([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], dim=6, seed=1)
    ours = official_ms_miner(emb, y, epsilon)
    ref = MultiSimilarityMiner(epsilon=epsilon)(emb, y)
    pairs = lambda a, b: set(zip(a.tolist(), b.tolist()))  # noqa: E731
    assert pairs(ours[0], ours[1]) == pairs(ref[0], ref[1])
    assert pairs(ours[2], ours[3]) == pairs(ref[2], ref[3])
    # the order matters to Metrix ("first positive"): ascending similarity within each anchor
    for o, r in zip(ours, ref):
        assert torch.equal(o, r)
    # the miner actually drops pairs here (otherwise the test would be weak)
    n_pos = sum((y[:, None] == y[None, :]).sum(1) - 1).item()
    assert len(ours[0]) < n_pos or len(ours[2]) < len(y) ** 2 - n_pos - len(y)


def test_ms_miner_without_negatives_is_empty():
    emb, y = batch([1, 1, 1, 1])
    assert all(len(t) == 0 for t in official_ms_miner(emb, y, 0.1))


# ---------------------------------------------------------------- 4. multi-similarity (pml)

def test_multisimilarity_matches_pml_with_miner_pairs():
    emb, y = batch([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], dim=6, seed=2)
    eps = 0.39
    pml = MultiSimilarityLoss(**MS)
    # pml's default reducer for MultiSimilarityLoss is MeanReducer: torch.mean over ALL anchors
    # (rows with no mined pair contribute 0), which is exactly the official torch.mean.
    assert type(pml.reducer).__name__ == "MeanReducer"
    idx = MultiSimilarityMiner(epsilon=eps)(emb, y)
    v_o, g_o = value_and_grad(lambda x: official_multisimilarity(x, y, epsilon=eps, **MS), emb)
    v_p, g_p = value_and_grad(lambda x: pml(x, y, indices_tuple=idx), emb)
    assert v_o > 0
    torch.testing.assert_close(v_o, v_p)
    torch.testing.assert_close(g_o, g_p)


# ---------------------------------------------------------------- 5. Metrix/embed MS

def test_metrix_embed_multisimilarity_hand_tuples():
    # B = 4, labels [0,0,1,1], epsilon = 2 keeps every pair. a1 = [0,1,2,3], partner(t) = t^1;
    # negatives of anchor a in ascending similarity: negs[a] = (n_a0, n_a1).
    # Tuples (a1 order, 2 per anchor): k = 2a + r -> (a, partner(a), negs[a][r]); T = 8.
    # Positive row t < 4: clean = lam (1 + exp(alpha (base - s[t, t^1])));
    #   mask_mix[t, firstpos(t) = t^1] = lam -> mixed column u = t^1 (a TUPLE index), read with
    #   the anchor of TUPLE t (= t // 2): mix = 1 + exp(alpha (base - cos(e[t//2], mixed_u))),
    #   mixed_u = lam e[partner(u//2)] + (1-lam) e[negs[u//2][u%2]].
    # Negative row t < 4: (1-lam) (1 + sum_n exp(beta (s[t, n] - base))); mixed term always 0.
    # Rows 4..7 are log(0) -> 0, and the mean divides by T = 8.
    emb, y = batch([0, 0, 1, 1], dim=5, seed=4)
    lam, alpha, beta, base = 0.6, MS["alpha"], MS["beta"], MS["base"]
    x = F.normalize(emb, dim=1)
    s = x @ x.T
    other = {0: [2, 3], 1: [2, 3], 2: [0, 1], 3: [0, 1]}
    negs = {a: sorted(other[a], key=lambda j: s[a, j].item()) for a in range(4)}
    total = 0.0
    for t in range(4):
        clean = lam * (1 + torch.exp(alpha * (base - s[t, t ^ 1])))
        u = t ^ 1
        mixed = lam * emb[(u // 2) ^ 1] + (1 - lam) * emb[negs[u // 2][u % 2]]
        mix = 1 + torch.exp(alpha * (base - x[t // 2] @ F.normalize(mixed, dim=0)))
        neg = (1 - lam) * (1 + sum(torch.exp(beta * (s[t, n] - base)) for n in other[t]))
        total = total + torch.log(clean + 0.4 * mix) / alpha + torch.log(neg) / beta
    expect = total / 8
    got = official_metrix_embed_multisimilarity(emb, y, epsilon=2.0, lam=lam, **MS)
    torch.testing.assert_close(got, expect)


def test_metrix_embed_multisimilarity_gradients_finite():
    emb, y = batch([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], dim=6, seed=6)
    v, g = value_and_grad(
        lambda e: official_metrix_embed_multisimilarity(e, y, epsilon=0.39, lam=0.45, **MS), emb)
    assert torch.isfinite(v) and torch.isfinite(g).all()


# ---------------------------------------------------------------- 6. EE HPHN triplet

HPHN_EMB = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 2.0]], dtype=DTYPE)
HPHN_Y = torch.tensor([0, 0, 1, 1])


def test_hphn_triplet_hand_worked_no_expansion():
    # x0=(0,0) x1=(1,0) | x2=(0,2) x3=(3,2); labels 0,0,1,1; margin 1.5.
    # d01=1, d02=2, d03=sqrt13=3.6056, d12=sqrt5=2.2361, d13=sqrt8=2.8284, d23=3 (d_ii=1e-6).
    # anchor 0: ap=d01=1, an=min(d02,d03)=2          -> 1-2+1.5        = 0.5
    # anchor 1: ap=1,     an=min(d12,d13)=sqrt5      -> 1-sqrt5+1.5    = 0.263932
    # anchor 2: ap=d23=3, an=min(d02,d12)=2          -> 3-2+1.5        = 2.5
    # anchor 3: ap=3,     an=min(d03,d13)=sqrt8      -> 3-sqrt8+1.5    = 1.671573
    expect = torch.tensor([0.5, 2.5 - math.sqrt(5), 2.5, 4.5 - math.sqrt(8)], dtype=DTYPE)
    got = official_hphn_triplet(HPHN_EMB, HPHN_Y, n_inner_pts=0, margin=1.5)
    torch.testing.assert_close(got, expect)
    # margin 0.2: anchors 0 and 1 are satisfied (relu -> 0)
    got = official_hphn_triplet(HPHN_EMB, HPHN_Y, n_inner_pts=0, margin=0.2)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 1.2, 3.2 - math.sqrt(8)],
                                                 dtype=DTYPE))


def test_hphn_triplet_hand_worked_one_inner_point():
    # n_inner_pts=1, l2_norm=False: inner = (x_swap + x)/2 -> s0=s1=(0.5,0), s2=s3=(1.5,2),
    # appended with labels 0,0,1,1. ap over the original 4x4 block only: [1, 1, 3, 3].
    # an_i = min(hardest neg of x_i, hardest neg of s_i) over all 8 points:
    #   x0: min(2, sqrt13, |x0-(1.5,2)|=2.5)=2         s0: min(sqrt4.25, sqrt10.25, sqrt5)=sqrt4.25
    #   x1: min(sqrt5, sqrt8, sqrt4.25)=sqrt4.25       s1: sqrt4.25
    #   x2: min(2, sqrt5, sqrt4.25)=2                  s2: min(2.5, sqrt4.25, sqrt5)=sqrt4.25
    #   x3: min(sqrt13, sqrt8, sqrt10.25)=sqrt8        s3: sqrt4.25
    # an = [2, sqrt4.25, 2, sqrt4.25]; margin 1.5 -> [0.5, 2.5-sqrt4.25, 2.5, 4.5-sqrt4.25]
    r = math.sqrt(4.25)
    expect = torch.tensor([0.5, 2.5 - r, 2.5, 4.5 - r], dtype=DTYPE)
    got = official_hphn_triplet(HPHN_EMB, HPHN_Y, n_inner_pts=1, margin=1.5, l2_norm=False)
    torch.testing.assert_close(got, expect)


def test_hphn_triplet_duplicate_synthetic_negative_gets_mxnet_tie_gradient():
    # x0=(0,0) x1=(0,-1) | x2=(1,1) x3=(1,-1); n_inner_pts=1, l2_norm=False, margin 1.
    # The synthetic points of x2 and x3 are both m=(1,0) (bit-identical: same two products
    # summed). Row x0: negatives x2, x3 at sqrt2, m twice at 1 -> a tie; row s0=(0,-0.5):
    # hardest negative sqrt1.25 > 1, so an_0 = d(x0, m) = 1; ap_0 = d01 = 1; loss_0 = 1.
    # MXNet's min backward gives EACH tied copy the full gradient (checked with MXNet 1.9.1):
    #   d loss_0 / d x0 = (x0 - x1)/1 + 2 * (m - x0)/1 = (0,1) + (2,0) = (2, 1)
    #   d loss_0 / d x1 = (x1 - x0)/1 = (0, -1)
    #   d loss_0 / d x2 = d loss_0 / d x3 = 2 copies * (1/2) * (x0 - m)/1 = (-1, 0)
    emb = torch.tensor([[0.0, 0.0], [0.0, -1.0], [1.0, 1.0], [1.0, -1.0]], dtype=DTYPE,
                       requires_grad=True)
    loss = official_hphn_triplet(emb, HPHN_Y, n_inner_pts=1, margin=1.0, l2_norm=False)
    torch.testing.assert_close(loss.detach(), torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=DTYPE))
    loss[0].backward()
    torch.testing.assert_close(
        emb.grad, torch.tensor([[2.0, 1.0], [0.0, -1.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=DTYPE))


def test_hphn_triplet_asserts_even_runs_when_expanding():
    emb, y = batch([0, 0, 0, 1, 1, 1], dim=3)
    with pytest.raises(AssertionError):
        official_hphn_triplet(emb, y, n_inner_pts=2, margin=0.1)
    official_hphn_triplet(emb, y, n_inner_pts=0, margin=0.1)  # no augmentation, no assert


# ---------------------------------------------------------------- 7. symmetrical synthesis

def test_symm_npair_hand_worked_2d():
    # pair 0: A=(2,0) P=(1,1): S1 = P reflected about A's line = (1,-1); S2 = A about P's = (0,2)
    # pair 1: A=(0,1) P=(1,2): S1 = (-1,2); S2 = 2 (A.V)V - A = (0.8,0.6), V = (1,2)/sqrt5
    # logits[i,j] = max(Ai.Pj, Ai.S1j, Ai.S2j, Pi.S1j, Pi.S2j, S1i.S2j):
    #   [0,0] = max(2, 2, 0, 0, 2, -2)        = 2
    #   [0,1] = max(2, -2, 1.6, 1, 1.4, 0.2)  = 2
    #   [1,0] = max(1, -1, 2, -1, 4, 4)       = 4
    #   [1,1] = max(2, 2, 0.6, 3, 2, 0.4)     = 3   (P.S1 = |P|^2 cos 2theta > A.P: |P| > |A|)
    # loss = mean(log(e^2+e^2) - 2, log(e^4+e^3) - 3) = (log 2 + 1 + log(1+e^-1)) / 2
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DTYPE)
    P = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=DTYPE)
    loss, logits = official_symm_npair(A, P, torch.tensor([0, 1]))
    torch.testing.assert_close(logits, torch.tensor([[2.0, 2.0], [4.0, 3.0]], dtype=DTYPE))
    expect = (math.log(2) + 1 + math.log(1 + math.exp(-1))) / 2
    torch.testing.assert_close(loss, torch.tensor(expect, dtype=DTYPE))


def test_symm_npair_diagonal_is_anchor_dot_pos():
    # A.S1 = A.(2R - P) = A.P identically, so diag >= a.p always; with unit rows and
    # cos(a,p) >= 0 the other four entries (|a|^2 cos2t, cos t, |a||p| cos3t, ...) are <= cos t,
    # so diag == a.p exactly (up to rounding).
    torch.manual_seed(7)
    N, D = 6, 5
    a = torch.randn(N, D, dtype=DTYPE)
    p = a + 0.4 * torch.randn(N, D, dtype=DTYPE)
    an, pn = F.normalize(a, dim=1), F.normalize(p, dim=1)
    assert ((an * pn).sum(1) > 0).all()
    _, logits = official_symm_npair(a, p, torch.arange(N), l2_norm=True)
    torch.testing.assert_close(torch.diagonal(logits), (an * pn).sum(1))
    # without normalisation: still >= a.p on the diagonal
    p2 = 3.0 * torch.rand(N, 1, dtype=DTYPE) * p
    _, logits = official_symm_npair(a, p2, torch.arange(N))
    assert (torch.diagonal(logits) >= (a * p2).sum(1) - 1e-12).all()


def test_symm_npair_unique_labels_is_cross_entropy_of_logits():
    torch.manual_seed(8)
    a, p = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, 4, dtype=DTYPE)
    loss, logits = official_symm_npair(a, p, torch.arange(5))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(5)))
    # repeated labels: soft targets spread evenly over same-label columns
    y = torch.tensor([0, 0, 1, 2, 2])
    loss, logits = official_symm_npair(a, p, y)
    tgt = (y[:, None] == y[None, :]).to(DTYPE)
    tgt = tgt / tgt.sum(1, keepdim=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, tgt))


# ---------------------------------------------------------------- 8. proxy synthesis

def ps_batch(B=8, C=10, D=6, seed=9):
    torch.manual_seed(seed)
    y = torch.randperm(C)[:B]                   # one image per class: adjacent labels differ
    return torch.randn(B, D, dtype=DTYPE), y, torch.randn(C, D, dtype=DTYPE)


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_proxy_synthesis_lam_one_is_softmax_with_duplicated_proxies(mu):
    # lam = 1: input_aug = x (roll weight 0), proxy_aug_i = P[y_i], pseudo target C + i.
    # Keep m = int(B * mu) synthetic rows/proxies. Every row (real i, or synthetic k < m)
    # sees the C proxies plus copies P[y_0..y_{m-1}]; synthetic row k's target C + k is the
    # copy of P[y_k], so it has the same loss as real row k:
    #   L_i = logsumexp(s [x_i.P, x_i.P[y_0..y_{m-1}]]) - s x_i.P[y_i]
    #   loss = (sum_{i<B} L_i + sum_{k<m} L_k) / (B + m).
    emb, y, prox = ps_batch()
    B, scale = len(y), 23.0
    m = int(B * mu)

    def expect_fn(e):
        x, P = F.normalize(e, dim=1), F.normalize(prox, dim=1)
        logits = scale * x @ torch.cat([P, P[y[:m]]]).T
        L = torch.logsumexp(logits, 1) - scale * (x * P[y]).sum(1)
        return (L.sum() + L[:m].sum()) / (B + m)

    v_o, g_o = value_and_grad(lambda e: official_proxy_synthesis(e, y, prox, 1.0, mu), emb)
    v_e, g_e = value_and_grad(expect_fn, emb)
    torch.testing.assert_close(v_o, v_e)
    torch.testing.assert_close(g_o, g_e)


def test_proxy_synthesis_mu_zero_is_plain_loss():
    emb, y, prox = ps_batch()
    x, P = F.normalize(emb, dim=1), F.normalize(prox, dim=1)
    got = official_proxy_synthesis(emb, y, prox, lam=0.3, mu=0.0, scale=23.0)
    torch.testing.assert_close(got, F.cross_entropy(23.0 * x @ P.T, y))
    got = official_proxy_synthesis(emb, y, prox, lam=0.3, mu=0.0, loss="proxy_nca", scale=10.0)
    expect = F.cross_entropy(-10.0 * torch.cdist(x, P) ** 2, y)
    torch.testing.assert_close(got, expect)


def test_proxy_synthesis_mixes_with_previous_row():
    # lam = 0.5, mu = 1, B = 2: the synthetic row 0 mixes x_0 with x_1 (roll by 1, cyclic),
    # row 1 mixes x_1 with x_0 -> both synthetic embeddings equal normalize(x_0 + x_1); their
    # proxies C, C+1 both equal normalize(P[y_0] + P[y_1]).
    emb, y, prox = ps_batch(B=2, C=3, D=4)
    x, P = F.normalize(emb, dim=1), F.normalize(prox, dim=1)
    xs = F.normalize(x[0] + x[1], dim=0)
    ps = F.normalize(P[y[0]] + P[y[1]], dim=0)
    allP = torch.cat([P, ps[None], ps[None]])
    X = torch.cat([x, xs[None], xs[None]])
    tgt = torch.cat([y, torch.tensor([3, 4])])
    expect = F.cross_entropy(23.0 * X @ allP.T, tgt)
    got = official_proxy_synthesis(emb, y, prox, lam=0.5, mu=1.0)
    torch.testing.assert_close(got, expect)
