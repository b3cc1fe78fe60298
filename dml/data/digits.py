"""scikit-learn's 8x8 handwritten digits (1,797 images, 16 grey levels, strokes bright). No download.

Split (``data.split_version`` 2; see ``dml.data.splits.ten_class_split``): digits 0-4 train
(901 images; by default 20 % of each digit's images, drawn by ``seed``, held out for validation:
~720 training / ~180 validation images), digits 5-9 test (896 images). ``split="class"`` carves 2 of
the 5 training digits as class-disjoint validation instead. Split version 1 (runs from before):
pool digits 0-5 with 2 validation classes carved from it, test digits 6-9.
Grey levels 0..16 are scaled to 0..255; images stay 8 px unless ``image_size`` asks otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from .images import Dataset, ImageSplit, resize_uint8
from .roots import DatasetError
from .splits import (TEN_CLASS_SPLIT_VERSION, TEN_CLASS_SPLIT_VERSIONS, assemble_pool,
                     check_split_version, split_by_classes, ten_class_split)

TRAIN_CLASSES = tuple(range(6))        # split version 1
TEST_CLASSES = tuple(range(6, 10))


def _read_digits() -> tuple[np.ndarray, np.ndarray, str]:
    # Read sklearn's bundled csv directly: importing sklearn.datasets costs ~2 s, the file ~0.1 s.
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64), f"sklearn load_digits ({path})"
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise DatasetError("the 'digits' data set needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64), "sklearn.datasets.load_digits"


def load_digits_dataset(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0,
                        split_version=None) -> Dataset:
    version = check_split_version("digits", split_version, TEN_CLASS_SPLIT_VERSIONS, TEN_CLASS_SPLIT_VERSION)
    if split not in ("default", "class"):
        raise DatasetError(f"digits: unknown split {split!r}; valid: 'default' (digits 0-4 train with held-out "
                           f"validation images / 5-9 test) or 'class' (class-disjoint validation)")
    images, labels, source = _read_digits()
    x = torch.from_numpy(np.round(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    size = int(image_size or 8)
    x = resize_uint8(x, size)
    full = ImageSplit(torch.from_numpy(labels), x, image_size=size, channels=1)
    if version >= 2:
        return ten_class_split("digits", full, split=split, val_classes=val_classes, seed=seed,
                               names={d: str(d) for d in range(10)}, source=source)
    pool = split_by_classes(full, TRAIN_CLASSES)
    test = split_by_classes(full, TEST_CLASSES)
    return assemble_pool("digits", pool, test, names={d: str(d) for d in range(10)},
                         source=source, val_classes=val_classes, seed=seed)
