"""scikit-learn's 8x8 handwritten digits (1,797 images, 16 grey levels, strokes bright). No download.

Split: the training pool is digits 0-5 (1,083 images), the test set digits 6-9 (714 images);
validation classes are carved from the pool at random by ``seed`` (default 0.2 -> 2 classes).
Grey levels 0..16 are scaled to 0..255; images stay 8 px unless ``image_size`` asks otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from .images import Dataset, ImageSplit, resize_uint8
from .roots import DatasetError
from .splits import assemble_pool, split_by_classes

TRAIN_CLASSES = tuple(range(6))
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


def load_digits_dataset(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"digits: unknown split {split!r}; valid: 'default' (== 'class': 0-5 train pool, 6-9 test)")
    images, labels, source = _read_digits()
    x = torch.from_numpy(np.round(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    size = int(image_size or 8)
    x = resize_uint8(x, size)
    full = ImageSplit(torch.from_numpy(labels), x, image_size=size, channels=1)
    pool = split_by_classes(full, TRAIN_CLASSES)
    test = split_by_classes(full, TEST_CLASSES)
    return assemble_pool("digits", pool, test, names={d: str(d) for d in range(10)},
                         source=source, val_classes=val_classes, seed=seed)
