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
from dml.mixing.expansion import (
    expand_embeddings,
    hardest_negative_pairs,
    same_class_pairs,
    synthetic_pair_loss,
)
from dml.mixing.synthesis import (
    mix_with_proxies,
    proxy_partners,
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
    pts, lab, parents, ratio = expand_embeddings(emb, labels, n=n, normalize=False)
    i, j = parents[:, 0], parents[:, 1]
    expected = ratio[:, None] * emb[i] + (1 - ratio[:, None]) * emb[j]
    torch.testing.assert_close(pts, expected)
    # every pair gets exactly the ratios k / (n + 1), k = 1..n
    per_pair = (ratio * (n + 1)).reshape(-1, n).sort(1).values
    torch.testing.assert_close(per_pair, torch.arange(1, n + 1, dtype=ratio.dtype).expand_as(per_pair))
    assert torch.equal(lab, labels[i]) and torch.equal(labels[i], labels[j])
    # normalised: unit norm and the same direction
    pts_n, *_ = expand_embeddings(emb, labels, n=n, normalize=True)
    torch.testing.assert_close(pts_n.norm(dim=1), torch.ones(len(pts_n), dtype=pts_n.dtype))
    torch.testing.assert_close(pts_n, F.normalize(pts, dim=1))


def test_ee_hand_worked_points():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pts, lab, parents, ratio = expand_embeddings(emb, torch.tensor([3, 3]), n=2, normalize=False)
    # x_k = (k x_j + (3 - k) x_i) / 3, k = 1, 2
    torch.testing.assert_close(pts, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(ratio, torch.tensor([2 / 3, 1 / 3]))
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
    pts, lab, parents, ratio = symmetric_points(emb, labels)
    assert len(pts) == 2 * 3 * 6 and torch.equal(lab, labels[parents[:, 0]])
    # ratio 1: reflection of parent 0 about parent 1; ratio 0: of parent 1 about parent 0
    src = torch.where(ratio == 1, parents[:, 0], parents[:, 1])
    axis = torch.where(ratio == 1, parents[:, 1], parents[:, 0])
    torch.testing.assert_close(pts.norm(dim=1), emb[src].norm(dim=1))
    torch.testing.assert_close((pts * emb[axis]).sum(1), (emb[src] * emb[axis]).sum(1))
    assert not torch.allclose(pts, emb[src])


def test_symmetrical_hand_worked_2d():
    xk = torch.tensor([[1.0, 0.0]])
    xl = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    # r = (xk . xl^) xl^ = (1/2, 1/2); x'_k = 2 r - xk = (0, 1)
    torch.testing.assert_close(reflect(xk, xl), torch.tensor([[0.0, 1.0]]))
    pts, _, parents, ratio = symmetric_points(torch.cat([xk, xl]), torch.tensor([0, 0]))
    torch.testing.assert_close(pts, torch.tensor([[0.0, 1.0], [1 / math.sqrt(2), -1 / math.sqrt(2)]]))
    assert parents.tolist() == [[0, 1], [0, 1]] and ratio.tolist() == [1.0, 0.0]
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


def test_strategy_hardest_flags_mark_the_mined_synthetic_points():
    torch.manual_seed(0)
    emb, labels = pk_batch(3, 4, d=3, seed=5)
    pts, plab, *_ = expand_embeddings(emb, labels, n=3)
    loss_fn = build_loss("triplet")
    _, hardest, frac = synthetic_pair_loss(loss_fn, emb, labels, pts, plab)
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    ends = set()
    for c, c2 in itertools.permutations(range(3), 2):
        ends.update(brute_force_hardest(allp, alll, c, c2)[1])
    expected = {e - len(emb) for e in ends if e >= len(emb)}
    assert set(torch.nonzero(hardest).flatten().tolist()) == expected
    assert 0.0 <= float(frac) <= 1.0


def test_hphn_triplet_takes_the_hardest_positive_among_originals_only():
    # class 0: a, b, c with b, c at 100 degrees from a; the normalised points between b and c
    # lie near -a, so a synthetic positive would be the hardest positive (similarity ~ -0.47).
    t = math.radians(100)
    a, b, c = [1.0, 0.0, 0.0], [math.cos(t), math.sin(t), 0.0], [math.cos(t), -math.sin(t), 0.0]
    d, e = [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]                     # class 1
    emb = torch.tensor([a, b, c, d, e], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    pts, plab, *_ = expand_embeddings(emb, labels, n=2)
    s = emb @ emb.T
    syn_pos = (emb[0] @ pts[plab == 0].T).min()
    assert float(syn_pos) < float(s[0, 1:3].min()) - 0.2         # the trap is set
    margin = 5.0                                                 # every triplet active
    loss_fn = build_loss("triplet", margin=margin)               # batch-hard
    loss, *_ = synthetic_pair_loss(loss_fn, emb, labels, pts, plab)
    allp, alll = torch.cat([emb, pts]), torch.cat([labels, plab])
    h01, _ = brute_force_hardest(allp, alll, 0, 1)               # one hardest negative pair
    expected = []
    for i in range(5):
        pos = [float(s[i, j]) for j in range(5) if j != i and labels[j] == labels[i]]
        expected.append(h01 - min(pos) + margin)
    assert math.isclose(float(loss), sum(expected) / 5, rel_tol=1e-9)
    torch.testing.assert_close(loss_fn.last_terms["an"], torch.tensor(h01, dtype=torch.float64))


def test_point_negatives_equal_the_loss_forward_with_a_mask():
    emb, labels = pk_batch(4, 4, d=6, seed=2)
    pts, plab, *_ = expand_embeddings(emb, labels, n=2)
    for name in PAIR_LOSSES:
        loss_fn = build_loss(name)
        got, hardest, _ = synthetic_pair_loss(loss_fn, emb, labels, pts, plab, negatives="point")
        refs, ref_labels = torch.cat([emb, pts]), torch.cat([labels, plab])
        mask = torch.cat([~torch.eye(16, dtype=torch.bool), labels[:, None] != plab[None, :]], 1)
        want = build_loss(name)(emb, labels, refs, ref_labels, mask=mask)
        torch.testing.assert_close(got, want)
        assert hardest.shape == (len(pts),)


# --------------------------------------------------------------------------- proxy synthesis


def test_proxy_partners_are_of_another_class():
    for labels in (torch.arange(4).repeat_interleave(8), torch.tensor([2, 0, 1, 0, 2, 1, 1, 0]),
                   torch.arange(2).repeat(5)):
        partner = proxy_partners(labels)
        assert bool((labels[partner] != labels).all())


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


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_proxy_synthesis_adds_one_class_and_proxy_per_mixture(mu):
    torch.manual_seed(0)
    c, b, d = 6, 16, 5
    labels = torch.arange(4).repeat_interleave(4)
    x = torch.randn(b, d)
    strat = build_mixing("proxy-synthesis", "normalized-softmax", mu=mu)
    loss_fn = build_loss("normalized-softmax", num_classes=c, embedding_dim=d)
    seen = {}

    def hook(module, args, kwargs):
        seen["emb"], seen["labels"] = args
        seen["proxies"] = kwargs["proxies"]

    loss_fn.register_forward_pre_hook(hook, with_kwargs=True)
    strat.draw_lambda = lambda: 0.25
    res = strat.step(Identity(), loss_fn, x, labels)
    s = int(b * mu)
    syn = res.synthetic
    assert len(syn) == s and seen["proxies"].shape == (c + s, d) and seen["emb"].shape == (b + s, d)
    assert seen["labels"].tolist() == labels.tolist() + list(range(c, c + s))
    i, j = syn.parents[:, 0], syn.parents[:, 1]
    assert bool((labels[i] != labels[j]).all())
    ph = F.normalize(loss_fn.proxies.detach(), dim=1)
    torch.testing.assert_close(seen["proxies"][:c].detach(), ph)
    torch.testing.assert_close(seen["proxies"][c:].detach(), 0.25 * ph[labels[i]] + 0.75 * ph[labels[j]])
    # membership over the real classes: the lambda-mix of the two parents' classes
    want = 0.25 * F.one_hot(labels[i], c) + 0.75 * F.one_hot(labels[j], c)
    torch.testing.assert_close(syn.labels, want.float())
    torch.testing.assert_close(syn.ratio, torch.full((s,), 0.25))
    assert syn.kind == "proxy-synthesis" and math.isfinite(res.terms["loss"])
    # lambda forced to 1: every synthetic embedding is its parent 0
    strat.draw_lambda = lambda: 1.0
    res = strat.step(Identity(), loss_fn, x, labels)
    emb = F.normalize(x, dim=1)
    torch.testing.assert_close(res.synthetic.embeddings, emb[res.synthetic.parents[:, 0]])


def test_proxy_synthesis_lambda_is_beta_distributed():
    torch.manual_seed(0)
    strat = build_mixing("proxy-synthesis", "proxy-anchor", alpha=0.4)
    lams = torch.tensor([strat.draw_lambda() for _ in range(2000)])
    assert 0.0 <= float(lams.min()) and float(lams.max()) <= 1.0
    assert abs(float(lams.mean()) - 0.5) < 0.05
    assert abs(float(lams.var()) - 0.25 / 1.8) < 0.03        # Beta(a, a) variance 1 / (4 (2a + 1))


# --------------------------------------------------------------------------- registry


def test_unsupported_pairs_and_bad_parameters_raise():
    with pytest.raises(ValueError, match="embedding-expansion: triplet, lifted-structure"):
        build_mixing("embedding-expansion", "proxy-anchor")
    with pytest.raises(ValueError, match="proxy-synthesis: normalized-softmax"):
        build_mixing("symmetrical-synthesis", "contrastive")
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
        assert len(syn) > 0 and syn.labels.shape == (len(syn), c)
        assert syn.parents.shape == (len(syn), 2) and syn.ratio.shape == (len(syn),)
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
    for key in ("embeddings", "membership", "parents", "ratio", "hardest", "kind", "top_classes"):
        assert f"synthetic_{key}" in ev, key
    n_syn = len(ev["synthetic_embeddings"])
    assert n_syn > 0 and ev["synthetic_embeddings"].shape[1] == 16
    assert set(ev["synthetic_kind"].tolist()) == {"ee"}
    r = ev["synthetic_ratio"]
    assert bool(((abs(r - 1 / 3) < 1e-6) | (abs(r - 2 / 3) < 1e-6)).all())
    assert run.metrics()[-1]["synthetic_points"] == n_syn
