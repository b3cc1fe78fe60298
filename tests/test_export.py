"""`dml export` (issue "Exports"): TensorBoard projector folders, Hugging Face-style model folders,
torch.export (.pt2) and ONNX files of a real run trained once for the module (digits, Metrix, a
few seconds), each format round-tripped; one-line CLI errors; the inspector's Export button."""

from __future__ import annotations

import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dml.checkpoints import CheckpointError, load_checkpoint
from dml.cli import main
from dml.export import (METADATA_COLUMNS, ExportError, export_run, load_exported_model,
                        onnx_missing)
from dml.runs import Run

IMAGE_SIZE = 12          # digits at 12 px, so the sprite's thumbnails can be shrunk (min 8 px)


# --------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def run_path(tmp_path_factory) -> Path:
    """One real run: 2 epochs of Metrix on digits (synthetic points in every evaluation)."""
    from dml.config import RunConfig
    from dml.train import train

    cfg = RunConfig().with_overrides([
        "data.name=digits", f"data.image_size={IMAGE_SIZE}", "loss.name=contrastive",
        "mixing.name=metrix-embed", "train.epochs=2", "train.iterations_per_epoch=4",
        "model.params.width=8", "model.embedding_dim=16", "train.threads=1",
        "train.projections=none", "name=t-export"])
    return Path(train(cfg, tmp_path_factory.mktemp("export-runs"), progress=False))


@pytest.fixture(scope="module")
def dataset(run_path):
    from dml.data.registry import dataset_for_config

    return dataset_for_config(Run(run_path).config()["data"])


def copy_run(run_path: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_path, root / run_path.name))


def rewrite_eval(run: Path, epoch: int, change) -> None:
    """Replace evaluation ``epoch`` of a (copied) run by ``change(arrays) -> arrays``."""
    r = Run(run)
    with np.load(r.eval_path(epoch), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(r.eval_path(epoch), **change(arrays))


def read_metadata(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = (folder / "metadata.tsv").read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    return head, [dict(zip(head, line.split("\t"))) for line in lines[1:]]


def sprite(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(folder / "sprite.png").convert("RGB"))


def tile(canvas: np.ndarray, position: int, n: int, thumb: int) -> np.ndarray:
    grid = math.ceil(math.sqrt(n))
    r, c = divmod(position, grid)
    return canvas[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb]


def as_rgb(images: torch.Tensor) -> np.ndarray:
    x = images.numpy()
    return np.repeat(x[:, :1], 3, axis=1).transpose(0, 2, 3, 1)


def check_images(dataset, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 and normalised float (the eval transform) of the first ``n`` test images."""
    from dml.data.transforms import make_transform

    raw = dataset.test.load(torch.arange(n))
    return raw, make_transform(dataset, train=False)(raw).float()


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dml export: error: "), err
    return err


# --------------------------------------------------------------------------- projector

def test_projector_folder_is_consistent(run_path, dataset, tmp_path):
    run = Run(run_path)
    epoch = run.status()["best"]["epoch"]
    res = export_run(run, "projector", tmp_path / "p", epoch="best", split="train,test")
    out = res.path
    assert sorted(p.name for p in out.iterdir()) == sorted(res.files) == [
        "metadata.tsv", "projector_config.json", "projector_config.pbtxt", "sprite.png",
        "tensors.tsv"]
    ev = run.load_eval(epoch)
    n_train, n_test = len(ev["train_embeddings"]), len(ev["test_embeddings"])
    n_syn = len(ev["synthetic_embeddings"])
    n = n_train + n_test + n_syn
    assert n_syn > 0 and res.info["points"] == n and res.check.startswith("ok: ")

    tensors = np.loadtxt(out / "tensors.tsv", delimiter="\t", dtype=np.float32)
    assert tensors.shape == (n, 16)
    np.testing.assert_allclose(tensors, np.concatenate([
        ev["train_embeddings"].astype(np.float32), ev["test_embeddings"].astype(np.float32),
        ev["synthetic_embeddings"]]), atol=1e-6)

    head, rows = read_metadata(out)
    assert tuple(head) == METADATA_COLUMNS and len(rows) == n
    assert all(len(r) == len(head) for r in rows)
    names = run.class_names()
    train_rows, test_rows, syn_rows = rows[:n_train], rows[n_train:n_train + n_test], \
        rows[n_train + n_test:]
    assert {r["split"] for r in train_rows} == {"train"} and \
        {r["kind"] for r in train_rows + test_rows} == {"real"}
    assert [int(r["class_id"]) for r in test_rows] == ev["test_labels"].tolist()
    assert all(r["class_name"] == names[int(r["class_id"])] for r in test_rows)
    assert [int(r["index"]) for r in test_rows] == list(range(n_test))
    assert all(r["strategy"] == r["lambda"] == r["parent_0_index"] == "" for r in test_rows)

    # synthetic points: provenance, parents as training-split indices (not probe positions)
    assert {(r["split"], r["kind"]) for r in syn_rows} == {("train", "synthetic")}
    assert [r["strategy"] for r in syn_rows] == ev["synthetic_kind"].tolist()
    parents = ev["probe_index"][ev["synthetic_parents"]]
    got = np.array([[int(r["parent_0_index"]), int(r["parent_1_index"])] for r in syn_rows])
    np.testing.assert_array_equal(got, parents)
    labels = dataset.train.labels.numpy()
    classes = np.array([[int(r["parent_0_class"]), int(r["parent_1_class"])] for r in syn_rows])
    np.testing.assert_array_equal(classes, labels[parents])     # the parents' own classes
    assert [int(r["class_id"]) for r in syn_rows] == classes[:, 0].tolist()
    np.testing.assert_allclose([float(r["lambda"]) for r in syn_rows], ev["synthetic_weight"],
                               rtol=1e-5)

    # the sprite: ceil(sqrt(n)) thumbnails a side, each point's own image in row-major order
    canvas = sprite(out)
    grid = math.ceil(math.sqrt(n))
    assert res.info["thumb"] == IMAGE_SIZE and canvas.shape == (grid * IMAGE_SIZE,) * 2 + (3,)
    for pos, img in ((0, dataset.train.load([0])), (n_train - 1, dataset.train.load([n_train - 1])),
                     (n_train + 5, dataset.test.load([5]))):
        np.testing.assert_array_equal(tile(canvas, pos, n, IMAGE_SIZE), as_rgb(img)[0])
    assert (tile(canvas, n - 1, n, IMAGE_SIZE) == 128).all()   # no mixed image stored: grey
    if n < grid * grid:
        assert (tile(canvas, grid * grid - 1, n, IMAGE_SIZE) == 0).all()   # unused cell

    # both config files name the same files and shape
    text = (out / "projector_config.pbtxt").read_text()
    for part in ('tensor_path: "tensors.tsv"', 'metadata_path: "metadata.tsv"',
                 'image_path: "sprite.png"', f"single_image_dim: {IMAGE_SIZE}",
                 f"tensor_shape: {n}", "tensor_shape: 16"):
        assert part in text
    js = json.loads((out / "projector_config.json").read_text())["embeddings"][0]
    assert js["tensorShape"] == [n, 16] and js["sprite"]["singleImageDim"] == [IMAGE_SIZE] * 2


def test_projector_folder_loads_in_tensorboard(run_path, tmp_path):
    """TensorBoard's own projector plugin reads the folder as ``tensorboard --logdir`` would:
    the config parses (ProjectorConfig), the tensor, metadata and sprite are served."""
    pytest.importorskip("tensorboard.plugins.projector.projector_plugin")
    from google.protobuf import text_format
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector import projector_config_pb2
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    res = export_run(Run(run_path), "projector", tmp_path / "p", epoch="last", split="test")
    out, n = res.path, res.info["points"]
    config = text_format.Parse((out / "projector_config.pbtxt").read_text(),
                               projector_config_pb2.ProjectorConfig())
    (emb,) = config.embeddings
    assert list(emb.tensor_shape) == [n, 16] and emb.tensor_path == "tensors.tsv"
    assert list(emb.sprite.single_image_dim) == [IMAGE_SIZE, IMAGE_SIZE]

    class NoRuns:       # a logdir of its own: the projector uses it as run "."
        def list_runs(self, ctx, experiment_id):
            return []

    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(out), data_provider=NoRuns()))
    apps = plugin.get_plugin_apps()
    client = Client(lambda environ, start: apps[environ["PATH_INFO"]](environ, start))
    assert client.get("/runs").get_json() == ["."]
    info = client.get("/info?run=.").get_json()
    name = info["embeddings"][0]["tensorName"]
    assert name == res.info["tensor_name"]
    r = client.get("/tensor", query_string={"run": ".", "name": name})
    assert r.status_code == 200
    served = np.frombuffer(r.get_data(), np.float32).reshape(n, 16)
    np.testing.assert_allclose(served, np.loadtxt(out / "tensors.tsv", delimiter="\t"),
                               rtol=1e-6)
    r = client.get("/metadata", query_string={"run": ".", "name": name})
    assert r.status_code == 200 and len(r.get_data(as_text=True).splitlines()) == n + 1
    r = client.get("/sprite_image", query_string={"run": ".", "name": name})
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert r.get_data() == (out / "sprite.png").read_bytes()


def test_projector_maps_a_training_subsample_and_old_layouts(run_path, dataset, tmp_path):
    """A training subsample (``train_index``, the current evaluation layout): a training point's
    index is its data-set index and its thumbnail that image. Without ``probe_labels`` (older
    evaluations) the parents' classes come from the training labels, the same ones."""
    epoch = Run(run_path).eval_epochs()[-1]
    keep = np.arange(3, len(dataset.train), 5)

    def subsample(a):
        a = dict(a, train_embeddings=a["train_embeddings"][keep],
                 train_labels=a["train_labels"][keep], train_index=keep)
        a["probe_labels"] = dataset.train.labels.numpy()[a["probe_index"]]
        return a

    new = copy_run(run_path, tmp_path / "new")
    rewrite_eval(new, epoch, subsample)
    res = export_run(Run(new), "projector", tmp_path / "p1", epoch=epoch, split="train")
    _, rows = read_metadata(res.path)
    real = [r for r in rows if r["kind"] == "real"]
    assert [int(r["index"]) for r in real] == keep.tolist()
    assert [int(r["class_id"]) for r in real] == dataset.train.labels.numpy()[keep].tolist()
    canvas = sprite(res.path)
    for pos in (0, 7, len(keep) - 1):
        np.testing.assert_array_equal(tile(canvas, pos, len(rows), IMAGE_SIZE),
                                      as_rgb(dataset.train.load([int(keep[pos])]))[0])
    syn_new = [r for r in rows if r["kind"] == "synthetic"]

    old = copy_run(run_path, tmp_path / "old")
    rewrite_eval(old, epoch, lambda a: {k: v for k, v in a.items() if k != "probe_labels"})
    res = export_run(Run(old), "projector", tmp_path / "p2", epoch=epoch, split="train")
    _, rows = read_metadata(res.path)
    syn_old = [r for r in rows if r["kind"] == "synthetic"]
    cols = ("parent_0_index", "parent_1_index", "parent_0_class", "parent_1_class", "class_id")
    assert [[r[c] for c in cols] for r in syn_old] == [[r[c] for c in cols] for r in syn_new]


def test_projector_shrinks_thumbnails_then_subsamples(run_path, tmp_path):
    run = Run(run_path)
    notes = []
    # 100 points, a 10 x 10 grid: at most 100 px a side leaves 10 px thumbnails (of 12)
    res = export_run(run, "projector", tmp_path / "a", split="test", synthetic=False,
                     max_points=100, max_sprite_px=100, log=notes.append)
    assert res.info["points"] == 100 and res.info["thumb"] == 10
    assert sprite(res.path).shape == (100, 100, 3)
    assert any("--max-points 100" in m for m in notes)
    assert any("shrunk from 12 to 10 px" in m for m in res.notes)
    _, rows = read_metadata(res.path)
    assert len(rows) == 100 and len(np.loadtxt(res.path / "tensors.tsv", delimiter="\t")) == 100
    # at 8 px a thumbnail, 64 px hold 8 x 8 = 64 points: the rest are left out, and it says so
    res = export_run(run, "projector", tmp_path / "b", split="test", max_sprite_px=64)
    assert res.info["points"] == 64 and res.info["thumb"] == 8
    assert sprite(res.path).shape == (64, 64, 3)
    assert any("subsample of 64 points" in m for m in res.notes)
    ids = [int(r["index"]) for r in read_metadata(res.path)[1] if r["kind"] == "real"]
    assert ids == sorted(ids)            # a subsample keeps the points' order
    # without a sprite nothing limits the points, and the data set is not needed
    res = export_run(run, "projector", tmp_path / "c", split="test", synthetic=False,
                     sprite=False, data_root="/nonexistent")
    assert "sprite.png" not in res.files and "sprite" not in \
        (res.path / "projector_config.pbtxt").read_text()
    assert res.info["points"] == len(run.load_eval(run.eval_epochs()[-1])["test_embeddings"])


# --------------------------------------------------------------------------- model formats

def test_hf_folder_loads_back_to_identical_embeddings(run_path, dataset, tmp_path):
    run = Run(run_path)
    res = export_run(run, "hf", tmp_path / "hf", epoch="best")
    assert res.files == ["config.json", "model.safetensors"] and res.check.startswith("ok: ")
    config = json.loads((res.path / "config.json").read_text())
    original, info = load_checkpoint(run.checkpoint_path("best"))
    assert config["model"] == {k: info["model"][k] for k in
                               ("name", "in_channels", "image_size", "embedding_dim", "params")}
    assert config["image_mean"] == list(dataset.mean) and config["image_std"] == list(dataset.std)
    assert config["dataset"]["name"] == "digits" and config["source"]["run"] == run.id
    assert config["source"]["epoch"] == info["epoch"] == run.status()["best"]["epoch"]

    loaded, cfg = load_exported_model(res.path)
    raw, x = check_images(dataset)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    # config.json's normalisation is the one the run's model was trained with
    mean = torch.tensor(cfg["image_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close((raw.float() / 255 - mean) / std, x, atol=1e-6, rtol=0)

    # config.json goes through load_checkpoint's validation, never around it
    def tampered(change, name):
        folder = Path(shutil.copytree(res.path, tmp_path / name))
        c = json.loads((folder / "config.json").read_text())
        change(c, folder)
        (folder / "config.json").write_text(json.dumps(c))
        return folder

    cases = {
        "dim": (lambda c, f: c["model"].update(embedding_dim=32), "does not fit"),
        "other-weights": (lambda c, f: c["model"]["params"].update(weights_path="/x.pt"),
                          "other weights"),
        "model": (lambda c, f: c["model"].update(name="no-such-net"), "unknown model"),
        "size": (lambda c, f: c["model"].update(image_size=100000), "image_size"),
        "format": (lambda c, f: c.update(format="something"), "not a 'tango-export'"),
        "no-checksum": (lambda c, f: c.pop("weights"), "checksum"),
        "corrupt": (lambda c, f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0"), "checksum"),
    }
    for name, (change, words) in cases.items():
        with pytest.raises(CheckpointError, match=words):
            load_exported_model(tampered(change, name))


def _pt2_module(folder: Path):
    return torch.export.load(str(folder / "model.pt2")).module()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_program_exports_give_the_same_embeddings(run_path, dataset, tmp_path, fmt):
    if fmt == "onnx" and onnx_missing():
        pytest.skip(f"the onnx format needs {', '.join(onnx_missing())} (the export extra)")
    run = Run(run_path)
    res = export_run(run, fmt, tmp_path / fmt, epoch="last")
    assert res.files == sorted(["config.json", f"model.{fmt}"]) and res.check.startswith("ok: ")
    config = json.loads((res.path / "config.json").read_text())
    assert config["input"]["shape"] == ["batch", 1, IMAGE_SIZE, IMAGE_SIZE]
    assert config["output"] == {"name": "embeddings", "shape": ["batch", 16],
                                "l2_normalized": True}
    original, info = load_checkpoint(run.checkpoint_path("last"))
    assert config["source"]["checkpoint"] == "last" and config["source"]["epoch"] == info["epoch"]
    _, x = check_images(dataset, 16)
    for batch in (x, x[:3], x[:1]):             # the batch dimension is dynamic
        with torch.no_grad():
            want = original(batch).numpy()
        if fmt == "pt2":
            got = _pt2_module(res.path)(batch).detach().numpy()
        else:
            import onnxruntime as ort
            session = ort.InferenceSession(str(res.path / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
            got = session.run(["embeddings"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if fmt == "onnx":
        import onnx
        meta = {p.key: p.value for p in onnx.load(str(res.path / "model.onnx")).metadata_props}
        assert json.loads(meta["tango_config"])["image_mean"] == config["image_mean"]


def test_a_failed_check_writes_nothing(run_path, tmp_path, monkeypatch):
    import dml.export.models

    monkeypatch.setattr(dml.export.models, "CHECK_ATOL", -1.0)   # no difference is small enough
    with pytest.raises(ExportError, match="differ from the PyTorch model's"):
        export_run(Run(run_path), "pt2", tmp_path / "x" / "pt2")
    assert list((tmp_path / "x").iterdir()) == []         # neither the folder nor a temporary


def test_onnx_without_its_packages_is_a_clear_error(run_path, tmp_path, monkeypatch):
    import dml.export.models

    monkeypatch.setattr(dml.export.models, "onnx_missing", lambda: ["onnxruntime"])
    with pytest.raises(ExportError, match=r"needs onnxruntime: pip install -e '\.\[export\]'"):
        export_run(Run(run_path), "onnx", tmp_path / "o")


# --------------------------------------------------------------------------- CLI

def test_cli_export_prints_ok_and_the_folder(run_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    assert main(["export", str(run_path), "--format", "hf", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ok: ") and lines[-1] == str(out)
    assert load_exported_model(out)[0] is not None
    best = Run(run_path).status()["best"]["epoch"]             # an epoch number: its checkpoint
    assert main(["export", str(run_path), "--format", "hf", "--epoch", str(best),
                 "--out", str(tmp_path / "hf-n")]) == 0
    capsys.readouterr()
    source = json.loads((tmp_path / "hf-n" / "config.json").read_text())["source"]
    assert source["epoch"] == best and source["checkpoint"] in ("best", "last")
    # a run id under --runs-dir; the default folder is exports/<run>-<format>-<which>
    monkeypatch.chdir(tmp_path)
    epoch = Run(run_path).eval_epochs()[-1]
    assert main(["export", run_path.name[:15], "--runs-dir", str(run_path.parent),
                 "--format", "projector", "--epoch", "last", "--split", "all"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == Path("exports") / f"{run_path.name}-projector-epoch{epoch:04d}-" \
                                     f"train+val+test"
    assert {r["split"] for r in read_metadata(tmp_path / path)[1]} == {"train", "val", "test"}
    # an existing folder is kept unless --force
    argv = ["export", str(run_path), "--format", "projector", "--out", str(out)]
    assert "exists and is not empty" in one_line_error(capsys, argv)
    assert main(argv + ["--force"]) == 0 and (out / "sprite.png").is_file()


def test_cli_errors_are_one_line(run_path, tmp_path, capsys):
    run = Run(run_path)
    have = ", ".join(map(str, run.eval_epochs()))
    r = str(run_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    cases = [
        (["--format", "projector", "--epoch", "99"],
         f"has no saved evaluation of epoch 99; evaluations saved: {have}"),
        (["--format", "hf", "--epoch", "99"], "has no checkpoint of epoch 99"),
        (["--format", "pt2", "--epoch", "soon"], "--epoch must be best, last or an epoch number"),
        (["--format", "projector", "--split", "gallery"],
         "has no gallery embeddings; it holds train, val, test embeddings and synthetic points"),
        (["--format", "projector", "--split", "foo"], "unknown split 'foo'"),
        (["--format", "projector", "--max-points", "0"], "--max-points must be at least 1"),
        (["--format", "hf", "--data-root", str(foreign)], None),      # digits ignores a root
        (["--format", "projector", "--data-root", str(foreign)], None),
    ]
    for i, (extra, words) in enumerate(cases):
        argv = ["export", r, *extra, "--out", str(tmp_path / f"out{i}")]
        if words is None:
            assert main(argv) == 0, extra
            capsys.readouterr()
            continue
        assert words in one_line_error(capsys, argv), extra
    assert "is not a Tango run" in one_line_error(
        capsys, ["export", str(foreign), "--format", "hf"])
    assert "no run 'nosuchrun'" in one_line_error(
        capsys, ["export", "nosuchrun", "--runs-dir", str(tmp_path), "--format", "hf"])

    # a run that kept no embeddings: train.save_embeddings "none" (no npz at all), or an
    # evaluation holding only the synthetic points
    bare = copy_run(run_path, tmp_path / "bare")
    for f in (bare / "evals").glob("*.npz"):
        f.unlink()
    err = one_line_error(capsys, ["export", str(bare), "--format", "projector"])
    assert "has no saved evaluations" in err and "train.save_embeddings=" in err
    syn_only = copy_run(run_path, tmp_path / "syn-only")
    for e in Run(syn_only).eval_epochs():
        rewrite_eval(syn_only, e, lambda a: {k: v for k, v in a.items()
                                             if k.startswith(("synthetic_", "probe_"))})
    err = one_line_error(capsys, ["export", str(syn_only), "--format", "projector"])
    assert "has no test embeddings" in err and "it holds synthetic points" in err
    # the best epoch's evaluation pruned ("best+last" of another run, or removed by hand)
    best = run.status()["best"]["epoch"]
    pruned = copy_run(run_path, tmp_path / "pruned")
    other = [e for e in run.eval_epochs() if e != best]
    Run(pruned).eval_path(best).unlink()
    err = one_line_error(capsys, ["export", str(pruned), "--format", "projector"])
    assert f"no saved evaluation of its best epoch {best}" in err
    assert f"evaluations saved: {', '.join(map(str, other))}" in err
    # no checkpoint at all
    (pruned / "checkpoints" / "best.safetensors").unlink()
    err = one_line_error(capsys, ["export", str(pruned), "--format", "hf"])
    assert "has no best checkpoint (checkpoints: last (epoch 2))" in err


# --------------------------------------------------------------------------- the app

def open_inspector(root: Path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DML_RUNS", str(root))
    monkeypatch.setenv("DML_NO_WARMUP", "1")
    entry = Path(__file__).resolve().parents[1] / "app" / "main.py"
    at = AppTest.from_file(str(entry), default_timeout=120)
    at.run()
    at.switch_page("views/inspector.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_inspector_export_button_offers_a_checked_download(run_path, monkeypatch):
    at = open_inspector(run_path.parent, monkeypatch)

    def export(fmt: str, **select) -> zipfile.ZipFile:
        at.selectbox(key="ck-export-format").select(fmt).run()
        for key, value in select.items():
            at.selectbox(key=key).select(value).run()
        at.button(key="ck-export").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        assert any(s.value.startswith("ok: ") for s in at.success)
        assert at.get("download_button")
        done = at.session_state["ck-export-result"]
        return zipfile.ZipFile(io.BytesIO(done["data"]))

    z = export("hf")
    names = sorted(Path(n).name for n in z.namelist())
    assert names == ["config.json", "model.safetensors"]
    folder = Path(z.namelist()[0]).parts[0]
    assert folder == f"{run_path.name}-hf-best"

    z = export("projector", **{"ck-export-split": "train"})
    assert sorted(Path(n).name for n in z.namelist()) == [
        "metadata.tsv", "projector_config.json", "projector_config.pbtxt", "sprite.png",
        "tensors.tsv"]
    meta = next(n for n in z.namelist() if n.endswith("metadata.tsv"))
    rows = z.read(meta).decode().splitlines()[1:]
    assert {r.split("\t")[2] for r in rows} == {"train"}


def test_inspector_export_says_what_is_missing(run_path, tmp_path, monkeypatch):
    """A run that saved no evaluations: the projector export is one error line, no download."""
    bare = copy_run(run_path, tmp_path / "runs")
    for f in (bare / "evals").glob("*.npz"):
        f.unlink()
    at = open_inspector(bare.parent, monkeypatch)
    at.selectbox(key="ck-export-format").select("projector").run()
    at.button(key="ck-export").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errs = [e.value for e in at.error]
    assert len(errs) == 1 and errs[0].startswith("Export failed: ") and "\n" not in errs[0]
    assert "has no saved evaluations" in errs[0]
    assert not at.get("download_button")
