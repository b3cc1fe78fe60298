"""Data-set registry: ``DATASETS[name]`` describes a data set and how to load it (a
:class:`dml.registry.Registry`, as losses, models and mixings)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from dml.registry import Registry

from .images import Dataset
from .roots import DatasetError
from .cars import load_cars196
from .cifar import load_cifar100
from .cub import load_cub200
from .digits import load_digits_dataset
from .idx import load_idx_dataset
from .inshop import load_inshop
from .omniglot import load_omniglot
from .sop import load_sop


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[..., Dataset]
    description: str
    channels: int
    default_image_size: int
    in_memory: bool  # False: path-backed, images decoded on demand
    default_split: str  # human readable
    needs_root: bool = True


DATASETS: Registry[DatasetSpec] = Registry("data set", error=DatasetError)
_ALIASES = {
    "fashion-mnist": ("fashion_mnist", "fashionmnist", "fmnist"), "cifar100": ("cifar-100",),
    "cub200": ("cub", "cub-200-2011", "cub200-2011"), "cars196": ("cars",),
    "sop": ("stanford-online-products",), "inshop": ("in-shop",),
}
for _spec in [
    DatasetSpec("digits", load_digits_dataset, "scikit-learn 8x8 digits (bundled, no download)", 1, 8, True,
                "digits 0-5 train pool / 6-9 test", needs_root=False),
    DatasetSpec("omniglot", load_omniglot, "Omniglot handwritten characters (official zips)", 1, 28, True,
                "alphabet-disjoint: minimal set test = Early_Aramaic, Korean, Tagalog"),
    DatasetSpec("mnist", functools.partial(load_idx_dataset, "mnist"), "MNIST digits (idx files)", 1, 28, True,
                "train-file classes 0-5 / test-file classes 6-9"),
    DatasetSpec("fashion-mnist", functools.partial(load_idx_dataset, "fashion-mnist"), "Fashion-MNIST (idx files)", 1, 28, True,
                "train-file classes 0-5 / test-file classes 6-9"),
    DatasetSpec("kmnist", functools.partial(load_idx_dataset, "kmnist"), "Kuzushiji-MNIST (idx files)", 1, 28, True,
                "train-file classes 0-5 / test-file classes 6-9"),
    DatasetSpec("cifar100", load_cifar100, "CIFAR-100 (official python archive)", 3, 32, True,
                "train-file classes 0-49 / test-file classes 50-99"),
    DatasetSpec("cub200", load_cub200, "CUB-200-2011 birds", 3, 64, False, "classes 1-100 / 101-200"),
    DatasetSpec("cars196", load_cars196, "Stanford Cars196", 3, 64, False, "classes 1-98 / 99-196"),
    DatasetSpec("sop", load_sop, "Stanford Online Products", 3, 64, False, "Ebay_train.txt / Ebay_test.txt"),
    DatasetSpec("inshop", load_inshop, "DeepFashion In-Shop Clothes Retrieval", 3, 64, False,
                "list_eval_partition.txt: train / query vs gallery"),
]:
    DATASETS.register(_spec.name, _spec, aliases=_ALIASES.get(_spec.name, ()))


def list_datasets() -> list[str]:
    """The registered data set names, in registration order."""
    return DATASETS.names()


def canonical_name(name: str) -> str:
    """The registered name of a data set name or alias (``fmnist`` -> ``fashion-mnist``)."""
    return DATASETS.canonical(name)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    image_size: int | None = None,
    val_classes: float | int = 0.2,
    split: str = "default",
    seed: int = 0,
) -> Dataset:
    """Load a data set by name with class-disjoint train / val / test splits.

    root: folder holding the data (default: ``$DML_DATA/<name>``, ``$DML_DATA``, then built-in
    candidates; see ``dml.data.roots.resolve_root``). image_size: square side after resizing (default
    per data set: digits 8, MNIST-likes / Omniglot 28, CIFAR 32, path-backed 64). val_classes: a
    fraction in [0, 1) of the training pool's classes or a class count (0 = no validation split).
    split: "default" or a data-set specific name (omniglot: "alphabet" | "class"). seed: validation
    (and random-split) class choice.
    """
    spec = DATASETS[name]
    if image_size is not None and (int(image_size) != image_size or int(image_size) < 1):
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    return spec.loader(root, image_size=None if image_size is None else int(image_size), val_classes=val_classes, split=split, seed=int(seed))
