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
from .splits import TEN_CLASS_SPLIT_VERSION, TEN_CLASS_SPLIT_VERSIONS, check_split_version


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
    # the K of Recall@K reported for this data set: the list its literature reports
    recall_at: tuple[int, ...] = (1, 2, 4, 8)
    # versions of the split the loader builds (``split_version=``) and the current one
    split_versions: tuple[int, ...] = (1,)
    split_version: int = 1


# The Recall@K lists of the literature: CUB-200 / Cars196 1, 2, 4, 8; Stanford Online Products
# 1, 10, 100, 1000; In-Shop 1, 10, 20, 30, 40, 50 (e.g. Musgrave et al. 2020, Kim et al. 2020).
RECALL_AT_SOP = (1, 10, 100, 1000)
RECALL_AT_INSHOP = (1, 10, 20, 30, 40, 50)
_TEN = {"split_versions": TEN_CLASS_SPLIT_VERSIONS, "split_version": TEN_CLASS_SPLIT_VERSION}
_TEN_SPLIT = "classes 0-4 train (20 % of their images held out for validation) / 5-9 test"


DATASETS: Registry[DatasetSpec] = Registry("data set", error=DatasetError)
_ALIASES = {
    "fashion-mnist": ("fashion_mnist", "fashionmnist", "fmnist"), "cifar100": ("cifar-100",),
    "cub200": ("cub", "cub-200-2011", "cub200-2011"), "cars196": ("cars",),
    "sop": ("stanford-online-products",), "inshop": ("in-shop",),
}
for _spec in [
    DatasetSpec("digits", load_digits_dataset, "scikit-learn 8x8 digits (bundled, no download)", 1, 8, True,
                f"digits {_TEN_SPLIT}", needs_root=False, **_TEN),
    DatasetSpec("omniglot", load_omniglot, "Omniglot handwritten characters (official zips)", 1, 28, True,
                "alphabet-disjoint: minimal set test = Early_Aramaic, Korean, Tagalog"),
    DatasetSpec("mnist", functools.partial(load_idx_dataset, "mnist"), "MNIST digits (idx files)", 1, 28, True,
                f"all 70,000 images: {_TEN_SPLIT}", **_TEN),
    DatasetSpec("fashion-mnist", functools.partial(load_idx_dataset, "fashion-mnist"), "Fashion-MNIST (idx files)", 1, 28, True,
                f"all 70,000 images: {_TEN_SPLIT}", **_TEN),
    DatasetSpec("kmnist", functools.partial(load_idx_dataset, "kmnist"), "Kuzushiji-MNIST (idx files)", 1, 28, True,
                f"all 70,000 images: {_TEN_SPLIT}", **_TEN),
    DatasetSpec("cifar100", load_cifar100, "CIFAR-100 (official python archive)", 3, 32, True,
                "train-file classes 0-49 / test-file classes 50-99"),
    DatasetSpec("cub200", load_cub200, "CUB-200-2011 birds", 3, 64, False, "classes 1-100 / 101-200"),
    DatasetSpec("cars196", load_cars196, "Stanford Cars196", 3, 64, False, "classes 1-98 / 99-196"),
    DatasetSpec("sop", load_sop, "Stanford Online Products", 3, 64, False, "Ebay_train.txt / Ebay_test.txt",
                recall_at=RECALL_AT_SOP),
    DatasetSpec("inshop", load_inshop, "DeepFashion In-Shop Clothes Retrieval", 3, 64, False,
                "list_eval_partition.txt: train / query vs gallery", recall_at=RECALL_AT_INSHOP),
]:
    DATASETS.register(_spec.name, _spec, aliases=_ALIASES.get(_spec.name, ()))


def list_datasets() -> list[str]:
    """The registered data set names, in registration order."""
    return DATASETS.names()


def canonical_name(name: str) -> str:
    """The registered name of a data set name or alias (``fmnist`` -> ``fashion-mnist``)."""
    return DATASETS.canonical(name)


def recall_at(name: str, override=None) -> tuple[int, ...]:
    """The K of Recall@K for a data set: ``override`` (``train.recall_at``) when given, else the
    data set's list (``DatasetSpec.recall_at``; unknown names: 1, 2, 4, 8)."""
    if override:
        return tuple(int(k) for k in override)
    try:
        return DATASETS[name].recall_at
    except DatasetError:
        return (1, 2, 4, 8)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    image_size: int | None = None,
    val_classes: float | int = 0.2,
    split: str = "default",
    seed: int = 0,
    split_version: int | None = None,
) -> Dataset:
    """Load a data set by name with train / val / test splits (test classes never trained on).

    root: folder holding the data (default: ``$DML_DATA/<name>``, ``$DML_DATA``, then built-in
    candidates; see ``dml.data.roots.resolve_root``). image_size: square side after resizing (default
    per data set: digits 8, MNIST-likes / Omniglot 28, CIFAR 32, path-backed 64). val_classes: a
    fraction in [0, 1) of the training pool's classes or a class count (0 = no validation split);
    for the 10-class sets (digits, MNIST, Fashion-MNIST, KMNIST), whose validation is held-out
    images of the training classes, a fraction of each class's images or a count of images per
    class. split: "default" or a data-set specific name (omniglot: "alphabet" | "class").
    seed: validation (and random-split) choice. split_version: which version of the split to build
    (``None``: the current one; a run's config records it, see ``dataset_for_config``).
    """
    spec = DATASETS[name]
    if image_size is not None and (int(image_size) != image_size or int(image_size) < 1):
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    version = check_split_version(spec.name, split_version, spec.split_versions, spec.split_version)
    extra = {"split_version": version} if len(spec.split_versions) > 1 else {}
    return spec.loader(root, image_size=None if image_size is None else int(image_size), val_classes=val_classes,
                       split=split, seed=int(seed), **extra)


def dataset_for_config(data, *, name: str | None = None, root: str | None = None,
                       image_size: int | None = None) -> Dataset:
    """The data set of a run: ``data`` is its ``DataConfig`` or the ``data`` table of its
    config.json. Rebuilds exactly the splits it was trained and evaluated on: validation
    classes, split, split seed and split version (a config.json without ``split_version`` was
    written before split versions: version 1). ``name`` / ``root`` / ``image_size`` override
    (another data set, e.g. ``dml eval --dataset``, gets its own current split)."""
    d = data if isinstance(data, dict) else dict(vars(data))
    other = name is not None and canonical_name(name) != canonical_name(d["name"])
    version = None if other else d.get("split_version", 1)
    return load_dataset(name or d["name"], root if root is not None or other else d.get("root"),
                        image_size=image_size if image_size is not None else d.get("image_size"),
                        val_classes=d.get("val_classes", 0.2), split=d.get("split", "default"),
                        seed=d.get("split_seed", 0), split_version=version)
