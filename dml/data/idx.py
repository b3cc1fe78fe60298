"""MNIST-format data sets (``mnist``, ``fashion-mnist``, ``kmnist``) from idx files, optionally gzipped.

Files (in ``root``, or in ``root/raw`` / ``root/<MNIST|FashionMNIST|KMNIST>/raw`` as torchvision
lays them out)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
    (``train-images.idx3-ubyte`` spellings also accepted)

Split (``data.split_version`` 2, the current one; see ``dml.data.splits.ten_class_split``): every
image of both files (70,000) is used. Classes 0-4 train, classes 5-9 test (35,000 images each; the
official train/test file roles are not kept: their classes overlap). Validation (``split="default"``)
is held-out images of the training classes, 20 % of each class by default (``val_classes``, drawn
by ``seed``): 28,000 training / 7,000 validation images. ``split="class"`` instead carves 2 of the 5
training classes as class-disjoint validation.

Split version 1 (runs from before; still built for them): the training pool was classes 0-5 of the
idx *training* file (~36,000 images) with 2 validation classes carved from it, the test set
classes 6-9 of the idx *test* file (~4,000 images); 30,000 images were never used.
28x28, strokes/objects bright on black, as stored.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .images import Dataset, ImageSplit, resize_uint8
from .roots import DatasetError, malformed, resolve_root
from .splits import (TEN_CLASS_SPLIT_VERSION, TEN_CLASS_SPLIT_VERSIONS, assemble_pool,
                     check_split_version, concat_splits, ten_class_split)

TRAIN_CLASSES = tuple(range(6))        # split version 1
TEST_CLASSES = tuple(range(6, 10))

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
TV_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
CANDIDATES = {
    "mnist": ("data/mnist",),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist"),
    "kmnist": ("data/kmnist",),
}
ALIASES = {"mnist": ("MNIST",), "fashion-mnist": ("fashion_mnist", "FashionMNIST"), "kmnist": ("KMNIST",)}
LAYOUT = """\
<root>/train-images-idx3-ubyte[.gz]   <root>/train-labels-idx1-ubyte[.gz]
<root>/t10k-images-idx3-ubyte[.gz]    <root>/t10k-labels-idx1-ubyte[.gz]
(or the same files under <root>/raw/ or <root>/<MNIST|FashionMNIST|KMNIST>/raw/)"""

FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find(folder: Path, key: str) -> Path | None:
    for stem in FILES[key]:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def _folders(path: Path, name: str) -> list[Path]:
    return [path, path / "raw", path / TV_FOLDER[name] / "raw"]


def _prober(name: str):
    def probe(path: Path):
        for folder in _folders(path, name):
            missing = [FILES[k][0] for k in FILES if _find(folder, k) is None]
            if not missing:
                return folder, ""
            if len(missing) < len(FILES):
                return None, f"missing {', '.join(m + '[.gz]' for m in missing)}"
        return None, f"no {FILES['train_images'][0]}[.gz] (or the other idx files) in it"

    return probe


def read_idx(path: Path, name: str = "idx") -> np.ndarray:
    """Read an idx file (unsigned-byte data only), gzipped or not."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise malformed(name, f"cannot read {path} ({e})", LAYOUT) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise malformed(name, f"{path} is not an unsigned-byte idx file (bad magic number)", LAYOUT)
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise malformed(name, f"{path} is truncated: header says {dims} but the file has {len(data) - header} data bytes", LAYOUT)
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(dims)  # writable copy


def load_idx_dataset(name: str, root=None, *, image_size=None, val_classes=0.2, split="default", seed=0,
                     split_version=None) -> Dataset:
    version = check_split_version(name, split_version, TEN_CLASS_SPLIT_VERSIONS, TEN_CLASS_SPLIT_VERSION)
    if split not in ("default", "class"):
        raise DatasetError(f"{name}: unknown split {split!r}; valid: 'default' (classes 0-4 train with "
                           f"held-out validation images / 5-9 test) or 'class' (class-disjoint validation)")
    folder = resolve_root(name, root, _prober(name), candidates=CANDIDATES[name], aliases=ALIASES[name], layout=LAYOUT)
    arrays = {k: read_idx(_find(folder, k), name) for k in FILES}
    for part in ("train", "test"):
        imgs, labs = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
            raise malformed(name, f"{part} images {imgs.shape} do not match labels {labs.shape} in {folder}", LAYOUT)
    size = int(image_size or arrays["train_images"].shape[-1])

    def make(part: str, classes) -> ImageSplit:
        labels = torch.from_numpy(arrays[f"{part}_labels"].astype(np.int64))
        keep = torch.isin(labels, torch.tensor(classes)).nonzero().flatten()
        imgs = torch.from_numpy(arrays[f"{part}_images"])[keep][:, None]
        return ImageSplit(labels[keep], resize_uint8(imgs, size), image_size=size, channels=1)

    names = dict(enumerate(CLASS_NAMES[name]))
    if version >= 2:
        full = concat_splits(make("train", tuple(range(10))), make("test", tuple(range(10))))
        if len(full.classes()) < 10:
            raise malformed(name, f"expected labels 0-9 in {folder}, found {full.classes().tolist()}", LAYOUT)
        return ten_class_split(name, full, split=split, val_classes=val_classes, seed=seed,
                               names=names, source=str(folder))
    pool = make("train", TRAIN_CLASSES)
    test = make("test", TEST_CLASSES)
    if len(pool.classes()) < 2 or len(test.classes()) < 2:
        raise malformed(name, f"expected labels 0-9 in {folder}, found train {pool.classes().tolist()} / test {test.classes().tolist()}", LAYOUT)
    return assemble_pool(name, pool, test, names=names, source=str(folder),
                         val_classes=val_classes, seed=seed)
