"""Reliability of training and checkpoints: a process killed at any write point resumes to the
uninterrupted result (or refuses clearly), loading a checkpoint never reaches past its own
safetensors file, bad configurations and data fail before anything runs with one line naming
the key, and statuses tell the truth after SIGTERM, SIGINT and interrupted map steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dml.checkpoints import CheckpointError, load_checkpoint, resume_points
from dml.config import ConfigError, RunConfig
from dml.runs import RunFormatError, open_run
from dml.train import check_config, resume, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**over) -> RunConfig:
    cfg = RunConfig().with_overrides([
        "data.name=digits", "loss.name=contrastive", "train.epochs=3", "train.seed=5",
        "train.iterations_per_epoch=4", "model.params.width=8", "model.embedding_dim=16",
        "train.threads=1", "train.projections=none", "train.clustering=false"])
    return cfg.with_overrides([f"{k}={v}" for k, v in over.items()])


def weights(run_dir: Path, tag: str = "last") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / f"{tag}.safetensors")


# --------------------------------------------------------------------------- 1. kill safety

# The child trains tiny_config() and SIGKILLs itself at one write point of epoch 2 (of 3).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import dml.checkpoints as C, dml.runs as R, dml.train as T
    from tests.test_reliability import tiny_config

    point, root = sys.argv[1], sys.argv[2]
    epoch = {"now": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def at_epoch_2(f, after=True, nth=1):
        calls = {"n": 0}
        def wrapped(*a, **k):
            if epoch["now"] == 2 and not after:
                calls["n"] += 1
                if calls["n"] == nth:
                    die()
            out = f(*a, **k)
            if epoch["now"] == 2 and after:
                calls["n"] += 1
                if calls["n"] == nth:
                    die()
            return out
        return wrapped

    if point == "metrics-written":          # the evaluation is recorded, no resume point yet
        R.RunWriter.append_metrics = at_epoch_2(R.RunWriter.append_metrics)
    elif point == "best-written":           # best.* of epoch 2 written, no resume point yet
        T.is_better = lambda record, best, metric: True      # epoch 2 is the best (written)
        T.save_checkpoint = at_epoch_2(T.save_checkpoint)
    elif point == "point-files-written":    # all four files in the temporary folder
        C.fsync_dir = at_epoch_2(C.fsync_dir, after=False, nth=1)
    elif point == "point-renamed":          # epoch 2's point exists, last.* still epoch 1
        C.fsync_dir = at_epoch_2(C.fsync_dir, after=True, nth=2)
    elif point == "last-half-linked":       # last.safetensors of epoch 2, last.json of epoch 1
        C.atomic_link = at_epoch_2(C.atomic_link, after=True, nth=1)
    elif point == "before-pruning":         # epoch 1's point not yet removed
        C.resume_points = at_epoch_2(C.resume_points, after=False, nth=1)
    else:
        raise SystemExit(f"unknown point {point}")
    T.train(tiny_config(), root, progress=False,
            on_progress=lambda p: epoch.__setitem__("now", p["epoch"]))
    raise SystemExit("not killed")
""")

KILL_POINTS = ["metrics-written", "best-written", "point-files-written", "point-renamed",
               "last-half-linked", "before-pruning"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    return train(tiny_config(), tmp_path_factory.mktemp("ref"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_write_point_resumes_to_the_uninterrupted_result(tmp_path, reference,
                                                                         point):
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert open_run(path).status()["state"] == "interrupted"      # no process holds the run
    resume(path, progress=False)
    run, ref = open_run(path), open_run(reference)
    assert run.status()["state"] == "finished"
    assert [m["epoch"] for m in run.metrics()] == [1, 2, 3]
    got, want = weights(path), weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ"
    assert [m["test"] for m in run.metrics()] == [m["test"] for m in ref.metrics()]
    assert [p.name for p in resume_points(run)] == ["epoch_0003"]
    assert not list(path.rglob("*.tmp"))
    load_checkpoint(path / "checkpoints" / "last.safetensors")     # a consistent pair


def test_a_resume_point_that_fails_its_checks_falls_back_or_refuses(tmp_path):
    path = train(tiny_config(**{"train.epochs": 1}), tmp_path, progress=False)
    run = open_run(path)
    (point,) = resume_points(run)
    state = point / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF                                               # one flipped byte
    state.write_bytes(bytes(raw))
    with pytest.raises(RunFormatError, match="no consistent epoch.*state.safetensors does not "
                                             "match the checksum"):
        resume(path, progress=False)


def test_the_old_layout_with_weights_and_state_of_different_epochs_is_refused(tmp_path):
    """Before resume points, a kill between last.* and last_state.* left weights of epoch e
    with the optimizer of epoch e-1, and resume accepted it."""
    path = train(tiny_config(**{"train.epochs": 2}), tmp_path, progress=False)
    ck = path / "checkpoints"
    (point,) = resume_points(open_run(path))
    record = json.loads((point / "state.json").read_text())
    (ck / "last_state.safetensors").write_bytes((point / "state.safetensors").read_bytes())
    (ck / "last_state.json").write_text(json.dumps(dict(record, epoch=1)))
    for p in resume_points(open_run(path)):                       # only the old layout left
        import shutil
        shutil.rmtree(p)
    with pytest.raises(RunFormatError, match="last.safetensors is of epoch 2 but "
                                             "last_state.json of epoch 1"):
        resume(path, progress=False)
    (ck / "last_state.json").write_text(json.dumps(record))       # a consistent old run
    resume(path, progress=False)
    assert open_run(path).status()["state"] == "finished"


# --------------------------------------------------------------------------- 3. loading

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = train(tiny_config(**{"train.epochs": 1}), tmp_path_factory.mktemp("ck"),
                 progress=False)
    return path / "checkpoints" / "best.safetensors"


def _with_side(tmp_path, checkpoint, change) -> Path:
    import shutil

    w = tmp_path / "x.safetensors"
    shutil.copyfile(checkpoint, w)
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    change(meta)
    w.with_suffix(".json").write_text(json.dumps(meta))
    return w


@pytest.mark.parametrize("change,match", [
    (lambda m: m["model"]["params"].update(weights_path="/etc/passwd"), "other weights"),
    (lambda m: m["model"]["params"].update(pretrained=True), "other weights"),
    (lambda m: m["model"].update(embedding_dim=4_000_000), "embedding_dim=4000000.*1..8192"),
    (lambda m: m["model"].update(embedding_dim=0), "embedding_dim=0"),
    (lambda m: m.pop("model"), "no 'model' record"),
    (lambda m: m.update(model="small-cnn"), "no 'model' record"),
    (lambda m: m["model"].pop("image_size"), "image_size=None"),
    (lambda m: m["model"].update(name="resnet1000"), "unknown model 'resnet1000'"),
    (lambda m: m["model"]["params"].update(width="wide"), "width='wide' must be a finite"),
    (lambda m: m["model"]["params"].update(evil=1), "unknown model parameter"),
])
def test_a_side_file_cannot_reach_past_the_weights(tmp_path, checkpoint, monkeypatch, change,
                                                   match):
    def no_other_file(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_other_file)
    monkeypatch.setattr("urllib.request.urlopen", no_other_file)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(_with_side(tmp_path, checkpoint, change))
    assert time.perf_counter() - t0 < 5


def test_shapes_are_checked_against_the_header_before_allocating(tmp_path, checkpoint,
                                                                 monkeypatch):
    import dml.models

    built = []                            # architectures built in memory (not on "meta")
    real = dml.models.build_model

    def counting(*a, **k):
        if torch.empty(0).device.type != "meta":
            built.append(a)
        return real(*a, **k)

    monkeypatch.setattr(dml.models, "build_model", counting)
    w = _with_side(tmp_path, checkpoint, lambda m: m["model"].update(embedding_dim=8000))
    with pytest.raises(CheckpointError, match="does not fit.*'head.weight'.*\\[16, .*\\[8000, "):
        load_checkpoint(w)
    assert built == [], "the architecture was built in memory before the header check"
    w.write_bytes(checkpoint.read_bytes()[:-100])                 # truncated weights
    w.with_suffix(".json").write_text(checkpoint.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(w)


def test_non_finite_weights_are_refused(tmp_path, checkpoint):
    from safetensors.torch import load_file, save

    state = {k: v.float() * float("nan") if v.is_floating_point() else v
             for k, v in load_file(checkpoint).items()}
    data = save(state)
    w = tmp_path / "nan.safetensors"
    w.write_bytes(data)
    import hashlib

    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    w.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not finite"):
        load_checkpoint(w)


# --------------------------------------------------------------------------- 4, 5. inputs

@pytest.mark.parametrize("override,match", [
    ("model.embedding_dim=0", "model.embedding_dim=0: must be an integer in 1..8192"),
    ("train.threads=-1", "train.threads=-1: must be an integer in 1..1024"),
    ("train.device=tpu", "train.device='tpu': must be auto, cpu, cuda, cuda:N or mps"),
    ("data.image_size=100000", "data.image_size=100000: must be an integer in 4..1024"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0: must be an integer >= 1"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be a finite number >= 0"),
    ("train.warmup_iterations=-10", "train.warmup_iterations=-10: must be an integer >= 0"),
    ("train.seed=-3", "train.seed=-3: must be an integer in 0..4294967295"),
    ("data.samples_per_class=1", "data.samples_per_class=1: loss 'contrastive' compares pairs"),
    ("loss.params.pos_margin=\"abc\"", "pos_margin='abc' must be a finite number"),
])
def test_bad_values_fail_before_anything_runs_naming_the_key(override, match):
    with pytest.raises(ConfigError) as e:
        check_config(tiny_config().with_overrides([override]))
    assert match in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw", ["inf", "1e999", "-inf"])
def test_non_finite_numbers_are_refused_where_they_are_read(raw):
    with pytest.raises(ConfigError, match="train.lr: expected a (finite )?number"):
        RunConfig().with_overrides([f"train.lr={raw}"])


def test_a_proxy_loss_may_use_one_image_per_class():
    check_config(tiny_config(**{"loss.name": "proxy-anchor", "data.samples_per_class": 1}))


def test_broken_data_files_are_one_line_errors(tmp_path):
    import io
    import struct
    import zipfile
    import zlib

    from PIL import Image

    from dml.data import DatasetError, load_dataset

    bad = tmp_path / "notzip"
    bad.mkdir()
    (bad / "images_background_small1.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable zip archive"):
        load_dataset("omniglot", bad)

    def png(w, h):                       # a header announcing w x h pixels, one row of data
        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * ((w + 7) // 8 + 1))) + chunk(b"IEND", b""))

    ok = io.BytesIO()
    Image.new("L", (105, 105), 255).save(ok, "PNG")
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    for z, alphabets in (("images_background_small1", "ABC"), ("images_background_small2", "DE")):
        with zipfile.ZipFile(bomb / f"{z}.zip", "w") as zf:
            for a in alphabets:
                for c in range(2):
                    for i in range(2):
                        data = png(20_000, 20_000) if (a, c, i) == ("B", 1, 1) else ok.getvalue()
                        zf.writestr(f"{z}/{a}/character{c}/{i}.png", data)
    os.environ["DML_CACHE"] = "off"
    try:
        with pytest.raises(DatasetError, match="character1/1.png.*decompression bomb"):
            load_dataset("omniglot", bomb)
    finally:
        os.environ.pop("DML_CACHE")


# --------------------------------------------------------------------------- 7. statuses

def test_sigterm_marks_the_run_interrupted_and_it_resumes(tmp_path, reference):
    script = textwrap.dedent("""
        import os, signal, sys
        from dml.train import train
        from tests.test_reliability import tiny_config
        def term(p):
            if p["epoch"] == 2 and p["step"] == 6:
                os.kill(os.getpid(), signal.SIGTERM)
        train(tiny_config(), sys.argv[1], progress=False, on_progress=term)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "Terminated" in proc.stderr, proc.stderr[-2000:]
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    st = open_run(path).status()
    assert st["state"] == "interrupted" and "stopped by SIGTERM during epoch 2" in st["error"]
    resume(path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights(path).values(),
                                                 weights(reference).values()))


def test_an_interrupted_map_step_is_marked_and_completed_by_resume(tmp_path, monkeypatch):
    import dml.train as T

    calls = []

    def interrupted_maps(run_dir, epochs, seed, verbose):
        calls.append(run_dir)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return "cached"

    monkeypatch.setattr(T, "cache_projections", interrupted_maps)
    cfg = tiny_config(**{"train.epochs": 1, "train.projections": "last",
                         "train.map_mode": "inline"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False)
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    st = open_run(path).status()
    assert st["state"] == "interrupted" and "while caching the maps" in st["error"]
    resume(path, progress=False)                   # nothing left to train: the maps are made
    st = open_run(path).status()
    assert st["state"] == "finished" and st["progress"]["projections"] == "cached"
    assert len(calls) == 2
