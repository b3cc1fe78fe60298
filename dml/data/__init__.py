"""Data sets with class-disjoint splits, a balanced P x K batch sampler and batched augmentation.

    from dml.data import load_dataset, BalancedBatchSampler, make_transform
    ds = load_dataset("omniglot")                      # train / val / test, class-disjoint
    sampler = BalancedBatchSampler(ds.train.labels, classes_per_batch=16, samples_per_class=4)
    augment = make_transform(ds, train=True)
    for batch in sampler:
        x = augment(ds.train.load(batch))              # float (B, C, H, W), normalised
        y = ds.train.labels[batch]

Class ids are unique across the data set: train ids are 0..n_train-1, then validation, then test.
"""

from .cache import cache_dir
from .images import Dataset, ImageSplit
from .roots import DatasetError, resolve_root
from .registry import DATASETS, DatasetSpec, canonical_name, list_datasets, load_dataset
from .sampler import BalancedBatchSampler, RandomBatchSampler
from .transforms import BatchTransform, make_transform

__all__ = [
    "ImageSplit",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "DATASETS",
    "load_dataset",
    "list_datasets",
    "canonical_name",
    "resolve_root",
    "cache_dir",
    "BalancedBatchSampler",
    "RandomBatchSampler",
    "make_transform",
    "BatchTransform",
]
