"""Tests for dml.data: data sets, class-disjoint splits, root resolution, cache, sampler, transforms."""

from __future__ import annotations

import collections
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import (
    DATASETS,
    BalancedBatchSampler,
    Dataset,
    DatasetError,
    ImageSplit,
    list_datasets,
    load_dataset,
    make_transform,
)
from dml.data.splits import num_val_classes

from . import datagen_trees as gen

from .conftest import REPO, _find_omniglot  # noqa: E402

OMNIGLOT_DIR = _find_omniglot() or REPO.parent / "shared" / "data" / "omniglot"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_OMNIGLOT = (OMNIGLOT_DIR / "images_background_small1.zip").is_file() and (OMNIGLOT_DIR / "images_background_small2.zip").is_file()
HAS_FASHION = FASHION_DIR.is_dir() and any(FASHION_DIR.glob("train-images-idx3-ubyte*"))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test: private cache dir, no DML_DATA from the outside."""
    monkeypatch.setenv("DML_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DML_DATA", raising=False)


def check_dataset(ds: Dataset, held_out_val: bool = False) -> None:
    """Invariants every data set must satisfy. ``held_out_val``: validation is held-out images of
    the training classes (the 10-class sets), else validation classes are disjoint from both."""
    splits = ds.splits()
    class_sets = {k: set(s.classes().tolist()) for k, s in splits.items()}
    # class-disjoint train / val / test (gallery shares the query classes)
    assert not class_sets["train"] & class_sets["test"]
    if "val" in class_sets and held_out_val:
        assert class_sets["val"] == class_sets["train"]
    elif "val" in class_sets:
        assert not class_sets["val"] & class_sets["train"]
        assert not class_sets["val"] & class_sets["test"]
    if "gallery" in class_sets:
        assert not class_sets["gallery"] & (class_sets["train"] | class_sets.get("val", set()))
    # block layout of class ids: train 0..n-1, then val, then test
    n_train = len(class_sets["train"])
    assert class_sets["train"] == set(range(n_train))
    all_ids = set().union(*class_sets.values())
    assert set(ds.class_names) == all_ids
    assert all(isinstance(v, str) and v for v in ds.class_names.values())
    if "val" in class_sets and not held_out_val:
        assert min(class_sets["val"]) == n_train
    for s in splits.values():
        assert s.labels.dtype == torch.int64 and s.labels.ndim == 1
        assert s.image_size == ds.image_size and s.channels == ds.channels
        x = s.load(torch.arange(min(3, len(s))))
        assert x.dtype == torch.uint8 and x.shape[1:] == (ds.channels, ds.image_size, ds.image_size)
    assert len(ds.mean) == ds.channels == len(ds.std)
    assert all(0 <= m <= 1 for m in ds.mean) and all(0 < v <= 1 for v in ds.std)


# --------------------------------------------------------------------------------------------------
# Registry, ImageSplit, split helpers
# --------------------------------------------------------------------------------------------------


def test_registry_names():
    assert list_datasets() == ["digits", "omniglot", "mnist", "fashion-mnist", "kmnist", "cifar100", "cub200", "cars196", "sop", "inshop"]
    assert set(DATASETS) == set(list_datasets())


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    assert "imagenet" in str(e.value)
    for n in list_datasets():
        assert n in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_split_is_an_error():
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", split="alphabet")


def test_imagesplit_load_subset_classes():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    s = ImageSplit(torch.tensor([3, 1, 3, 2, 1, 1, 2, 3, 3, 1]), images, image_size=2)
    assert len(s) == 10
    assert s.classes().tolist() == [1, 2, 3]
    for index in ([0, 4], np.array([0, 4]), torch.tensor([0, 4])):
        assert s.load(index)[:, 0, 0, 0].tolist() == [0, 4]
    mask = s.labels == 2
    assert s.load(mask)[:, 0, 0, 0].tolist() == [3, 6]
    sub = s.subset([1, 2, 3])
    assert len(sub) == 3 and sub.labels.tolist() == [1, 3, 2] and sub.images[:, 0, 0, 0].tolist() == [1, 2, 3]
    assert "10 images" in repr(s)
    with pytest.raises(ValueError):
        ImageSplit(torch.zeros(3), torch.zeros(3, 1, 2, 2))  # not uint8


def test_num_val_classes_rules():
    assert num_val_classes(0.2, 6) == 2  # at least 2 ...
    assert num_val_classes(0.2, 100) == 20
    assert num_val_classes(0.2, 3) == 0  # ... but not from a pool of < 4 classes
    assert num_val_classes(0, 10) == 0 and num_val_classes(0.0, 10) == 0 and num_val_classes(None, 10) == 0
    assert num_val_classes(3, 10) == 3 and num_val_classes(3.0, 10) == 3
    assert num_val_classes(0.9, 10) == 8  # training keeps >= 2 classes
    with pytest.raises(DatasetError, match="fewer than 2 training classes"):
        num_val_classes(9, 10)
    with pytest.raises(DatasetError):
        num_val_classes(-1, 10)
    with pytest.raises(DatasetError):
        num_val_classes(1.5, 10)


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_default_split_and_speed():
    # split version 2: digits 0-4 train (20 % of each digit's images held out for validation),
    # digits 5-9 test; class ids are the digits
    t = time.perf_counter()
    ds = load_dataset("digits")
    assert time.perf_counter() - t < 1.0
    check_dataset(ds, held_out_val=True)
    assert ds.image_size == 8 and ds.channels == 1
    assert len(ds.train) + len(ds.val) == 901 and len(ds.test) == 896
    assert len(ds.train.classes()) == 5 and len(ds.val.classes()) == 5 and len(ds.test.classes()) == 5
    assert {ds.class_names[int(c)] for c in ds.train.classes()} == {"0", "1", "2", "3", "4"}
    assert {ds.class_names[int(c)] for c in ds.test.classes()} == {"5", "6", "7", "8", "9"}
    assert ds.class_names == {d: str(d) for d in range(10)}
    for c in range(5):   # 20 % of every class, rounded
        n = int((ds.train.labels == c).sum() + (ds.val.labels == c).sum())
        assert int((ds.val.labels == c).sum()) == round(0.2 * n)
    assert ds.train.images.dtype == torch.uint8
    assert int(ds.train.images.min()) == 0 and int(ds.train.images.max()) == 255


def test_digits_options():
    ds = load_dataset("digits", val_classes=0, image_size=16)
    assert ds.val is None and len(ds.train.classes()) == 5 and len(ds.train) == 901
    assert ds.image_size == 16 and ds.train.images.shape[1:] == (1, 16, 16)
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=5)
    assert load_dataset("digits", seed=0).val.images.equal(a.val.images)   # fixed by the seed
    assert not a.val.images.equal(b.val.images) and len(a.val) == len(b.val)
    assert len(load_dataset("digits", val_classes=3).val) == 15   # a count: images per class
    # split="class": class-disjoint validation carved from the 5 training digits
    c = load_dataset("digits", split="class")
    check_dataset(c)
    assert len(c.train.classes()) == 3 and len(c.val.classes()) == 2
    assert {c.class_names[int(k)] for k in torch.cat([c.train.classes(), c.val.classes()])} == set("01234")


def test_digits_split_version_1_is_the_old_split():
    # runs from before split versions were trained on this split; it is still built for them
    ds = load_dataset("digits", split_version=1)
    check_dataset(ds)
    assert len(ds.train) + len(ds.val) == 1083 and len(ds.test) == 714
    assert len(ds.train.classes()) == 4 and len(ds.val.classes()) == 2 and len(ds.test.classes()) == 4
    pool_names = {ds.class_names[int(c)] for c in torch.cat([ds.train.classes(), ds.val.classes()])}
    assert pool_names == {"0", "1", "2", "3", "4", "5"}
    assert {ds.class_names[int(c)] for c in ds.test.classes()} == {"6", "7", "8", "9"}
    with pytest.raises(DatasetError, match="split_version 3"):
        load_dataset("digits", split_version=3)
    with pytest.raises(DatasetError, match="split_version 2"):
        load_dataset("omniglot", split_version=2)


# --------------------------------------------------------------------------------------------------
# Omniglot (real zips + synthetic zips)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture
def omniglot(omniglot_cache, omniglot_dir, monkeypatch):
    if not HAS_OMNIGLOT:  # the minimal zips specifically (the full ones give another split)
        pytest.skip(f"Omniglot minimal zips not found in {OMNIGLOT_DIR}")
    monkeypatch.setenv("DML_CACHE", str(omniglot_cache))
    return load_dataset("omniglot", OMNIGLOT_DIR)


def alphabets(ds: Dataset, split: ImageSplit) -> set[str]:
    return {ds.class_names[int(c)].split("/")[0] for c in split.classes()}


def test_omniglot_alphabet_split(omniglot):
    ds = omniglot
    check_dataset(ds)
    assert ds.image_size == 28 and ds.channels == 1
    total = len(ds.train) + len(ds.val) + len(ds.test)
    n_classes = sum(len(s.classes()) for s in ds.splits().values())
    assert total == 4840 and n_classes == 242
    assert alphabets(ds, ds.test) == {"Early_Aramaic", "Korean", "Tagalog"}
    assert alphabets(ds, ds.val) == {"Latin"}
    assert alphabets(ds, ds.train) == {"Balinese", "Greek", "Japanese_(katakana)", "Sanskrit"}
    assert (len(ds.train.classes()), len(ds.val.classes()), len(ds.test.classes())) == (137, 26, 79)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2740, 520, 1580)
    # 20 drawers per character; names are "Alphabet/characterNN"
    counts = collections.Counter(torch.cat([s.labels for s in ds.splits().values()]).tolist())
    assert set(counts.values()) == {20}
    assert all(len(n.split("/")) == 2 and n.split("/")[1].startswith("character") for n in ds.class_names.values())
    # strokes bright on a black background, full range
    x = ds.train.images
    assert x.dtype == torch.uint8 and int(x.min()) == 0 and int(x.max()) == 255
    assert x.float().mean() < 60  # mostly background
    assert x[:, :, 0, :].float().mean() < 5  # borders dark


def test_omniglot_cache_is_fast_and_identical(omniglot, omniglot_cache, monkeypatch):
    files = list(omniglot_cache.glob("omniglot-28px-*.pt"))
    assert len(files) == 1
    assert not list(omniglot_cache.glob("*.tmp"))
    t = time.perf_counter()
    again = load_dataset("omniglot", OMNIGLOT_DIR)
    assert time.perf_counter() - t < 1.0
    assert again.train.images.equal(omniglot.train.images) and again.test.labels.equal(omniglot.test.labels)
    # a torn cache file is ignored and rewritten
    files[0].write_bytes(b"garbage")
    rebuilt = load_dataset("omniglot", OMNIGLOT_DIR, val_classes=0)
    assert rebuilt.val is None and torch.load(files[0], weights_only=True)["images"].shape == (4840, 1, 28, 28)


def test_omniglot_class_split(omniglot):
    a = load_dataset("omniglot", OMNIGLOT_DIR, split="class", seed=0)
    b = load_dataset("omniglot", OMNIGLOT_DIR, split="class", seed=1)
    for ds in (a, b):
        check_dataset(ds)
        assert len(ds.test.classes()) == 79 and len(ds.val.classes()) == 33 and len(ds.train.classes()) == 130
        assert len(alphabets(ds, ds.test) & alphabets(ds, ds.train)) >= 3  # alphabets shared, characters not
    names = lambda d: {d.class_names[int(c)] for c in d.test.classes()}  # noqa: E731
    assert names(a) != names(b)
    assert names(a) == names(load_dataset("omniglot", OMNIGLOT_DIR, split="class", seed=0))


def _png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.random((105, 105)) > 0.1  # mode "1": True = white background
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zip(path: Path, top: str, chars: dict[str, int], drawers: int = 2) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for alphabet, n in chars.items():
            for c in range(1, n + 1):
                for d in range(1, drawers + 1):
                    z.writestr(f"{top}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", _png_bytes(hash((alphabet, c, d)) % 1000))


def test_omniglot_synthetic_minimal_dedup_and_full_set(tmp_path):
    root = tmp_path / "omni"
    root.mkdir()
    _omniglot_zip(root / "images_background_small1.zip", "images_background_small1", {"Greek": 3, "Korean": 4, "Balinese": 3})
    _omniglot_zip(root / "images_background_small2.zip", "images_background_small2", {"Greek": 3, "Tagalog": 2, "Sanskrit": 5})
    ds = load_dataset("omniglot", root, image_size=14)
    check_dataset(ds)
    n_chars = sum(len(s.classes()) for s in ds.splits().values())
    assert n_chars == 3 + 4 + 3 + 2 + 5  # Greek counted once
    assert sum(len(s) for s in ds.splits().values()) == n_chars * 2
    assert alphabets(ds, ds.test) == {"Korean", "Tagalog"}
    assert ds.train.images.shape[1:] == (1, 14, 14)
    # the full background/evaluation pair takes precedence: evaluation alphabets are the test set
    _omniglot_zip(root / "images_background.zip", "images_background", {"Greek": 2, "Latin": 2, "Futurama": 3})
    _omniglot_zip(root / "images_evaluation.zip", "images_evaluation", {"Atlantean": 2, "Kannada": 3})
    full = load_dataset("omniglot", root, val_classes=0)
    check_dataset(full)
    assert alphabets(full, full.test) == {"Atlantean", "Kannada"}
    assert alphabets(full, full.train) == {"Greek", "Latin", "Futurama"}
    assert "images_evaluation.zip" in full.source


def test_omniglot_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        load_dataset("omniglot", tmp_path / "empty")
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "images_background_small1.zip" in msg
    assert "--data-root" in msg and "DML_DATA" in msg


# --------------------------------------------------------------------------------------------------
# MNIST-format files (real Fashion-MNIST when installed; generated idx trees)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real():
    ds = load_dataset("fashion-mnist")  # built-in candidate /usr/share/datasets/fashion-mnist
    check_dataset(ds, held_out_val=True)
    assert ds.source == str(FASHION_DIR)
    # every one of the 70,000 images: classes 0-4 train (20 % held out), 5-9 test
    assert len(ds.train) == 28000 and len(ds.val) == 7000 and len(ds.test) == 35000
    assert {ds.class_names[int(c)] for c in ds.train.classes()} == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"}
    assert {ds.class_names[int(c)] for c in ds.test.classes()} == {"Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert ds.train.images.shape[1:] == (1, 28, 28)
    old = load_dataset("fashion-mnist", split_version=1)   # the split of runs from before
    assert len(old.train) + len(old.val) == 36000 and len(old.test) == 4000
    assert {old.class_names[int(c)] for c in old.test.classes()} == {"Shirt", "Sneaker", "Bag", "Ankle boot"}


@pytest.mark.parametrize("gz", [True, False])
def test_idx_generated(tmp_path, gz):
    root = gen.make_idx(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", root)
    check_dataset(ds, held_out_val=True)
    # both files (60 + 40 images, labels cycle 0..9): classes 0-4 train (2 of each class's 10
    # images held out for validation), 5-9 test
    assert len(ds.train) == 40 and len(ds.val) == 10 and len(ds.test) == 50
    assert {ds.class_names[int(c)] for c in ds.test.classes()} == {"5", "6", "7", "8", "9"}
    old = load_dataset("mnist", root, split_version=1)
    # version 1: pool = classes 0-5 of the training file, test = 6-9 of the test file
    assert len(old.train) + len(old.val) == 36 and len(old.test) == 16
    assert {old.class_names[int(c)] for c in old.test.classes()} == {"6", "7", "8", "9"}
    k = load_dataset("kmnist", root, image_size=14, val_classes=0)
    assert k.class_names[0] == "o" and k.train.images.shape[1:] == (1, 14, 14)


def test_idx_torchvision_layout_and_truncated_file(tmp_path):
    gen.make_idx(tmp_path / "fm" / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", tmp_path / "fm")
    assert ds.source.endswith("raw")
    bad = gen.make_idx(tmp_path / "bad", gz=False)
    data = (bad / "t10k-images-idx3-ubyte").read_bytes()
    (bad / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte is truncated"):
        load_dataset("mnist", bad)
    (bad / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", bad)


# --------------------------------------------------------------------------------------------------
# CIFAR-100 and the path-backed data sets (generated trees)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_generated(tmp_path, archive):
    root = gen.make_cifar100(tmp_path / "cifar", archive=archive)
    ds = load_dataset("cifar100", root)
    check_dataset(ds)
    assert ds.channels == 3 and ds.image_size == 32
    assert len(ds.train.classes()) + len(ds.val.classes()) == 50 and len(ds.test.classes()) == 50
    assert len(ds.train) + len(ds.val) == 100 and len(ds.test) == 100
    assert {ds.class_names[int(c)] for c in ds.test.classes()} == {f"class{i}" for i in range(50, 100)}


def test_cifar100_refuses_foreign_pickles(tmp_path):
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for part in ("train", "test", "meta"):
        (folder / part).write_bytes(pickle.dumps({"data": collections.OrderedDict()}))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("cifar100", tmp_path)


def test_cub200_generated(tmp_path):
    root = gen.make_cub(tmp_path / "CUB_200_2011")
    ds = load_dataset("cub200", tmp_path, val_classes=0)  # the parent of CUB_200_2011/ works too
    check_dataset(ds)
    assert ds.train.paths is not None and ds.train.images is None
    assert ds.image_size == 64 and ds.channels == 3
    assert (len(ds.train), len(ds.test)) == (9, 9)
    assert [ds.class_names[i] for i in range(6)] == ["Bird_1", "Bird_2", "Bird_3", "Bird_101", "Bird_102", "Bird_103"]
    x = ds.test.load([0, 1, 2])
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8
    small = load_dataset("cub200", root, image_size=12, val_classes=0).train.to_memory()
    assert small.images.shape == (9, 3, 12, 12)


def test_cars196_generated(tmp_path):
    root = gen.make_cars(tmp_path / "cars", classes=8)
    ds = load_dataset("cars196", root, val_classes=0)
    check_dataset(ds)
    assert (len(ds.train), len(ds.test)) == (12, 12)
    assert ds.class_names[0] == "Make Model 1" and ds.class_names[4] == "Make Model 99"
    with_val = load_dataset("cars196", root, val_classes=2)
    check_dataset(with_val)
    assert len(with_val.val.classes()) == 2 and len(with_val.train.classes()) == 2


def test_sop_generated(tmp_path):
    root = gen.make_sop(tmp_path / "Stanford_Online_Products", train_classes=5, test_classes=4)
    ds = load_dataset("sop", root)
    check_dataset(ds)
    assert len(ds.train.classes()) + len(ds.val.classes()) == 5 and len(ds.test.classes()) == 4
    assert len(ds.val.classes()) == 2  # 0.2 of 5 -> at least 2
    assert set(ds.class_names.values()) == {f"{'chair' if c % 2 else 'bicycle'}/{c}" for c in range(1, 10)}


def test_inshop_generated(tmp_path):
    root = gen.make_inshop(tmp_path / "inshop", train_items=5, test_items=3, per_item=3)
    ds = load_dataset("inshop", root)
    check_dataset(ds)
    assert ds.gallery is not None
    assert ds.test.classes().tolist() == ds.gallery.classes().tolist()  # queries and gallery share items
    assert (len(ds.test), len(ds.gallery)) == (3, 6)
    assert len(ds.train) + len(ds.val) == 15
    assert ds.class_names[int(ds.test.labels[0])].startswith("WOMEN/Dresses/id_")


# --------------------------------------------------------------------------------------------------
# Malformed roots
# --------------------------------------------------------------------------------------------------


def test_missing_directory_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load_dataset("cub200", missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "images.txt" in msg and "image_class_labels.txt" in msg  # expected layout
    assert "--data-root" in msg and "DML_DATA" in msg and "config" in msg


@pytest.mark.parametrize(
    "name,make,victim,image",
    [
        ("cub200", gen.make_cub, "image_class_labels.txt", False),
        ("cub200", gen.make_cub, "images.txt", False),
        ("sop", gen.make_sop, "Ebay_test.txt", False),
        ("inshop", gen.make_inshop, "Eval/list_eval_partition.txt", False),
        ("cars196", gen.make_cars, "cars_annos.mat", False),
        ("cub200", gen.make_cub, "images/102.Bird_102/Bird_102_0001.jpg", True),
        ("cars196", gen.make_cars, "car_ims/000002.jpg", True),
        ("sop", gen.make_sop, "chair_final/1001_1.JPG", True),
        ("inshop", gen.make_inshop, "img/WOMEN/Dresses/id_00000006/00_1_front.jpg", True),
    ],
)
def test_missing_index_file_or_referenced_image(tmp_path, name, make, victim, image):
    """A missing index file is named with the root; an image the index references but that
    does not exist is named with its full path."""
    root = make(tmp_path / name)
    (root / victim).unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset(name, root)
    msg = str(e.value)
    assert Path(victim).name in msg and str(root) in msg
    if image:
        assert str(root / victim) in msg and "does not exist" in msg


def test_malformed_index_line_and_corrupt_image(tmp_path):
    root = gen.make_cub(tmp_path / "cub")
    (root / "image_class_labels.txt").write_text("1 one\n")
    with pytest.raises(DatasetError, match="image_class_labels.txt.*integer"):
        load_dataset("cub200", root)
    root = gen.make_sop(tmp_path / "sop")
    bad = root / "bicycle_final/1002_0.JPG"
    bad.write_bytes(b"not an image")
    ds = load_dataset("sop", root, val_classes=0)
    with pytest.raises(DatasetError, match="1002_0.JPG"):
        ds.train.load(torch.arange(len(ds.train)))


# --------------------------------------------------------------------------------------------------
# Root resolution order
# --------------------------------------------------------------------------------------------------


def test_root_resolution_order(tmp_path, monkeypatch):
    explicit = gen.make_idx(tmp_path / "explicit")
    env = gen.make_idx(tmp_path / "env" / "mnist")
    cwd = tmp_path / "work"
    gen.make_idx(cwd / "data" / "mnist")
    monkeypatch.chdir(cwd)
    assert load_dataset("mnist").source == str(cwd / "data" / "mnist")  # built-in candidate
    monkeypatch.setenv("DML_DATA", str(tmp_path / "env"))
    assert load_dataset("mnist").source == str(env)  # $DML_DATA/<name> beats candidates
    assert load_dataset("mnist", root=explicit).source == str(explicit)  # explicit beats everything
    monkeypatch.setenv("DML_DATA", str(env))  # $DML_DATA may hold the files directly
    assert load_dataset("mnist").source == str(env)


def test_explicit_root_is_never_skipped(tmp_path, monkeypatch):
    gen.make_idx(tmp_path / "env" / "mnist")
    monkeypatch.setenv("DML_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path / "typo")
    assert str(tmp_path / "typo") in str(e.value) and "explicit root" in str(e.value)


def test_not_found_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DML_DATA", str(tmp_path / "datasets"))
    with pytest.raises(DatasetError) as e:
        load_dataset("kmnist")
    msg = str(e.value)
    assert str(tmp_path / "datasets" / "kmnist") in msg  # $DML_DATA/<name>
    assert "$DML_DATA)" in msg  # $DML_DATA itself
    assert str(tmp_path / "data" / "kmnist") in msg  # candidate relative to the cwd
    assert "relative to the repository root" in msg
    assert "train-images-idx3-ubyte" in msg and "--data-root" in msg


def test_broken_dml_data_folder_is_reported(tmp_path, monkeypatch):
    (tmp_path / "env" / "cub200").mkdir(parents=True)
    monkeypatch.setenv("DML_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError) as e:
        load_dataset("cub200")
    assert str(tmp_path / "env" / "cub200") in str(e.value) and "images.txt" in str(e.value)


def test_omniglot_found_from_repository_root(tmp_path, monkeypatch, omniglot_dir):
    if omniglot_dir.resolve() != (REPO.parent / "shared" / "data" / "omniglot").resolve():
        pytest.skip("Omniglot is not at ../shared/data/omniglot beside this checkout")
    monkeypatch.chdir(tmp_path)  # ../shared/data/omniglot relative to the repository root
    monkeypatch.setenv("DML_CACHE", "off")
    from dml.data.omniglot import CANDIDATES, _probe
    from dml.data.roots import resolve_root

    found = resolve_root("omniglot", None, _probe, candidates=CANDIDATES)
    assert found.resolve() == omniglot_dir.resolve()


def test_caches_share_one_user_folder_that_honours_xdg(tmp_path, monkeypatch):
    """Outside a source checkout the data cache lives beside numba's compiled code, both under
    $XDG_CACHE_HOME/tango; DML_CACHE and NUMBA_CACHE_DIR still win; DML_CACHE=off disables."""
    from dml.data import cache
    from dml.projection import default_numba_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DML_CACHE", raising=False)
    monkeypatch.setattr(cache, "repo_root", lambda: tmp_path / "site-packages")   # no pyproject.toml
    assert cache.cache_dir() == tmp_path / "xdg" / "tango" / "data"
    assert default_numba_cache_dir() == tmp_path / "xdg" / "tango" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "tango" / "data"
    monkeypatch.setenv("DML_CACHE", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("DML_CACHE", "off")
    assert cache.cache_dir() is None


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def test_sampler_batches_are_p_by_k():
    labels = torch.arange(20).repeat_interleave(10)  # 20 classes x 10
    s = BalancedBatchSampler(labels, classes_per_batch=8, samples_per_class=4, seed=3)
    assert len(s) == 200 // 32
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert b.dtype == torch.int64 and b.numel() == 32
        counts = collections.Counter(labels[b].tolist())
        assert len(counts) == 8 and set(counts.values()) == {4}
        assert len(set(b.tolist())) == 32  # without replacement within a class


def test_sampler_determinism_and_epochs():
    labels = np.repeat(np.arange(7), [5, 9, 12, 3, 8, 8, 20])
    a = BalancedBatchSampler(labels, 4, 3, num_batches=25, seed=1)
    b = BalancedBatchSampler(labels, 4, 3, num_batches=25, seed=1)
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    first = torch.cat(list(a))
    assert torch.cat(list(a)).equal(first)  # same epoch -> same batches
    a.set_epoch(1)
    assert not torch.cat(list(a)).equal(first)
    c = BalancedBatchSampler(labels, 4, 3, num_batches=25, seed=2)
    assert not torch.cat(list(c)).equal(first)
    for batch in a:
        assert len(collections.Counter(labels[batch.numpy()].tolist())) == 4


def test_sampler_coverage_and_small_classes():
    labels = torch.arange(30).repeat_interleave(12)
    s = BalancedBatchSampler(labels, 6, 4, seed=0)
    seen = torch.cat(list(s))
    assert seen.unique().numel() >= 0.95 * len(labels)  # one epoch visits (almost) every image
    per_class = collections.Counter(labels[seen].tolist())
    assert len(per_class) == 30 and max(per_class.values()) - min(per_class.values()) <= 8
    # classes smaller than K are sampled with replacement
    small = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    for b in BalancedBatchSampler(small, 3, 4, num_batches=5):
        assert collections.Counter(small[b].tolist()) == {0: 4, 1: 4, 2: 4}


def test_sampler_errors_and_dataloader():
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        BalancedBatchSampler(torch.zeros(10), 1, 2)
    with pytest.raises(ValueError, match=r"classes_per_batch=5 exceeds the number of classes \(3\)"):
        BalancedBatchSampler(torch.arange(3).repeat(4), 5, 2)
    labels = torch.arange(4).repeat(4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(labels), batch_sampler=BalancedBatchSampler(labels, 2, 2))
    assert all(len(torch.unique(batch[0])) == 2 for batch in loader)


def test_sampler_speed():
    labels = torch.randint(0, 1000, (100_000,))
    s = BalancedBatchSampler(labels, 32, 4)
    t = time.perf_counter()
    n = sum(1 for _ in s)
    assert n == 100_000 // 128 and time.perf_counter() - t < 3.0


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _grey_dataset() -> Dataset:
    return load_dataset("digits", image_size=28)


def test_transform_eval_is_plain_normalisation():
    ds = _grey_dataset()
    x = ds.test.load(torch.arange(16))
    ev = make_transform(ds, train=False)
    y = ev(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    expected = (x.float() / 255 - ds.mean[0]) / ds.std[0]
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(ev(x), y)  # deterministic
    assert torch.equal(make_transform(ds, train=True, kind="none")(x), y)


@pytest.mark.parametrize("kind", ["default", "translate", "affine"])
def test_transform_train_grey(kind):
    ds = _grey_dataset()
    x = ds.train.load(torch.arange(64))
    tr = make_transform(ds, train=True, kind=kind)
    assert tr.kind == ("translate" if kind == "default" else kind)
    a, b = tr(x), tr(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert not torch.equal(a, b)
    ev = make_transform(ds, train=False)(x)
    assert abs(a.mean().item() - ev.mean().item()) < 0.15 and 0.6 < a.std().item() / ev.std().item() < 1.2
    assert torch.isfinite(a).all()


def test_transform_translate_is_a_shift():
    ds = _grey_dataset()
    x = torch.zeros(32, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 255  # a square away from the border
    tr = make_transform(ds, train=True, kind="translate", seed=0)
    y = tr(x) * ds.std[0] + ds.mean[0]
    assert torch.allclose(y.sum((1, 2, 3)), torch.full((32,), 64.0), atol=1e-3)  # mass kept: only shifted
    assert len({tuple(torch.nonzero(img[0] > 0.5)[0].tolist()) for img in y}) > 1


def test_transform_colour_resized_crop_and_flip(tmp_path):
    ds = load_dataset("cifar100", gen.make_cifar100(tmp_path / "cifar"))
    x = ds.train.load(torch.arange(32))
    tr = make_transform(ds, train=True)
    assert tr.kind == "resized_crop"
    a, b = tr(x), tr(x)
    assert a.shape == x.shape and a.dtype == torch.float32 and not torch.equal(a, b)
    assert abs(a.mean().item() - make_transform(ds, False)(x).mean().item()) < 0.2
    # full-image crops: every output is the image or its mirror
    ident = make_transform(ds, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), seed=0)
    ev = make_transform(ds, train=False)(x)
    y = ident(x)
    same = (y - ev).abs().amax((1, 2, 3)) < 1e-4
    flipped = (y - ev.flip(-1)).abs().amax((1, 2, 3)) < 1e-4
    assert bool((same | flipped).all()) and same.any() and flipped.any()
    # seeded transforms repeat; a generator argument overrides
    s1, s2 = make_transform(ds, True, seed=7), make_transform(ds, True, seed=7)
    assert torch.equal(s1(x), s2(x))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(tr(x, generator=g1), tr(x, generator=g2))


def test_transform_rejects_bad_input():
    ds = _grey_dataset()
    with pytest.raises(ValueError, match="uint8"):
        make_transform(ds, True)(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="kind"):
        make_transform(ds, True, kind="mixup")
