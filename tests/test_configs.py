"""The shipped configs/ files: the official settings of the papers load, name only valid
parameters, carry the official values, and train a few steps on a generated data set tree."""

from pathlib import Path

import pytest
import torch

from dml.config import load_config, validate
from dml.losses import build_loss
from dml.mixing import build_mixing
from dml.models import build_model
from tests import datagen_trees as gen

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_the_official_settings_are_shipped():
    assert {p.name for p in CONFIGS} >= {
        "metrix-cub-multi-similarity.toml", "metrix-cub-contrastive.toml",
        "ee-cars-hphn-triplet.toml", "proxy-synthesis-cars-norm-softmax.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    validate(cfg)
    build_loss(cfg.loss.name, num_classes=10, embedding_dim=cfg.model.embedding_dim,
               **cfg.loss.params)
    build_mixing(cfg.mixing.name, cfg.loss.name, **cfg.mixing.params)
    params = {k: v for k, v in cfg.model.params.items()}
    model = build_model(cfg.model.name, 3, 64, cfg.model.embedding_dim, **params)
    assert model.embedding_dim == 512


def test_metrix_multi_similarity_carries_the_official_values():
    cfg = load_config(next(p for p in CONFIGS if p.name == "metrix-cub-multi-similarity.toml"))
    assert cfg.loss.params == {"alpha": 17.97, "beta": 75.66, "base": 0.77, "epsilon": 0.39}
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.model.pretrained) == ("resnet50", 512,
                                                                               True)
    assert cfg.model.params["bn_freeze"] is True
    assert (cfg.data.sampler, cfg.data.batch_size) == ("random", 100)
    assert cfg.mixing.params["mined"] is True and cfg.mixing.params["w"] == 0.4
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.lr_step_epochs, t.lr_gamma,
            t.freeze_backbone_epochs, t.epochs) == ("adam", 1e-4, 1e-4, "step", 10, 0.5, 5, 100)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_a_few_steps_on_a_generated_tree(path, tmp_path):
    # CPU-sized: 32 px, no ImageNet weights (none can be downloaded here), two epochs of one
    # step (the first with the backbone frozen), batches that fit a tree of 8 training classes;
    # loss, mixing, model, sampler kind, schedule kind and frozen BatchNorm stay as shipped.
    from dml.runs import open_run
    from dml.train import train

    cfg = load_config(path)
    make = {"cub200": gen.make_cub, "cars196": gen.make_cars}[cfg.data.name]
    root = make(tmp_path / "data", classes=16, per_class=4)
    over = [f"data.root={root}", "data.image_size=32", "model.pretrained=false",
            "train.epochs=2", "train.iterations_per_epoch=1", "train.freeze_backbone_epochs=1",
            "train.lr_step_epochs=1", "train.projections=none", "train.threads=2",
            "train.eval_every=1",
            "train.eval_batch_size=64", "train.clustering=false"]
    if cfg.data.sampler == "random":
        over.append("data.batch_size=12")
    else:
        over.append(f"data.classes_per_batch={min(cfg.data.classes_per_batch, 4)}")
        over.append(f"data.samples_per_class={min(cfg.data.samples_per_class, 4)}")
    torch.manual_seed(0)
    run = open_run(train(cfg.with_overrides(over), tmp_path / "runs", progress=False))
    assert run.status()["state"] == "finished"
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["train"]["loss"])) for m in metrics)
    assert metrics[1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.lr_gamma ** 2)
