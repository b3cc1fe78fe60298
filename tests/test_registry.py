"""dml.registry: the one registry mechanism behind losses, models, data sets and mixings."""

import pytest

from dml.registry import Registry


def test_register_lookup_aliases_and_errors():
    r = Registry("widget")

    @r.register("round-one", aliases=("round", "r1"))
    class Round:
        pass

    r.register("square", object)
    assert r.names() == ["round-one", "square"] and list(r) == r.names() and len(r) == 2
    assert r["round"] is Round and r[" R1 "] is Round and r.canonical("ROUND-ONE") == "round-one"
    assert "r1" in r and "oval" not in r and 3 not in r
    assert r.get("oval") is None and r.get("oval", 5) == 5
    with pytest.raises(ValueError, match="unknown widget 'oval'; valid names: round-one, square"):
        r["oval"]
    for bad in ("square", "round", ""):
        with pytest.raises(ValueError, match="empty or already registered"):
            r.register(bad, int)
    with pytest.raises(ValueError, match="alias 'r1' is already"):
        r.register("triangle", int, aliases=("r1",))


def test_every_family_uses_it_with_a_lister():
    from dml.data import DATASETS, DatasetError, list_datasets
    from dml.losses import LOSSES, list_losses
    from dml.mixing import MIXINGS, list_mixings
    from dml.models import MODELS, list_models

    for registry, lister in ((DATASETS, list_datasets), (LOSSES, list_losses),
                             (MIXINGS, list_mixings), (MODELS, list_models)):
        assert isinstance(registry, Registry) and lister() == registry.names() and lister()
    assert list_datasets()[0] == "digits" and DATASETS["fmnist"].name == "fashion-mnist"
    with pytest.raises(DatasetError, match="unknown data set 'imagenet'"):
        DATASETS["imagenet"]
    assert list_losses()[:2] == ["contrastive", "multi-similarity"]
    assert list_mixings()[0] == "none" and list_models() == ["small-cnn", "resnet18", "resnet50"]
