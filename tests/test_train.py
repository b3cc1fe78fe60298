"""End-to-end: the trainer writes a complete run that can be read, evaluated and resumed."""

import json
import pickle

import numpy as np
import pytest
import torch

from dml.cli import main
from dml.config import RunConfig
from dml.runs import open_run
from dml.checkpoints import CheckpointError, load_checkpoint
from dml.train import resume, train


def tiny_config(**over) -> RunConfig:
    cfg = RunConfig().with_overrides([
        "data.name=digits", "loss.name=contrastive", "train.epochs=2",
        "train.iterations_per_epoch=6", "model.params.width=16", "model.embedding_dim=16",
        "train.threads=1", "train.projections=none"])
    return cfg.with_overrides([f"{k}={v}" for k, v in over.items()])


def test_train_writes_a_complete_run(tmp_path):
    path = train(tiny_config(**{"train.projections": "best+last", "train.map_mode": "inline"}),
                 tmp_path, progress=False)
    run = open_run(path)
    st = run.status()
    assert st["state"] == "finished" and st["progress"]["step"] == 12
    ms = run.metrics()
    assert [m["epoch"] for m in ms] == [1, 2]
    for m in ms:
        assert set(m["test"]) >= {"recall@1", "recall@2", "recall@4", "recall@8",
                                  "r_precision", "map@r", "nmi", "f1"}
        assert set(m["val"]) >= {"recall@1", "map@r"}
        assert m["utilization"] > 0 and "loss" in m["train"]
    assert run.eval_epochs() == [1, 2]
    assert st["progress"]["projections"] == "cached"   # inline: 2-D maps ready for the app
    for epoch in {st["best"]["epoch"], 2}:
        for method in ("pca", "umap"):
            assert (path / "evals" / f"epoch_{epoch:04d}.{method}.npz").is_file()
    ev = run.load_eval(2)
    assert ev["train_embeddings"].shape[1] == 16
    assert len(ev["test_labels"]) == len(ev["test_embeddings"])
    best = st["best"]
    assert best["epoch"] in (1, 2) and best["selected_on"] == "val recall@1"
    best_epoch_val = max(m["val"]["recall@1"] for m in ms)
    assert best["val"]["recall@1"] == best_epoch_val
    # the stored best checkpoint reproduces the stored embeddings of its epoch
    model, info = load_checkpoint(run.checkpoint_path("best"))
    assert info["epoch"] == best["epoch"]
    from dml.data import load_dataset
    from dml.data.transforms import make_transform
    from dml.evaluation import embed
    ds = load_dataset("digits")
    emb = embed(model, ds.test, make_transform(ds, train=False), torch.device("cpu"))
    stored = run.load_eval(best["epoch"])["test_embeddings"].astype(np.float32)
    np.testing.assert_allclose(emb, stored, atol=2e-3)
    # utilization in the record equals the mean nearest-train distance stored beside it
    np.testing.assert_allclose(ms[-1]["utilization"], ev["test_nn_distance"].mean(), rtol=1e-5)


def test_cli_train_eval_runs(tmp_path, capsys):
    rc = main(["train", "--dataset", "digits", "--loss", "contrastive", "--mixing", "none",
               "--epochs", "1", "--seed", "1", "--runs-dir", str(tmp_path), "--quiet",
               "--set", "train.iterations_per_epoch=4", "--set", "model.params.width=8",
               "--set", "train.projections=none"])
    assert rc == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    run = open_run(path)
    assert run.config()["train"]["seed"] == 1
    assert main(["eval", path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = run.status()["best"]["test"]
    for k in ("recall@1", "map@r", "r_precision"):
        assert result["metrics"]["test"][k] == pytest.approx(recorded[k], abs=0.02)
    assert main(["eval", path, "--json", "--checkpoint", "untrained"]) == 0
    untrained = json.loads(capsys.readouterr().out)
    assert untrained["epoch"] == 0 and 0 <= untrained["metrics"]["test"]["recall@1"] <= 1
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert run.id in table and "finished" in table


@pytest.mark.parametrize("args,match", [
    (["--loss", "contrastiv"], "invalid choice: 'contrastiv' .choose from .*multi-similarity"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet' .choose from .*omniglot"),
    (["--mixing", "cutmix"], "invalid choice: 'cutmix' .choose from 'none'"),
    (["--set", "loss.name=contrastiv"], "unknown loss 'contrastiv'; valid: .*multi-similarity"),
    (["--set", "data.name=imagenet"], "unknown dataset 'imagenet'; valid: .*omniglot"),
    (["--set", "mixing.name=cutmix"], "unknown mixing 'cutmix'; valid: none"),
    (["--set", "train.epoch=3"], "unknown key"),
    (["--set", "loss.params.gamma=3"], "loss.params: unknown parameter.*gamma"),
    (["--set", "model.params.widht=3"], "model.params: unknown parameter.*widht"),
])
def test_cli_bad_names_list_valid_ones(tmp_path, capsys, args, match):
    try:
        rc = main(["train", "--runs-dir", str(tmp_path), "--quiet", *args])
    except SystemExit as exc:            # argparse's own choices
        rc = exc.code
    assert rc == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing written for a bad request


def test_cli_version_list_print_config_and_dry_run(tmp_path, capsys):
    from dml import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["list", "mixings"]) == 0
    out = capsys.readouterr().out
    assert "embedding-expansion" in out and "negatives='anchor'" in out and "needs the model" in out
    assert main(["list", "losses"]) == 0 and "epsilon=None" in capsys.readouterr().out
    assert main(["list", "models"]) == 0 and "bn_freeze=False" in capsys.readouterr().out
    assert main(["list", "datasets"]) == 0 and "built in" in capsys.readouterr().out
    assert main(["train", "--dataset", "digits", "--name", "2024", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "2024" and cfg["mixing"]["version"] == 1 and cfg["loss"]["version"] == 2
    assert main(["train", "--dataset", "digits", "--set", "data.augment=affine",
                 "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    assert "config valid" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--dataset", "omniglot", "--data-root", str(tmp_path / "nope"),
               "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "images_background" in err


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = tiny_config(**{"train.epochs": 3, "train.seed": 5})
    ref = open_run(train(cfg, tmp_path / "ref", progress=False))

    def stop_in_epoch_2(p):
        if p["epoch"] == 2 and p["step"] == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "int", progress=False, on_progress=stop_in_epoch_2)
    (path,) = list((tmp_path / "int").iterdir())
    run = open_run(path)
    assert run.status()["state"] == "interrupted"
    assert [m["epoch"] for m in run.metrics()] == [1]
    resume(path, progress=False)
    assert run.status()["state"] == "finished"
    got, want = run.metrics(), ref.metrics()
    assert [m["epoch"] for m in got] == [1, 2, 3]
    for a, b in zip(got, want):
        assert a["test"]["map@r"] == pytest.approx(b["test"]["map@r"], abs=1e-6)
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)


def test_failure_is_recorded_with_its_error(tmp_path, monkeypatch):
    from dml.mixing.base import NoMixing

    def boom(self, *a, **k):
        raise RuntimeError("synthetic failure for the test")

    monkeypatch.setattr(NoMixing, "_step", boom)
    with pytest.raises(RuntimeError):
        train(tiny_config(), tmp_path, progress=False)
    (path,) = list(tmp_path.iterdir())
    st = open_run(path).status()
    assert st["state"] == "failed" and "synthetic failure" in st["error"]
    assert "Traceback" in st["traceback"]


def test_checkpoints_that_are_not_tango_safetensors_are_refused(tmp_path):
    path = train(tiny_config(**{"train.epochs": 1}), tmp_path / "runs", progress=False)
    run = open_run(path)
    good = run.checkpoint_path("best")
    model, _ = load_checkpoint(good)
    # a pickle is refused without being unpickled
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil)
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(torch_file)
    # corrupt bytes: checksum mismatch
    bad = tmp_path / "bad.safetensors"
    data = bytearray(good.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / "bad.json").write_text(good.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    # safetensors without a side file: foreign
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a Tango checkpoint"):
        load_checkpoint(foreign)
    # a side file whose architecture does not match the weights
    meta = json.loads(good.with_suffix(".json").read_text())
    meta["model"]["embedding_dim"] = 99
    meta["sha256"] = None
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(good, meta=meta)


@pytest.mark.slow
def test_omniglot_training_beats_the_untrained_model(tmp_path, omniglot_dir):
    cfg = RunConfig().with_overrides([
        "data.name=omniglot", f"data.root={omniglot_dir}", "loss.name=multi-similarity",
        "train.epochs=3", "train.eval_every=1", "train.clustering=false",
        "data.classes_per_batch=16", "data.samples_per_class=4", "train.projections=none"])
    from dml.data import load_dataset
    from dml.data.transforms import make_transform
    from dml.metrics import retrieval_metrics
    from dml.models import build_model
    from dml.evaluation import embed

    ds = load_dataset("omniglot", str(omniglot_dir))
    torch.manual_seed(0)
    untrained = build_model("small-cnn", ds.channels, ds.image_size, cfg.model.embedding_dim)
    e0 = embed(untrained, ds.test, make_transform(ds, train=False), torch.device("cpu"))
    r0 = retrieval_metrics(e0, ds.test.labels.numpy())["recall@1"]
    run = open_run(train(cfg, tmp_path, progress=False))
    r1 = run.status()["best"]["test"]["recall@1"]
    assert r1 > r0 + 0.15, (r0, r1)


def test_step_schedule_is_torch_steplr_per_epoch():
    # official Metrix: StepLR(step_size, gamma) stepped once per epoch; Proxy Synthesis stops
    # decaying after decay_stop. Worked by hand for step 2, gamma 0.5, 3 steps per epoch.
    from dml.train import lr_lambda

    cfg = tiny_config(**{"train.schedule": "step", "train.lr_step_epochs": 2,
                         "train.lr_gamma": 0.5, "train.epochs": 7})
    f = lr_lambda(cfg.train, steps_per_epoch=3)
    assert [f(s) for s in range(0, 21, 3)] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]
    stop = lr_lambda(cfg.with_overrides(["train.lr_step_stop=3"]).train, 3)
    assert [stop(s) for s in range(0, 21, 3)] == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.5]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [f(3 * e) for e in range(7)] == pytest.approx(lrs)


def test_random_sampler_draws_without_replacement():
    from dml.data.sampler import RandomBatchSampler

    labels = torch.arange(10).repeat_interleave(7)        # 70 images
    s = RandomBatchSampler(labels, batch_size=20, seed=1)
    batches = list(s)
    assert len(s) == len(batches) == 3 and all(len(b) == 20 for b in batches)
    seen = torch.cat(batches)
    assert len(seen.unique()) == 60                        # one epoch: no image twice
    assert [b.tolist() for b in s] == [b.tolist() for b in batches]   # same epoch, same batches
    s.set_epoch(1)
    assert [b.tolist() for b in s] != [b.tolist() for b in batches]
    with pytest.raises(ValueError, match="batch_size"):
        RandomBatchSampler(labels, batch_size=71)


def test_frozen_backbone_epochs_train_only_the_head(tmp_path):
    # official --warm: the first epochs train the embedding head (and proxies) only
    from dml.checkpoints import load_checkpoint

    cfg = tiny_config(**{"train.epochs": 1, "train.freeze_backbone_epochs": 1,
                         "data.sampler": "random", "data.batch_size": 24,
                         "train.schedule": "step"})
    torch.manual_seed(0)
    run = open_run(train(cfg, tmp_path, progress=False))
    trained, _ = load_checkpoint(run.checkpoint_path("last"))
    from dml.models import build_model
    torch.manual_seed(0)                                   # the trainer's initial weights
    init = build_model("small-cnn", 1, 8, 16, width=16)
    same = {k: torch.equal(v, init.state_dict()[k]) for k, v in trained.state_dict().items()
            if "num_batches_tracked" not in k}
    assert all(v for k, v in same.items() if k.startswith("stages.") and "running" not in k)
    assert not same["head.weight"]


def test_runs_record_method_versions_and_refuse_to_resume_another(tmp_path):
    from dml.config import ConfigError
    from dml.losses import loss_version
    from dml.atomic import atomic_write_json

    cfg = tiny_config(**{"train.epochs": 1, "loss.name": "triplet",
                         "mixing.name": "embedding-expansion"})
    run = open_run(train(cfg, tmp_path, progress=False))
    saved = run.config()
    assert saved["loss"]["version"] == loss_version("triplet") == 2
    assert saved["mixing"]["version"] == 2
    # a run written before Embedding Expansion's fix (no version: 1) cannot be continued
    del saved["mixing"]["version"]
    saved["train"]["epochs"] = 2
    atomic_write_json(run.path / "config.json", saved)
    with pytest.raises(ConfigError, match="mixing.version=1.*version 2"):
        resume(run.path, progress=False)
    with pytest.raises(ConfigError, match="loss.version=7"):
        train(cfg.with_overrides(["loss.version=7"]), tmp_path, progress=False)


def test_decoding_in_worker_processes_trains_the_same_run(tmp_path):
    """train.workers moves the decoding of image files into worker processes; the batches, the
    augmentation and so the trained weights are the same as decoding in the training process."""
    from safetensors.torch import load_file

    from tests.datagen_trees import make_cub

    root = make_cub(tmp_path / "cub", classes=16, per_class=4)
    weights = {}
    for workers in (0, 2):
        cfg = tiny_config(**{"data.name": "cub200", "data.root": str(root),
                             "data.image_size": 16, "train.workers": workers,
                             "data.classes_per_batch": 4, "data.samples_per_class": 2,
                             "train.iterations_per_epoch": 3, "data.augment": "resized_crop",
                             "train.clustering": "false"})
        path = train(cfg, tmp_path / f"w{workers}", progress=False)
        run = open_run(path)
        assert run.status()["state"] == "finished"
        assert 0 <= run.metrics()[-1]["speed"]["data_wait_share"] <= 1
        weights[workers] = load_file(path / "checkpoints" / "last.safetensors")
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
