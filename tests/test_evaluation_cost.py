"""Evaluation that costs what it must (issue 15): retrieval ranks only what its metrics need (the
per-class rank method for large classes, the torch method on a GPU, both equal to the faiss
search), the training split is embedded as a fixed subsample, what is saved follows
``train.save_embeddings``, Recall@K follows the data set, and the 10-class data sets have a split
that uses every image (recorded as ``data.split_version``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dml.metrics import arrays, neighbours, ranking, retrieval
from dml.metrics import nearest_train
from dml.config import ConfigError, RunConfig, resolve_versions, validate
from dml.metrics import nearest_train_distances, retrieval_metrics

from tests.test_metrics import (_with_singleton, assert_dicts_close, brute_force_retrieval,
                                clustered_data, gaussian_data)


# --------------------------------------------------------------------------- the three methods

def _quantized(n, d, n_classes, seed):
    """Coordinates on a grid of 1/4: many exactly equal distances, across classes too."""
    x, y = clustered_data(n, d, n_classes, noise=1.0, seed=seed)
    return (np.round(x * 4) / 4).astype(np.float32), y


def _duplicates_across_classes(seed):
    """Every point has an exact copy in another class: each query ties with a negative."""
    x, y = clustered_data(300, 8, 3, noise=1.0, seed=seed)
    return np.concatenate([x, x]), np.concatenate([y, (y + 1) % 3])


DATA = {
    "gaussian": lambda: _with_singleton(*gaussian_data(1500, 32, 40, seed=0)),
    "clustered": lambda: _with_singleton(*clustered_data(1500, 32, 30, noise=1.5, seed=1)),
    "two_large_classes": lambda: clustered_data(3000, 16, 2, noise=1.5, seed=3),
    "quantized": lambda: _quantized(800, 4, 5, seed=5),
    "duplicates": lambda: _duplicates_across_classes(seed=6),
}
EXACT = ("quantized", "duplicates")   # ties that must be broken by index, as the definition


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("ks", [(1, 2, 4, 8), (1, 10, 100)])
def test_rank_and_torch_methods_equal_the_faiss_search(name, ks):
    x, y = DATA[name]()
    ref = retrieval_metrics(x, y, ks=ks, method="faiss")
    exact = brute_force_retrieval(x, y, ks)   # float64 distances, ties by index
    for method in ("rank", "torch"):
        got = retrieval_metrics(x, y, ks=ks, method=method)
        if name in EXACT:   # equal distances ranked by index: the definition, exactly
            assert got == pytest.approx(exact, abs=1e-12), method
        else:               # BLAS rounding may swap float32 near-ties
            assert_dicts_close(got, ref, atol=1e-6)
    assert_dicts_close(ref, exact, atol=1e-6)


@pytest.mark.parametrize("name", ["clustered", "two_large_classes", "quantized"])
def test_rank_and_torch_methods_in_query_gallery_mode(name):
    x, y = DATA[name]()
    is_query = np.random.default_rng(5).random(len(x)) < 0.3
    qy = y[is_query].copy()
    qy[0] = 10**6   # a query whose class is not in the gallery (R = 0)
    kw = dict(query_embeddings=x[is_query], query_labels=qy, ks=(1, 4, 16))
    ref = retrieval_metrics(x[~is_query], y[~is_query], method="faiss", **kw)
    for method in ("rank", "torch"):
        assert_dicts_close(retrieval_metrics(x[~is_query], y[~is_query], method=method, **kw),
                           ref, atol=1e-6)


def test_rank_method_matches_pml_on_large_classes():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                       "mean_average_precision_at_r"),
                              k="max_bin_count", device=torch.device("cpu"))
    x, y = clustered_data(2400, 16, 4, noise=1.5, seed=8)   # R ~ 600: the rank method's range
    ours = retrieval_metrics(x, y)
    pml = calc.get_accuracy(x, y)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_torch_method_ranks_the_same_neighbours_as_faiss():
    """Per query (not only on average): rank of the first same-class neighbour, R-Precision
    and AP@R of the torch method (on CPU tensors here; on a GPU in training) equal faiss'."""
    for x, y in (DATA["clustered"](), DATA["quantized"]()):
        jobs = []
        for method in ("faiss", "torch"):
            emb = arrays._as_torch_embeddings(x, "x") if method == "torch" else x
            _, inv = np.unique(y, return_inverse=True)
            r_all = np.bincount(inv)[inv] - 1
            job = ranking._RankJob(emb, emb, inv, inv, r_all, r_all > 0, 8, int(r_all.max()),
                                   min(max(8, int(r_all.max())), len(x) - 1), True)
            jobs.append(ranking._ranks_faiss(job, None) if method == "faiss"
                        else ranking._ranks_torch(job))
        (f1, rp1, ap1), (f2, rp2, ap2) = jobs
        assert (f1 == f2).all() and np.allclose(rp1, rp2, atol=1e-12)
        assert np.allclose(ap1, ap2, atol=1e-12)
    # and the utilization's nearest training point
    g = np.random.default_rng(0)
    q, t = g.normal(size=(300, 16)).astype(np.float32), g.normal(size=(500, 16)).astype(np.float32)
    np.testing.assert_allclose(nearest_train._nearest_distances_torch(torch.from_numpy(q),
                                                                torch.from_numpy(t)),
                               nearest_train_distances(q, t), rtol=1e-12)


def test_auto_picks_the_rank_method_for_large_classes_only(monkeypatch):
    used = []
    for name in ("_ranks_faiss", "_ranks_by_class", "_ranks_torch"):
        orig = getattr(retrieval, name)
        monkeypatch.setattr(retrieval, name,
                            lambda *a, _n=name, _f=orig: used.append(_n) or _f(*a))
    retrieval_metrics(*clustered_data(600, 8, 20, noise=1.0, seed=0))     # R ~ 30
    y = np.repeat(np.arange(2), 600)
    x = clustered_data(1200, 8, 2, noise=1.0, seed=0)[0]
    retrieval_metrics(x, y)                                               # R = 599
    retrieval_metrics(torch.from_numpy(x), y)   # CPU tensors: like numpy, not the torch method
    assert used == ["_ranks_faiss", "_ranks_by_class", "_ranks_by_class"]


def test_faiss_searches_max_k_and_max_r_neighbours_not_more(monkeypatch):
    seen = []
    orig = neighbours._search
    monkeypatch.setattr(ranking, "_search", lambda index, q, k, ex: seen.append(k) or
                        orig(index, q, k, ex))
    y = np.repeat(np.arange(40), 5)                        # R = 4 for every query
    x = clustered_data(200, 8, 40, noise=1.0, seed=0)[0]
    retrieval_metrics(x, y, ks=(1, 2, 4, 8))
    retrieval_metrics(x, y, ks=(1, 10, 100))
    y2 = np.repeat(np.arange(4), 50)                       # R = 49
    retrieval_metrics(x, y2, ks=(1, 2, 4, 8))
    assert seen == [8, 100, 49]


# --------------------------------------------------------------------------- training subsample

def test_train_subsample_is_fixed_stratified_and_capped():
    from dml.evaluation import train_subsample

    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([5000, 3000, 1500, 500, 3])])
    idx = train_subsample(labels, 1000, seed=0)
    assert len(idx) == 1000 and (idx[1:] > idx[:-1]).all()         # sorted, unique
    counts = torch.bincount(labels[idx], minlength=5).tolist()
    assert counts == [499, 300, 150, 50, 1]    # shares by largest remainder, every class >= 1
    assert idx.equal(train_subsample(labels, 1000, seed=0))      # the same every evaluation
    assert not idx.equal(train_subsample(labels, 1000, seed=1))
    assert train_subsample(labels, None) is None and train_subsample(labels, 10003) is None
    assert len(train_subsample(labels, 2)) == 2


TINY = ["data.name=digits", "train.epochs=2", "train.iterations_per_epoch=3",
        "model.params.width=8", "model.embedding_dim=16", "train.threads=1",
        "train.projections=none"]


def _train(tmp_path, *overrides):
    from dml.runs import Run
    from dml.train import train

    return Run(train(RunConfig().with_overrides(TINY + list(overrides)), tmp_path,
                     progress=False))


def test_training_embeds_a_subsample_of_the_training_split(tmp_path):
    from dml.data import load_dataset
    from dml.metrics import utilization

    run = _train(tmp_path, "train.train_embed_max=150", "mixing.name=metrix-embed",
                 "train.epochs=1")
    rec = run.metrics()[-1]
    ds = load_dataset("digits")
    assert rec["utilization_on"] == {"train_images": 150, "of": len(ds.train)}
    ev = run.load_eval(1)
    idx = ev["train_index"]
    assert len(idx) == len(ev["train_embeddings"]) == len(ev["train_labels"]) == 150
    assert (ev["train_labels"] == ds.train.labels.numpy()[idx]).all()
    # the saved training embeddings are the ones utilization was measured on
    assert utilization(ev["test_embeddings"].astype(np.float32),
                       ev["train_embeddings"].astype(np.float32)) == \
        pytest.approx(rec["utilization"], rel=1e-2)
    # synthetic points keep their parents' training images and classes
    probe = ev["probe_index"]
    assert (ev["probe_labels"] == ds.train.labels.numpy()[probe]).all()
    assert rec["synthetic_points"] == len(ev["synthetic_embeddings"]) > 0
    assert set(rec["test"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}


def test_save_embeddings_best_and_last_keeps_only_those(tmp_path):
    run = _train(tmp_path, "train.save_embeddings=best+last", "train.epochs=3")
    best = run.status()["best"]["epoch"]
    assert set(run.eval_epochs()) == {best, 3}
    assert "test_embeddings" in run.load_eval(3)


def test_prune_keeps_the_last_and_the_best_until_superseded(tmp_path):
    from dml.evaluation import prune_evals
    from dml.runs import RunWriter

    w = RunWriter.create(tmp_path, RunConfig().to_dict(), run_id="r")
    try:
        for e in (1, 2, 3):
            w.save_eval(e, test_embeddings=np.zeros((2, 2), np.float16))
            (w.path / "evals" / f"epoch_{e:04d}.pca.npz").write_bytes(b"x")   # a cached map
        w.set_status("running", best={"epoch": 2, "val": {"recall@1": 0.5}})
        assert prune_evals(w, 3, {"val": {"recall@1": 0.4}}, "recall@1") == [1]
        assert w.run.eval_epochs() == [2, 3]
        assert not (w.path / "evals" / "epoch_0001.pca.npz").exists()
        w.save_eval(4, test_embeddings=np.zeros((2, 2), np.float16))
        assert prune_evals(w, 4, {"val": {"recall@1": 0.9}}, "recall@1") == [2, 3]
        assert w.run.eval_epochs() == [4]
    finally:
        w.close()


def test_save_embeddings_none_saves_no_embeddings(tmp_path):
    run = _train(tmp_path, "train.save_embeddings=none", "train.epochs=1")
    assert run.eval_epochs() == []          # no mixing: nothing else to save either
    assert run.metrics()[-1]["utilization"] > 0


# --------------------------------------------------------------------------- config

def test_save_embeddings_reads_the_old_booleans():
    assert RunConfig().train.save_embeddings == "all"
    for old, new in ((True, "all"), (False, "none"), ("false", "none"), ("true", "all")):
        assert RunConfig.from_dict({"train": {"save_embeddings": old}}).train.save_embeddings \
            == new
    assert RunConfig().with_overrides(["train.save_embeddings=false"]).train.save_embeddings \
        == "none"
    assert RunConfig().with_overrides(["train.save_embeddings=best+last"]) \
        .train.save_embeddings == "best+last"
    with pytest.raises(ConfigError, match="train.save_embeddings must be all, best\\+last or"):
        validate(RunConfig().with_overrides(["train.save_embeddings=some"]))


def test_a_config_json_of_an_older_run_still_loads():
    old = RunConfig().to_dict()
    for section, key in (("train", "train_embed_max"), ("train", "recall_at"),
                         ("data", "split_version"), ("train", "workers"),
                         ("train", "precision")):
        old[section].pop(key)
    old["train"]["save_embeddings"] = True
    cfg = RunConfig.from_dict(old)
    assert cfg.train.save_embeddings == "all" and cfg.data.split_version is None
    # its data set is rebuilt with the split it was trained on (version 1)
    from dml.data.registry import dataset_for_config
    assert len(dataset_for_config(old["data"]).test) == 714
    assert len(dataset_for_config(RunConfig().data).test) == 896   # unresolved: the current


def test_recall_at_follows_the_data_set_or_the_config():
    from dml.config import recall_ks, select_metrics
    from dml.data.registry import recall_at

    assert recall_at("cub200") == recall_at("cars196") == recall_at("fashion-mnist") \
        == (1, 2, 4, 8)
    assert recall_at("sop") == (1, 10, 100, 1000)
    assert recall_at("inshop") == (1, 10, 20, 30, 40, 50)
    sop = RunConfig().with_overrides(["data.name=sop", "train.select_metric=recall@100"])
    validate(sop)
    assert select_metrics(sop) == ("recall@1", "recall@10", "recall@100", "recall@1000",
                                   "r_precision", "map@r")
    with pytest.raises(ConfigError, match="train.select_metric='recall@2'"):
        validate(sop.with_overrides(["train.select_metric=recall@2"]))
    own = RunConfig().with_overrides(["train.recall_at=[5, 1]", "train.select_metric=recall@5"])
    validate(own)
    assert recall_ks(own) == (1, 5)
    for bad in ("[]", "[0, 1]", "[1, 1]", "[1.5]", "3"):
        with pytest.raises(ConfigError, match="recall_at"):
            validate(RunConfig().with_overrides([f"train.recall_at={bad}"]))


def test_evaluation_reports_the_data_sets_recall_at():
    from dml.evaluation import evaluate_embeddings

    x, y = clustered_data(300, 8, 10, noise=1.0, seed=0)
    rec = evaluate_embeddings({"val": x, "test": x}, {"val": y, "test": y},
                              ks=(1, 10, 100, 1000))
    assert list(rec["val"]) == ["recall@1", "recall@10", "recall@100", "recall@1000",
                                "r_precision", "map@r"]


def test_split_version_is_part_of_a_runs_configuration():
    from dml.stats import configuration_key

    new = resolve_versions(RunConfig())
    assert new.data.split_version == 2                         # digits: the current split
    assert resolve_versions(RunConfig().with_overrides(["data.name=omniglot"])) \
        .data.split_version == 1
    kept = resolve_versions(RunConfig().with_overrides(["data.split_version=1"]))
    assert kept.data.split_version == 1                        # a resumed run keeps its split
    with pytest.raises(ConfigError, match="data.split_version=7"):
        resolve_versions(RunConfig().with_overrides(["data.split_version=7"]))
    old = new.to_dict()
    old["data"].pop("split_version")                           # a run from before
    assert configuration_key(old) != configuration_key(new.to_dict())
    assert configuration_key(kept.to_dict()) != configuration_key(new.to_dict())


def test_dml_eval_rebuilds_the_split_of_an_old_run(tmp_path):
    from dml.evaluation import evaluate_run

    run = _train(tmp_path, "train.epochs=1")
    cfg = json.loads((run.path / "config.json").read_text())
    assert cfg["data"]["split_version"] == 2
    new = evaluate_run(str(run.path))
    assert 0 <= new["metrics"]["test"]["recall@1"] <= 1
    cfg["data"].pop("split_version")                           # as an older run wrote it
    (run.path / "config.json").write_text(json.dumps(cfg))
    old = evaluate_run(str(run.path))
    assert old["metrics"]["test"] != new["metrics"]["test"]   # digits 6-9, not 5-9
    assert Path(run.path).is_dir()


def test_the_gpu_branch_of_an_evaluation_on_cpu_tensors(monkeypatch):
    """No GPU here: the branch that keeps embeddings on their device and ranks them with torch
    is run on CPU tensors by treating every tensor as on an accelerator; it must give the
    numpy evaluation (same neighbours; utilization to float rounding)."""
    from dml.evaluation import embed, evaluate_embeddings
    from dml.data import load_dataset
    from dml.data.transforms import make_transform
    from dml.models import build_model

    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 8, 16, width=8)
    tf = make_transform(ds, train=False)
    dev = torch.device("cpu")
    emb = {k: embed(model, getattr(ds, k), tf, dev, 64) for k in ("train", "val", "test")}
    kept = {k: embed(model, getattr(ds, k), tf, dev, 64, keep_on_device=True)
            for k in ("train", "val", "test")}
    assert all(isinstance(v, torch.Tensor) for v in kept.values())
    assert all(np.array_equal(kept[k].numpy(), emb[k]) for k in emb)
    # the metrics on embeddings spread like a trained network's (an untrained one crowds its
    # embeddings so that float32 near-ties, which BLAS kernels round differently, abound)
    x, y = clustered_data(900, 16, 6, noise=1.0, seed=3)
    emb = {"train": x[:300], "val": x[300:500], "test": x[500:]}
    labels = {"train": y[:300], "val": y[300:500], "test": y[500:]}
    ref = evaluate_embeddings(emb, labels, seed=0)
    kept = {k: torch.from_numpy(v) for k, v in emb.items()}
    for module in (retrieval, nearest_train):
        monkeypatch.setattr(module, "_on_accelerator", lambda x: isinstance(x, torch.Tensor))
    got = evaluate_embeddings(kept, labels, seed=0)
    for split in ("val", "test"):
        assert_dicts_close(got[split], ref[split], atol=1e-6)
    assert got["utilization"] == pytest.approx(ref["utilization"], rel=1e-9)


def test_a_run_trains_on_its_own_split_version_and_resumes_on_it(tmp_path):
    """data.split_version=1 trains on the old digits split (4 training classes, 725 images), not
    on the current one; a run written before split versions resumes on the old split too."""
    from dml.runs import open_run
    from dml.train import resume, train

    run = _train(tmp_path / "v1", "data.split_version=1", "train.epochs=1")
    assert run.metrics()[-1]["utilization_on"]["of"] == 725
    assert _train(tmp_path / "v2", "train.epochs=1").metrics()[-1]["utilization_on"]["of"] == 721

    def stop_in_epoch_2(p):
        if p["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(RunConfig().with_overrides(TINY), tmp_path / "old", progress=False,
              on_progress=stop_in_epoch_2)
    (path,) = list((tmp_path / "old").iterdir())
    cfg = json.loads((path / "config.json").read_text())
    cfg["data"].pop("split_version")                           # as an older run wrote it
    (path / "config.json").write_text(json.dumps(cfg))
    resume(path, progress=False)
    # epoch 1 ran on the current split before the edit; epoch 2, resumed, on the old one
    assert [m["utilization_on"]["of"] for m in open_run(path).metrics()] == [721, 725]
