"""The mixing strategies as loss wrappers: built around a loss object whose capabilities they
check, called like a loss, composable, and usable with pytorch-metric-learning losses where the
method needs only hard labels."""

import pytest
import torch
import torch.nn.functional as F

from dml.losses import (ContrastiveLoss, MultiSimilarityLoss, ProxyAnchorLoss, TripletLoss,
                        build_loss)
from dml.mixing import (EmbeddingExpansion, MetrixEmbedding, MetrixFeature, MetrixInput,
                        ProxySynthesis, SymmetricalSynthesis, build_mixing, loss_capabilities)
from dml.models import small_cnn

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402


def batch(p=6, k=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    centres = torch.randn(p, d, generator=g, dtype=torch.float64)
    x = centres[labels] + torch.randn(p * k, d, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1), labels


class Unit(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def test_capabilities_of_tango_and_pml_losses():
    assert loss_capabilities(MultiSimilarityLoss()) == {"soft", "pairs"}
    assert loss_capabilities(ProxyAnchorLoss(5, 8)) == {"soft", "proxies"}
    assert loss_capabilities(pml_losses.MultiSimilarityLoss()) == {"references"}
    assert loss_capabilities(pml_losses.ProxyAnchorLoss(5, 8)) == set()
    assert loss_capabilities(EmbeddingExpansion(TripletLoss())) == {"mixing"}


def test_registry_pairs_follow_capabilities_not_names():
    """The registry's pairs (class-level ``accepts``) are exactly the pairs a wrapper accepts
    when built around a loss object, and follow the documented needs: Metrix any soft-label
    loss, Embedding Expansion / Symmetrical Synthesis any pair loss, Proxy Synthesis any proxy
    loss, the combination both of Metrix's and Expansion's."""
    from dml.losses import LOSSES, list_losses
    from dml.mixing import MIXINGS, supported_pairs

    pairs = set(supported_pairs())
    for m, cls in MIXINGS.items():
        for name in list_losses():
            try:
                cls(build_loss(name, num_classes=5, embedding_dim=8))
                built = True
            except ValueError:
                built = False
            assert ((m, name) in pairs) == built, (m, name)
    proxy = {l for l in LOSSES if getattr(LOSSES[l], "uses_proxies", False)}
    pair = set(LOSSES) - proxy
    assert proxy == {"proxy-anchor", "proxy-nca++", "normalized-softmax"}
    want = {"none": set(LOSSES), "metrix-input": set(LOSSES), "metrix-feature": set(LOSSES),
            "metrix-embed": set(LOSSES), "embedding-expansion": pair,
            "symmetrical-synthesis": pair, "proxy-synthesis": proxy, "metrix-embed+ee": pair}
    assert {m: {l for mm, l in pairs if mm == m} for m in MIXINGS} == want


def test_a_wrapper_is_called_like_its_loss_and_equals_the_trainer_step():
    emb, labels = batch()
    for make in (lambda: MetrixEmbedding(MultiSimilarityLoss(), fixed_lambda=0.3),
                 lambda: EmbeddingExpansion(TripletLoss(), n=2),
                 lambda: SymmetricalSynthesis(MultiSimilarityLoss()),
                 lambda: ProxySynthesis(ProxyAnchorLoss(6, 16).double(), fixed_lambda=0.4)):
        torch.manual_seed(0)
        criterion = make()
        torch.manual_seed(1)
        value = criterion(emb, labels)
        assert value.dim() == 0 and "loss" in criterion.last_terms
        torch.manual_seed(1)
        step = criterion.step(Unit(), None, emb, labels)
        assert float(value.detach()) == pytest.approx(float(step.loss.detach()), rel=1e-12)
        assert step.synthetic is not None and len(step.synthetic) > 0


@pytest.mark.parametrize("make,match", [
    (lambda: MetrixEmbedding(pml_losses.MultiSimilarityLoss()), "soft labels.*dml.losses"),
    (lambda: MetrixEmbedding(TripletLoss().pair_loss), "soft labels"),
    (lambda: EmbeddingExpansion(ProxyAnchorLoss(5, 8)), "pair-based loss.*proxies"),
    (lambda: EmbeddingExpansion(pml_losses.TripletMarginLoss()), "negatives='point'"),
    (lambda: SymmetricalSynthesis(pml_losses.ProxyAnchorLoss(5, 8)), "pair-based loss"),
    (lambda: ProxySynthesis(MultiSimilarityLoss()), "proxy loss"),
    (lambda: ProxySynthesis(pml_losses.ProxyAnchorLoss(5, 8)), "proxy loss"),
])
def test_a_loss_that_lacks_a_capability_is_refused_when_the_wrapper_is_built(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_strategy_built_for_one_loss_refuses_to_be_stepped_with_another():
    # the review's case: metrix-embed built for contrastive, stepped with proxy anchor, silently
    # made 2,580 mixed points instead of 490
    emb, labels = batch()
    built_for = ContrastiveLoss()
    strategy = build_mixing("metrix-embed", built_for)
    with pytest.raises(ValueError, match="built for"):
        strategy.step(Unit(), build_loss("proxy-anchor", 6, 16), emb, labels)
    by_name = build_mixing("metrix-embed", "contrastive")        # unbound: checks the name
    with pytest.raises(ValueError, match="built for loss 'contrastive'"):
        by_name.step(Unit(), build_loss("proxy-anchor", 6, 16), emb, labels)
    with pytest.raises(ValueError, match="without a loss object"):
        by_name(emb, labels)


def test_model_level_metrix_takes_the_network():
    torch.manual_seed(0)
    model = small_cnn(1, 8, 16, width=8)
    x, labels = torch.randn(12, 1, 8, 8), torch.arange(4).repeat_interleave(3)
    for criterion in (MetrixInput(MultiSimilarityLoss()), MetrixFeature(MultiSimilarityLoss())):
        loss = criterion(model, x, labels)
        loss.backward()
        assert loss.dim() == 0 and {"clean", "mixed"} <= set(criterion.last_terms)
        with pytest.raises(TypeError, match="model, images, labels"):
            criterion(model(x), labels)


def test_metrix_on_embedding_expansion_is_the_registered_combination():
    emb, labels = batch(seed=2)
    torch.manual_seed(0)
    composed = MetrixEmbedding(EmbeddingExpansion(MultiSimilarityLoss(), n=2), fixed_lambda=0.3)
    a = composed(emb, labels)
    torch.manual_seed(0)
    registered = build_mixing("metrix-embed+ee", MultiSimilarityLoss(), fixed_lambda=0.3, n=2)
    b = registered(emb, labels)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12)
    assert {"clean_hard_synthetic", "mixed"} <= set(composed.last_terms)


@pytest.mark.parametrize("strategy", [EmbeddingExpansion, SymmetricalSynthesis])
@pytest.mark.parametrize("pair", [
    (lambda: pml_losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5,
                                        distance=CosineSimilarity()),
     lambda: ContrastiveLoss(pos_margin=1.0, neg_margin=0.5)),
    (lambda: pml_losses.TripletMarginLoss(margin=0.1, distance=CosineSimilarity(),
                                          triplets_per_anchor="all"),
     lambda: TripletLoss(margin=0.1, mining="all")),
    (lambda: pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
     lambda: MultiSimilarityLoss()),
], ids=["contrastive", "triplet-all", "multi-similarity"])
def test_pml_losses_through_references_equal_the_tango_loss(strategy, pair):
    # per-anchor negatives among all points of other classes (negatives="point"), given to the
    # pml loss through ref_emb, ref_labels and indices_tuple; the same computation with Tango's
    # own loss on the (anchors x points) similarity matrix
    make_pml, make_tango = pair
    emb, labels = batch(seed=3)
    x1, x2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    kw = {"n": 2} if strategy is EmbeddingExpansion else {}
    theirs = strategy(make_pml(), negatives="point", **kw)(F.normalize(x1, dim=1), labels)
    ours = strategy(make_tango(), negatives="point", **kw)(F.normalize(x2, dim=1), labels)
    assert float(theirs.detach()) == pytest.approx(float(ours.detach()), rel=1e-9)
    g1, g2 = torch.autograd.grad(theirs, x1)[0], torch.autograd.grad(ours, x2)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
