"""Metrix (input / feature / embedding mixing): pair construction, mixed labels, the compact
embedding-level loss against the plain masked loss, and training on digits."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dml.losses import build_loss, pair_targets
from dml.mixing import build_mixing, list_mixings, supported_pairs
from dml.mixing.metrix import mixed_similarities
from dml.models import small_cnn

METRIX = ["metrix-input", "metrix-feature", "metrix-embed"]
LOSSES = ["contrastive", "multi-similarity", "proxy-anchor", "proxy-nca++"]


class UnitNet(nn.Module):
    """'Images' are the embeddings: L2-normalises its input (for embedding-level tests)."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def loss(name, num_classes=6, dim=16):
    torch.manual_seed(123)
    return build_loss(name, num_classes=num_classes, embedding_dim=dim)


def batch(labels, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    return torch.randn(len(y), dim, generator=g), y


@pytest.fixture(scope="module")
def digits():
    from dml.data import load_dataset
    from dml.data.transforms import make_transform

    ds = load_dataset("digits")
    y_all = torch.searchsorted(ds.train.classes(), ds.train.labels)
    idx = torch.cat([torch.nonzero(y_all == c).flatten()[:6] for c in range(4)])
    x = make_transform(ds, train=False)(ds.train.load(idx))
    return x, y_all[idx]


def cnn(seed=0):
    torch.manual_seed(seed)
    return small_cnn(in_channels=1, image_size=8, embedding_dim=16, width=16)


def step(name, loss_fn, x, y, model=None, seed=0, **params):
    s = build_mixing(name, loss_fn_name(loss_fn), **params)
    torch.manual_seed(seed)
    r = s.step(model if model is not None else UnitNet(), loss_fn, x, y)
    return s, r


def loss_fn_name(loss_fn):
    return {"ContrastiveLoss": "contrastive", "MultiSimilarityLoss": "multi-similarity",
            "ProxyAnchorLoss": "proxy-anchor",
            "ProxyNCAPlusPlusLoss": "proxy-nca++"}[type(loss_fn).__name__]


# ------------------------------------------------------------------------ registry, params

def test_registered_with_every_soft_label_loss_and_start_up_errors():
    from dml.losses import list_losses

    assert set(METRIX) <= set(list_mixings())
    pairs = set(supported_pairs())
    assert {(m, l) for m in METRIX for l in list_losses()} <= pairs   # every Tango loss is soft
    with pytest.raises(ValueError, match="unknown mixing strategy 'metrix'; valid names: none, "):
        build_mixing("metrix", "contrastive")
    for bad in ({"pairs": "pos-x"}, {"lambda_per": "epoch"}, {"alpha": 0.0},
                {"mixed_per_anchor": 0}, {"negatives": "easiest"}, {"fixed_lambda": 1.5}):
        with pytest.raises(ValueError):
            build_mixing("metrix-input", "contrastive", **bad)
    with pytest.raises(ValueError, match="stage"):
        build_mixing("metrix-feature", "contrastive", stage=-1)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_mixing("metrix-embed", "contrastive", stage=2)   # stage is feature-only


# ------------------------------------------------------------------------ mixed labels

@pytest.mark.parametrize("name", ["metrix-embed", "metrix-input"])
@pytest.mark.parametrize("lambda_per", ["batch", "pair"])
def test_mixed_label_relative_to_its_anchor_is_lambda(name, lambda_per):
    x, y = batch([0, 0, 0, 1, 1, 2, 2, 2, 3])
    model = None if name == "metrix-embed" else nn.Sequential(nn.Flatten(), UnitNet())
    s, r = step(name, loss("contrastive"), x, y, model=model, lambda_per=lambda_per)
    plan, syn = s.last_plan, r.synthetic
    targets = pair_targets(y, syn.membership)                         # (A, U)
    lam = syn.weight[plan.pair]
    torch.testing.assert_close(targets[plan.anchor, plan.pair], lam)
    assert ((lam > 0) & (lam < 1)).all()
    if lambda_per == "batch":
        assert torch.unique(syn.weight).numel() == 1
    else:
        assert torch.unique(syn.weight).numel() == len(syn) > 1


@pytest.mark.parametrize("loss_name", ["contrastive", "multi-similarity"])
@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_lambda_one_or_zero_gives_the_loss_on_the_parents_themselves(loss_name, lam):
    x, y = batch([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    lf = loss(loss_name)
    s, r = step("metrix-embed", lf, x, y, fixed_lambda=lam)
    e = F.normalize(x, dim=1)
    plan, syn = s.last_plan, r.synthetic
    parent = syn.parents[:, 0 if lam == 1.0 else 1]
    torch.testing.assert_close(syn.embeddings, e[parent])           # the mixed points are parents
    ref = lf(e, y, ref_embeddings=e[parent], ref_labels=y[parent], mask=plan.mask(len(y)))
    assert r.terms["mixed"] == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert r.terms["clean"] == pytest.approx(float(lf(e, y)), rel=1e-6)
    assert r.terms["loss"] == pytest.approx(r.terms["clean"] + 0.4 * r.terms["mixed"], rel=1e-6)
    assert {"clean_pos", "clean_neg", "mixed_pos", "mixed_neg"} <= set(r.terms)


def test_lambda_one_at_input_level_embeds_the_positives(digits):
    x, y = digits
    model = cnn().eval()                                   # BN on running stats: row-independent
    lf = loss("contrastive")
    s, r = step("metrix-input", lf, x, y, model=model, fixed_lambda=1.0)
    f = r.synthetic.parents[:, 0]
    with torch.no_grad():
        clean = model(x)
    torch.testing.assert_close(r.synthetic.images, x[f])
    torch.testing.assert_close(r.synthetic.embeddings, clean[f], atol=1e-5, rtol=1e-5)
    ref = lf(clean, y, ref_embeddings=clean[f], ref_labels=y[f], mask=s.last_plan.mask(len(y)))
    assert r.terms["mixed"] == pytest.approx(float(ref), rel=1e-4)


# ------------------------------------------------------------------------ embedding level

def test_mixed_similarities_match_the_mixed_vectors():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(7, 5, generator=g)                    # not normalised: the formula is exact
    first = torch.randint(0, 7, (7, 2), generator=g)
    lam = torch.rand(7, 2, 7, generator=g)
    got = mixed_similarities(e @ e.T, first, lam)
    m = lam[..., None] * e[first][:, :, None, :] + (1 - lam[..., None]) * e[None, None, :, :]
    want = torch.einsum("ad,ajgd->ajg", e, F.normalize(m, dim=-1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_embedding_mixes_lie_on_the_normalised_segment():
    x, y = batch([0, 0, 1, 1, 2, 2, 2])
    _s, r = step("metrix-embed", loss("contrastive"), x, y, lambda_per="pair")
    e = F.normalize(x, dim=1)
    syn = r.synthetic
    f, g, lam = syn.parents[:, 0], syn.parents[:, 1], syn.weight[:, None]
    v = lam * e[f] + (1 - lam) * e[g]                     # before normalisation
    torch.testing.assert_close(syn.embeddings * v.norm(dim=1, keepdim=True), v)
    torch.testing.assert_close(syn.embeddings.norm(dim=1), torch.ones(len(syn)))


@pytest.mark.parametrize("loss_name", ["contrastive", "multi-similarity"])
@pytest.mark.parametrize("pairs,first_parents", [("pos-neg", "one"), ("pos-neg", "all"),
                                                 ("pos-pos", "one"), ("neg-neg", "all")])
def test_compact_embedding_loss_equals_the_masked_loss(loss_name, pairs, first_parents):
    """The O(B^2) embedding-level loss = loss_fn(clean, labels, mixed, memberships, mask), value
    and gradient."""
    x, y = batch([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4])
    lf = loss(loss_name)
    x1 = x.clone().requires_grad_()
    s, r = step("metrix-embed", lf, x1, y, pairs=pairs, first_parents=first_parents,
                lambda_per="pair")
    r.loss.backward()
    plan, syn = s.last_plan, r.synthetic
    x2 = x.clone().requires_grad_()
    e = F.normalize(x2, dim=1)
    f, g = syn.parents[:, 0], syn.parents[:, 1]
    m = F.normalize(syn.weight[:, None] * e[f] + (1 - syn.weight[:, None]) * e[g], dim=1)
    mixed = lf(e, y, ref_embeddings=m, ref_labels=syn.membership, mask=plan.mask(len(y)))
    total = lf(e, y) + 0.4 * mixed
    total.backward()
    assert r.terms["mixed"] == pytest.approx(float(mixed.detach()), rel=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------ pair policy

def tuples(s, syn):
    p = s.last_plan
    return p.anchor, syn.parents[p.pair, 0], syn.parents[p.pair, 1]


def test_pos_neg_parents_and_the_anchor_negative_fallback():
    x, y = batch([0, 0, 0, 1, 1, 2, 3, 4])     # classes 2, 3, 4 are singletons
    s, r = step("metrix-embed", loss("contrastive"), x, y)
    a, f, g = tuples(s, r.synthetic)
    has_pos = torch.tensor([(y == y[i]).sum() > 1 for i in range(len(y))])
    assert (y[g] != y[a]).all()
    assert ((y[f] == y[a]) & (f != a))[has_pos[a]].all()
    assert (f == a)[~has_pos[a]].all()          # no positive: the anchor mixes itself
    # every anchor sees its one first parent with every negative (official embedding rule)
    for i in range(len(y)):
        assert len(set(f[a == i].tolist())) == 1
        assert set(g[a == i].tolist()) == set(torch.nonzero(y != y[i]).flatten().tolist())
    targets = pair_targets(y, r.synthetic.membership)[a, s.last_plan.pair]
    torch.testing.assert_close(targets, r.synthetic.weight[s.last_plan.pair])


def test_pos_pos_labels_one_and_neg_neg_labels_zero():
    x, y = batch([0, 0, 0, 1, 1, 2, 2, 2])
    s, r = step("metrix-embed", loss("contrastive"), x, y, pairs="pos-pos")
    a, f, g = tuples(s, r.synthetic)
    assert ((y[f] == y[a]) & (y[g] == y[a]) & (f != g) & (f != a)).all()
    only_one = torch.tensor([(y == y[i]).sum() == 2 for i in range(len(y))])[a]
    assert (g == a)[only_one].all() and (g != a)[~only_one].all()
    torch.testing.assert_close(pair_targets(y, r.synthetic.membership)[a, s.last_plan.pair],
                               torch.ones(len(a)))
    s, r = step("metrix-embed", loss("contrastive"), x, y, pairs="neg-neg")
    a, f, g = tuples(s, r.synthetic)
    assert ((y[f] != y[a]) & (y[g] != y[a]) & (f != g)).all()
    torch.testing.assert_close(pair_targets(y, r.synthetic.membership)[a, s.last_plan.pair],
                               torch.zeros(len(a)))


def test_first_parents_all_and_bounded_second_parents():
    x, y = batch([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    s, r = step("metrix-embed", loss("contrastive"), x, y, first_parents="all",
                mixed_per_anchor=2)
    a, f, g = tuples(s, r.synthetic)
    for i in range(len(y)):
        pos = set(torch.nonzero((y == y[i]) & (torch.arange(len(y)) != i)).flatten().tolist())
        assert set(f[a == i].tolist()) == pos
        for p in pos:                                   # k = 2 negatives per first parent
            assert ((a == i) & (f == p)).sum() == 2
    # unique pairs are forwarded once; the mask has one entry per (anchor, pair) tuple
    plan = s.last_plan
    assert len(set(zip(f.tolist(), g.tolist()))) == len(r.synthetic)
    assert int(plan.mask(len(y)).sum()) == len(plan.anchor)


def test_first_parents_first_is_the_first_positive_in_batch_order():
    # official embed_posneg_pair_mixup_for_pos_anchor: an anchor's first positive (batch order)
    # mixed with every one of its negatives
    x, y = batch([2, 0, 1, 0, 2, 1, 0, 1, 2])
    s, r = step("metrix-embed", loss("contrastive"), x, y, first_parents="first")
    a, f, g = tuples(s, r.synthetic)
    for i in range(len(y)):
        first = next(j for j in range(len(y)) if j != i and y[j] == y[i])
        assert set(f[a == i].tolist()) == {first}
        assert set(g[a == i].tolist()) == set(torch.nonzero(y != y[i]).flatten().tolist())


def test_first_parents_hardest_is_the_least_similar_positive():
    # official Metrix + multi-similarity: the first of the miner's pairs, which pml returns
    # sorted by similarity, i.e. the anchor's least similar (hardest) positive
    x, y = batch([2, 0, 1, 0, 2, 1, 0, 1, 2, 0])
    s, r = step("metrix-embed", loss("multi-similarity"), x, y, first_parents="hardest")
    a, f, _ = tuples(s, r.synthetic)
    e = F.normalize(x, dim=1)
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        assert set(f[a == i].tolist()) == {min(pos, key=lambda j: float(e[i] @ e[j]))}


@pytest.mark.parametrize("name", METRIX)
def test_mined_mixes_only_the_pairs_the_loss_miner_keeps(name, digits):
    # official Metrix + multi-similarity: the miner's pairs are mixed, no others
    x, y = digits
    lf = build_loss("multi-similarity", epsilon=0.1)
    model = cnn().eval() if name != "metrix-embed" else UnitNet()   # eval: same miner input
    if name == "metrix-embed":
        x = torch.randn(len(y), 16, generator=torch.Generator().manual_seed(1))
    s, r = step(name, lf, x, y, model=model, mined=True, mixed_per_anchor=None
                if name == "metrix-embed" else 30)
    with torch.no_grad():
        keep_pos, keep_neg = lf.mined_pairs(model(x), y)
    a, f, g = tuples(s, r.synthetic)
    assert len(a) > 0
    assert bool(keep_pos[a, f].all()) and bool(keep_neg[a, g].all())
    # anchors with no mined positive mix nothing (they have classmates, so no fallback)
    for i in range(len(y)):
        if not bool(keep_pos[i].any()):
            assert not bool((a == i).any())
    with pytest.raises(ValueError, match="epsilon"):
        step(name, loss("multi-similarity"), x, y, model=model, mined=True)


@pytest.mark.parametrize("k", [1, 3])
def test_hardest_negatives_are_the_brute_force_argmax(digits, k):
    x, y = digits
    model = cnn().eval()
    s, r = step("metrix-input", loss("contrastive"), x, y, model=model, negatives="hardest",
                mixed_per_anchor=k)
    with torch.no_grad():
        e = model(x)
    a, _f, g = tuples(s, r.synthetic)
    for i in range(len(y)):
        negs = [j for j in range(len(y)) if y[j] != y[i]]
        best = sorted(negs, key=lambda j: -float(e[i] @ e[j]))[:k]
        assert sorted(g[a == i].tolist()) == sorted(best)
    assert r.synthetic.hardest.all()
    s, r = step("metrix-input", loss("contrastive"), x, y, model=model, mixed_per_anchor=k)
    assert not r.synthetic.hardest.any()


# ------------------------------------------------------------------------ input vs feature

@pytest.mark.parametrize("loss_name,negatives", [("contrastive", "random"),
                                                 ("proxy-nca++", "hardest")])
def test_feature_stage_zero_equals_input(digits, loss_name, negatives):
    x, y = digits
    base = cnn()
    out = {}
    for name, extra in (("metrix-input", {}), ("metrix-feature", {"stage": 0})):
        model = copy.deepcopy(base)                   # train mode: BN stats updated per step
        lf = loss(loss_name, num_classes=4)
        _s, r = step(name, lf, x, y, model=model, seed=7, negatives=negatives,
                    mixed_per_anchor=2, lambda_per="pair", **extra)
        r.loss.backward()
        out[name] = (r, [p.grad.clone() for p in model.parameters()])
    (ri, gi), (rf, gf) = out["metrix-input"], out["metrix-feature"]
    assert float(ri.loss.detach()) == float(rf.loss.detach())
    torch.testing.assert_close(ri.synthetic.embeddings, rf.synthetic.embeddings, rtol=0, atol=0)
    torch.testing.assert_close(ri.synthetic.parents, rf.synthetic.parents)
    torch.testing.assert_close(ri.synthetic.weight, rf.synthetic.weight)
    torch.testing.assert_close(ri.synthetic.images, rf.synthetic.images)
    for a, b in zip(gi, gf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ri.synthetic.kind == "metrix-input" and rf.synthetic.kind == "metrix-feature"


def test_input_images_are_the_pixel_mixes(digits):
    x, y = digits
    _s, r = step("metrix-input", loss("multi-similarity"), x, y, model=cnn(), lambda_per="pair")
    syn = r.synthetic
    lam = syn.weight[:, None, None, None]
    torch.testing.assert_close(syn.images, lam * x[syn.parents[:, 0]]
                               + (1 - lam) * x[syn.parents[:, 1]])


@pytest.mark.parametrize("stage", [None, 2])
def test_feature_reuses_the_clean_pass_and_bounds_the_mixed_maps(digits, stage):
    x, y = digits
    model = cnn()
    seen = {i: [] for i in range(model.num_stages)}
    for i, block in enumerate(model.stages):
        block.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0].shape[0]))
    k = 2
    _s, r = step("metrix-feature", loss("contrastive"), x, y, model=model, stage=stage,
                mixed_per_anchor=k)
    mix_stage = model.num_stages if stage is None else stage
    u = len(r.synthetic)
    assert 0 < u <= len(y) * k and r.synthetic.images is None
    for i in range(model.num_stages):               # stages before the mix run once (clean)
        assert seen[i] == ([len(y)] if i < mix_stage else [len(y), u])


# ------------------------------------------------------------------------ proxy losses

@pytest.mark.parametrize("name", METRIX)
@pytest.mark.parametrize("loss_name", ["proxy-anchor", "proxy-nca++"])
def test_proxy_memberships(digits, name, loss_name):
    x, y = digits
    lf = loss(loss_name, num_classes=4)
    s, r = step(name, lf, x, y, model=cnn(), lambda_per="pair")
    syn = r.synthetic
    f, g = syn.parents[:, 0], syn.parents[:, 1]
    assert syn.membership.shape == (len(syn), 4)
    torch.testing.assert_close(syn.membership.sum(1), torch.ones(len(syn)))
    rows = torch.arange(len(syn))
    torch.testing.assert_close(syn.membership[rows, y[f]], syn.weight)        # pos-neg: y_f != y_g
    torch.testing.assert_close(syn.membership[rows, y[g]], 1 - syn.weight)
    assert (y[f] != y[g]).all()
    assert r.terms["mixed"] == pytest.approx(float(lf(syn.embeddings, syn.membership).detach()), rel=1e-5)
    if name == "metrix-embed":                      # bounded k per anchor with proxy losses
        assert len(syn) <= len(y) * s.mixed_per_anchor


# ------------------------------------------------------------------------ training

def test_a_batch_without_mixable_pairs_gives_a_zero_mixed_loss(digits):
    x, y = digits
    one = y == 0
    for name in METRIX:
        _s, r = step(name, loss("contrastive"), x[one], y[one], model=cnn())
        assert len(r.synthetic) == 0 and r.terms["mixed"] == 0.0
        r.loss.backward()
        assert np.isfinite(r.terms["loss"])


@pytest.mark.parametrize("name", METRIX)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_trains_a_few_steps_on_digits(digits, name, loss_name):
    x, y = digits
    model = cnn()
    lf = loss(loss_name, num_classes=4)
    s = build_mixing(name, loss_name)
    opt = torch.optim.Adam(list(model.parameters()) + list(lf.parameters()), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        r = s.step(model, lf, x, y)
        r.loss.backward()
        assert torch.isfinite(r.loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
    assert set(r.terms) >= {"loss", "clean", "mixed"}
    assert r.synthetic.kind == name and len(r.synthetic) > 0
    assert all(isinstance(v, float) for v in r.terms.values())


@pytest.mark.parametrize("name,loss_name", [("metrix-embed", "multi-similarity"),
                                            ("metrix-input", "proxy-anchor")])
def test_trainer_end_to_end_stores_synthetic_points(tmp_path, name, loss_name):
    from dml.config import RunConfig
    from dml.runs import open_run
    from dml.train import train

    cfg = RunConfig().with_overrides(["train.projections=none", 
        "data.name=digits", f"loss.name={loss_name}", f"mixing.name={name}",
        "mixing.params.alpha=2", "train.epochs=1", "train.iterations_per_epoch=3",
        "model.params.width=8", "model.embedding_dim=16", "train.threads=1"])
    run = open_run(train(cfg, tmp_path, progress=False))
    assert run.status()["state"] == "finished"
    (m,) = run.metrics()
    assert m["utilization_mixed"] >= 0 and m["synthetic_points"] > 0
    assert {"clean", "mixed"} <= set(m["train"])
    ev = run.load_eval(1)
    n = m["synthetic_points"]
    assert ev["synthetic_embeddings"].shape == (n, 16)
    assert ev["synthetic_parents"].shape == (n, 2) and ev["synthetic_weight"].shape == (n,)
    assert set(ev["synthetic_kind"].tolist()) == {name}
    np.testing.assert_allclose(ev["synthetic_membership"].sum(1), 1.0, rtol=1e-5)
    assert ("synthetic_images" in ev) == (name == "metrix-input")
