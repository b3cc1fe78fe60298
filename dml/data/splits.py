"""Class-disjoint splits: how many validation classes to carve from the training pool, which ones
(by seed), and the relabelling of every split into the block layout of class ids."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, Dataset, ImageSplit, channel_stats, path_split
from .roots import DatasetError, malformed

def num_val_classes(val_classes: float | int | None, n_pool: int, name: str = "") -> int:
    """How many validation classes to carve from a pool of ``n_pool`` classes.

    ``val_classes`` is a fraction in [0, 1) or a count. A fraction gives at least 2 classes when the
    pool has >= 4 classes (and 0 when it has fewer); training always keeps >= 2 classes.
    """
    if val_classes is None or val_classes is False:
        return 0
    if isinstance(val_classes, bool):
        raise DatasetError(f"val_classes must be a fraction in [0, 1) or a class count, got {val_classes!r}")
    if isinstance(val_classes, float) and not (val_classes >= 1 and val_classes.is_integer()):
        if not 0.0 <= val_classes < 1.0:
            raise DatasetError(f"val_classes must be a fraction in [0, 1) or a class count, got {val_classes}")
        if val_classes == 0 or n_pool < 4:
            return 0
        return int(min(n_pool - 2, max(2, round(val_classes * n_pool))))
    n = int(val_classes)
    if n < 0:
        raise DatasetError(f"val_classes must be >= 0, got {val_classes}")
    if n > 0 and n > n_pool - 2:
        raise DatasetError(
            f"val_classes={n} leaves fewer than 2 training classes{' in ' + name if name else ''} "
            f"(the training pool has {n_pool} classes)"
        )
    return n


def choose_val_classes(pool_classes: Sequence[int], val_classes, seed: int, name: str = "") -> list[int]:
    """Random (by ``seed``) validation classes carved from the training pool."""
    pool = sorted(int(c) for c in pool_classes)
    n = num_val_classes(val_classes, len(pool), name)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, 0x7A1])
    return sorted(int(c) for c in rng.choice(pool, size=n, replace=False))


def assemble(
    name: str,
    *,
    pool: ImageSplit,
    test: ImageSplit,
    val_set: Sequence[int],
    names: dict[int, str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    source: str,
    gallery: ImageSplit | None = None,
) -> Dataset:
    """Split ``pool`` into train / val by the original class ids in ``val_set`` and relabel every split
    into the block layout (train ids first, then val, then test/gallery). ``names`` maps original ids."""
    pool_classes = [int(c) for c in pool.classes()]
    val_set = sorted(int(c) for c in val_set)
    val_lookup = set(val_set)
    train_classes = [c for c in pool_classes if c not in val_lookup]
    test_classes = sorted(set(int(c) for c in test.classes()) | (set(int(c) for c in gallery.classes()) if gallery is not None else set()))
    overlap = set(pool_classes) & set(test_classes)
    if overlap:
        raise DatasetError(f"{name}: training and test classes overlap ({sorted(overlap)[:10]}...)")
    order = train_classes + val_set + test_classes
    max_id = max(order) if order else 0
    lut = torch.full((max_id + 1,), -1, dtype=torch.long)
    lut[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))

    def relabel(split: ImageSplit, keep: torch.Tensor | None = None) -> ImageSplit:
        s = split if keep is None else split.subset(keep)
        return ImageSplit(lut[s.labels], s.images, s.paths, s.image_size, s.channels)

    is_val = torch.zeros(max_id + 1, dtype=torch.bool)
    if val_set:
        is_val[torch.tensor(val_set, dtype=torch.long)] = True
    val_mask = is_val[pool.labels]
    train = relabel(pool, (~val_mask).nonzero().flatten()) if val_set else relabel(pool)
    val = relabel(pool, val_mask.nonzero().flatten()) if val_set else None
    class_names = {i: names.get(c, str(c)) for i, c in enumerate(order)}
    first = pool
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=relabel(test),
        gallery=relabel(gallery) if gallery is not None else None,
        class_names=class_names,
        mean=tuple(mean),
        std=tuple(std),
        channels=first.channels,
        image_size=first.image_size,
        source=source,
    )


def split_by_classes(split: ImageSplit, classes: Iterable[int]) -> ImageSplit:
    """The images of ``split`` whose label is in ``classes``."""
    cl = torch.tensor(sorted(set(int(c) for c in classes)), dtype=torch.long)
    return split.subset(torch.isin(split.labels, cl).nonzero().flatten())


def assemble_pool(name: str, pool: ImageSplit, test: ImageSplit, *, names: dict[int, str],
                  source: str, val_classes=0.2, seed: int = 0,
                  val_set: Sequence[int] | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None) -> Dataset:
    """:func:`assemble` with the usual defaults: validation classes drawn from the pool's classes
    (unless ``val_set`` is given) and normalisation statistics from the pool's pixels (unless
    ``mean`` / ``std`` are given, e.g. ImageNet's for path-backed images)."""
    if val_set is None:
        val_set = choose_val_classes([int(c) for c in pool.classes()], val_classes, seed, name)
    if mean is None or std is None:
        mean, std = channel_stats(pool.images)
    return assemble(name, pool=pool, test=test, val_set=val_set, names=names, mean=mean, std=std,
                    source=source)


def assemble_by_threshold(name: str, labels: Sequence[int], paths: Sequence[str], last_train: int,
                          size: int, val_classes, seed: int, names: dict[int, str], source: str,
                          index_file: Path | str, layout: str = "") -> Dataset:
    """Path-backed data set whose classes ``<= last_train`` form the training pool and the rest
    the test set (CUB-200: 100, Cars196: 98), with ImageNet normalisation."""
    train_idx = [k for k, c in enumerate(labels) if c <= last_train]
    test_idx = [k for k, c in enumerate(labels) if c > last_train]
    if not train_idx or not test_idx:
        raise malformed(name, f"{index_file} must have classes 1-{last_train} (train) and "
                        f"{last_train + 1}+ (test)", layout)
    pool = path_split([labels[k] for k in train_idx], [paths[k] for k in train_idx], size)
    test = path_split([labels[k] for k in test_idx], [paths[k] for k in test_idx], size)
    return assemble_pool(name, pool, test, names=names, source=source, val_classes=val_classes,
                         seed=seed, mean=IMAGENET_MEAN, std=IMAGENET_STD)
