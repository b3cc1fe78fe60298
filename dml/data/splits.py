"""Splits: how many validation classes to carve from the training pool, which ones (by seed), the
relabelling of every split into the block layout of class ids, and the split of the 10-class data
sets (:func:`ten_class_split`), whose validation is held-out images of the training classes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, Dataset, ImageSplit, channel_stats, path_split
from .roots import DatasetError, malformed

# The split of the 10-class data sets (digits, MNIST, Fashion-MNIST, KMNIST), part of a run's
# config (``data.split_version``) so that runs of different splits are never compared:
#   1: the pool was classes 0-5 (idx sets: of the training file only), with 2 validation classes
#      carved from it; the test set classes 6-9 (idx sets: of the test file only). 4 training
#      classes; MNIST-like sets left 30,000 of their 70,000 images unused.
#   2: classes 0-4 train, classes 5-9 test, every image of both files; validation = held-out
#      images of the training classes (``ten_class_split``).
TEN_CLASS_SPLIT_VERSION = 2
TEN_CLASS_SPLIT_VERSIONS = (1, 2)
TEN_CLASS_TRAIN = tuple(range(5))
TEN_CLASS_TEST = tuple(range(5, 10))


def check_split_version(name: str, version: int | None, known=(1,), current: int = 1) -> int:
    """The split version to build (``None``: ``current``); a DatasetError for an unknown one."""
    if version is None:
        return current
    if isinstance(version, bool) or int(version) != version or int(version) not in known:
        raise DatasetError(f"{name}: unknown split_version {version!r}; this Tango builds "
                           f"{', '.join(map(str, known))} (current: {current})")
    return int(version)


def num_val_images(val: float | int | None, n_class: int, name: str = "") -> int:
    """How many images of a class of ``n_class`` images to hold out for validation: ``val`` is
    a fraction in [0, 1) of the class (rounded, at least 1 when > 0) or a count of images per
    class; at least one image of every class stays for training."""
    if val is None or val is False or val == 0:
        return 0
    if isinstance(val, bool):
        raise DatasetError(f"val_classes must be a fraction in [0, 1) or a count, got {val!r}")
    if isinstance(val, float) and not (val >= 1 and val.is_integer()):
        if not 0.0 < val < 1.0:
            raise DatasetError(f"val_classes must be a fraction in [0, 1) or a count, got {val}")
        return int(min(n_class - 1, max(1, round(val * n_class))))
    n = int(val)
    if n < 0 or n >= n_class:
        raise DatasetError(f"val_classes={n} held-out images per class leaves no training image"
                           f"{' in ' + name if name else ''} (a class has {n_class} images)")
    return n


def held_out_images(labels: torch.Tensor, val, seed: int, name: str = "") -> torch.Tensor:
    """Boolean mask of the validation images: per class, a random (by ``seed`` and class) set of
    ``num_val_images`` of its images (a fixed, class-stratified hold-out)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten().numpy()
        n = num_val_images(val, len(members), name)
        if n:
            rng = np.random.default_rng([seed, 0x7A2, int(c)])
            mask[torch.from_numpy(np.sort(rng.choice(members, size=n, replace=False)))] = True
    return mask


def ten_class_split(name: str, full: ImageSplit, *, split: str, val_classes, seed: int,
                    names: dict[int, str], source: str) -> Dataset:
    """Split version 2 of a 10-class data set, from all of its images (``full``, labels 0-9).

    Train on classes 0-4, test on classes 5-9: the class-disjoint protocol of the larger
    benchmarks (CUB-200: the first half of the classes trains, the second half tests; CIFAR-100
    here alike), with every image used. Five training classes are too few to carve validation
    classes from, so by default (``split="default"``) validation is held-out images of the
    training classes: ``val_classes`` is read as the fraction (default 0.2) of each class's
    images, or a count of images per class, drawn by ``seed``; it selects checkpoints on seen
    classes. ``split="class"`` keeps a class-disjoint validation instead: ``val_classes`` of the
    five training classes (fraction or count, as for other data sets; 0.2 -> 2 classes, leaving
    3 to train on).
    """
    pool = split_by_classes(full, TEN_CLASS_TRAIN)
    test = split_by_classes(full, TEN_CLASS_TEST)
    if len(pool.classes()) < 2 or len(test.classes()) < 2:
        raise DatasetError(f"{name}: expected labels 0-9, found {full.classes().tolist()}")
    if split == "class":
        return assemble_pool(name, pool, test, names=names, source=source,
                             val_classes=val_classes, seed=seed)
    mean, std = channel_stats(pool.images)
    val_mask = held_out_images(pool.labels, val_classes, seed, name)
    ds = assemble(name, pool=pool, test=test, val_set=[], names=names, mean=mean, std=std,
                  source=source)
    if val_mask.any():   # the same class ids (train block) for the held-out images
        ds.val = ds.train.subset(val_mask.nonzero().flatten())
        ds.train = ds.train.subset((~val_mask).nonzero().flatten())
    return ds


def concat_splits(*parts: ImageSplit) -> ImageSplit:
    """In-memory splits one after the other (labels and images concatenated, in order)."""
    first = parts[0]
    return ImageSplit(torch.cat([p.labels for p in parts]), torch.cat([p.images for p in parts]),
                      image_size=first.image_size, channels=first.channels)


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
