"""Every strategy trains end to end from the CLI (digits and the real Omniglot), and the
combination strategy is exactly the sum of its parts."""

import numpy as np
import pytest
import torch

from dml.cli import main
from dml.losses import build_loss
from dml.mixing import build_mixing, compatible_losses, list_mixings
from dml.runs import open_run

PREFERRED_LOSS = {"none": "contrastive", "proxy-synthesis": "proxy-anchor"}


def loss_for(strategy: str) -> str:
    return PREFERRED_LOSS.get(strategy) or compatible_losses(strategy)[0]


def _train(tmp_path, capsys, dataset, strategy, extra=()):
    rc = main(["train", "--dataset", dataset, "--loss", loss_for(strategy), "--mixing", strategy,
               "--epochs", "1", "--runs-dir", str(tmp_path), "--quiet",
               "--set", "train.iterations_per_epoch=3", "--set", "model.params.width=8",
               "--set", "train.clustering=false", "--set", "train.projections=none", *extra])
    assert rc == 0, capsys.readouterr().err
    return open_run(capsys.readouterr().out.strip().splitlines()[-1])


def _check_run(run, strategy):
    assert run.status()["state"] == "finished"
    (m,) = run.metrics()
    assert np.isfinite(m["train"]["loss"])
    ev = run.load_eval(1)
    if strategy == "none":
        assert "synthetic_embeddings" not in ev
        return
    n = m["synthetic_points"]
    assert 0 < n <= 2048 and ev["synthetic_embeddings"].shape[0] == n
    assert ev["synthetic_parents"].max() < len(ev["probe_index"])
    assert set(np.unique(ev["synthetic_kind"])) <= {strategy, "ee", "symmetrical",
                                                     "proxy-synthesis"}
    np.testing.assert_allclose(ev["synthetic_membership"].sum(1), 1, atol=1e-5)
    # mixed points can only bring the training set closer to the queries
    assert m["utilization_mixed"] <= m["utilization"] + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list_mixings())
def test_every_strategy_trains_on_digits(tmp_path, capsys, strategy):
    _check_run(_train(tmp_path, capsys, "digits", strategy), strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list_mixings())
def test_every_strategy_trains_on_omniglot(tmp_path, capsys, strategy, omniglot_dir):
    run = _train(tmp_path, capsys, "omniglot", strategy,
                 ["--data-root", str(omniglot_dir), "--set", "data.classes_per_batch=16"])
    _check_run(run, strategy)


def test_unsupported_pair_fails_at_start_listing_supported_pairs(tmp_path, capsys):
    rc = main(["train", "--dataset", "digits", "--loss", "triplet", "--mixing", "proxy-synthesis",
               "--runs-dir", str(tmp_path), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not support loss 'triplet': it needs a proxy loss" in err
    assert "proxy-synthesis: proxy-anchor, proxy-nca++, normalized-softmax" in err
    assert not list(tmp_path.iterdir())


def test_metrix_plus_expansion_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 8), dim=1).requires_grad_()
    labels = torch.arange(6).repeat_interleave(4)
    model = lambda x: x  # noqa: E731  (the "images" are the embeddings)
    loss_fn = build_loss("multi-similarity")
    combo = build_mixing("metrix-embed+ee", "multi-similarity", fixed_lambda=0.3, w=0.4)
    ee = build_mixing("embedding-expansion", "multi-similarity")
    metrix = build_mixing("metrix-embed", "multi-similarity", fixed_lambda=0.3, w=0.4)
    torch.manual_seed(1)
    got = combo.step(model, loss_fn, emb, labels)
    l_ee = ee.step(model, loss_fn, emb, labels)
    torch.manual_seed(1)
    m = metrix.step(model, loss_fn, emb, labels)
    l_mixed = (m.loss - m.terms["clean"]) / 0.4
    torch.testing.assert_close(got.loss, l_ee.loss + 0.4 * l_mixed)
    kinds = got.synthetic.kinds()
    assert kinds.count("ee") == len(l_ee.synthetic) and \
        kinds.count("metrix-embed+ee") == len(m.synthetic)
    # soft labels (Metrix) and pairs of embeddings (Embedding Expansion): every Tango pair loss
    assert compatible_losses("metrix-embed+ee") == [
        "contrastive", "multi-similarity", "triplet", "lifted-structure", "n-pair"]
