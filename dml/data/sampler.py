"""Batch samplers: balanced P x K (P classes per batch, K images per class), and plain shuffled
batches (the official Metrix code's sampling on CUB and Cars)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class _EpochBatches:
    """What both samplers share: a fixed number of batches per epoch, reshuffled per
    ``set_epoch`` (as DistributedSampler) from ``seed``."""

    def _set_sizes(self, num_labels: int, batch_size: int, num_batches: int | None,
                   seed: int) -> None:
        self.num_labels, self.batch_size = int(num_labels), int(batch_size)
        self.num_batches = int(num_batches) if num_batches is not None else \
            max(1, self.num_labels // self.batch_size)
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches


class BalancedBatchSampler(_EpochBatches):
    """Yields LongTensor index batches of size ``P * K``: ``P = classes_per_batch`` distinct classes,
    ``K = samples_per_class`` images of each (grouped by class, in class order of drawing).

    * Classes are drawn by walking through seeded random permutations of all classes, so every class
      is used about equally often and no class repeats inside a batch.
    * Images of a class are drawn from a per-class shuffled pool without replacement (refilled with
      a fresh permutation when exhausted); a class with fewer than K images is sampled with replacement.
    * ``num_batches`` defaults to ``len(labels) // (P * K)`` (one "epoch").
    * Deterministic given ``seed`` and the epoch set with ``set_epoch`` (like DistributedSampler,
      iterating twice without ``set_epoch`` repeats the same batches).

    labels: (N,) class ids (tensor, array, list, or an object with a ``labels`` attribute).
    Usable directly as a ``torch.utils.data.DataLoader(batch_sampler=...)``.
    """

    def __init__(self, labels, classes_per_batch: int, samples_per_class: int, num_batches: int | None = None, seed: int = 0):
        if hasattr(labels, "labels") and not isinstance(labels, (torch.Tensor, np.ndarray)):
            labels = labels.labels
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        labels = labels.reshape(-1).astype(np.int64)
        self.P, self.K = int(classes_per_batch), int(samples_per_class)
        if self.P < 1 or self.K < 1:
            raise ValueError(f"classes_per_batch and samples_per_class must be >= 1, got P={self.P}, K={self.K}")
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.classes = classes
        if len(classes) < 2:
            raise ValueError(f"BalancedBatchSampler needs at least 2 classes, got {len(classes)} (from {len(labels)} labels)")
        if self.P > len(classes):
            raise ValueError(
                f"classes_per_batch={self.P} exceeds the number of classes ({len(classes)}); "
                f"use classes_per_batch <= {len(classes)}"
            )
        self._members = [order[s : s + c] for s, c in zip(starts, counts)]  # indices of each class
        self._set_sizes(len(labels), self.P * self.K, num_batches, seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A3])
        n_classes, P, K = len(self.classes), self.P, self.K
        pools = [None] * n_classes  # shuffled remaining members per class (lazily built)
        queue = rng.permutation(n_classes)
        qpos = 0
        for _ in range(self.num_batches):
            # P distinct classes from the class queue; refill with a new permutation that skips the ones taken
            take = queue[qpos : qpos + P]
            qpos += len(take)
            if len(take) < P:
                fresh = rng.permutation(n_classes)
                fresh = fresh[~np.isin(fresh, take)]
                need = P - len(take)
                take = np.concatenate([take, fresh[:need]])
                # classes skipped from `fresh` (already in this batch) go to the end of the new queue
                queue = np.concatenate([fresh[need:], rng.permutation(take[: len(take) - need])])
                qpos = 0
            batch = np.empty(P * K, dtype=np.int64)
            for j, c in enumerate(take):
                members = self._members[c]
                if len(members) < K:
                    chosen = members[rng.integers(0, len(members), size=K)]
                else:
                    pool = pools[c]
                    if pool is None or len(pool) < K:
                        rest = pool if pool is not None else members[:0]
                        fresh_pool = members[rng.permutation(len(members))]
                        if len(rest):  # keep leftovers first, avoid repeating them immediately
                            fresh_pool = np.concatenate([rest, fresh_pool[~np.isin(fresh_pool, rest)], fresh_pool[np.isin(fresh_pool, rest)]])
                        pool = fresh_pool
                    chosen, pools[c] = pool[:K], pool[K:]
                batch[j * K : (j + 1) * K] = chosen
            yield torch.from_numpy(batch)

    def __repr__(self) -> str:
        return (
            f"BalancedBatchSampler(P={self.P}, K={self.K}, classes={len(self.classes)}, "
            f"batches={self.num_batches}, seed={self.seed}, epoch={self.epoch})"
        )


class RandomBatchSampler(_EpochBatches):
    """Yields LongTensor index batches of ``batch_size`` images drawn without replacement from a
    seeded permutation of all images (``DataLoader(shuffle=True, drop_last=True)``, the official
    Metrix sampling on CUB-200 and Cars-196). A batch may hold one image of a class, or none of
    its classmates: losses and mixing see whatever pairs the batch has.

    ``num_batches`` defaults to ``len(labels) // batch_size`` (one epoch); more batches continue
    with fresh permutations. Deterministic given ``seed`` and ``set_epoch``.
    """

    def __init__(self, labels, batch_size: int, num_batches: int | None = None, seed: int = 0):
        if hasattr(labels, "labels") and not isinstance(labels, (torch.Tensor, np.ndarray)):
            labels = labels.labels
        if not 2 <= int(batch_size) <= len(labels):
            raise ValueError(f"batch_size must be in 2..{len(labels)} (the training images), "
                             f"got {int(batch_size)}")
        self._set_sizes(len(labels), batch_size, num_batches, seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, 0x7A4])
        order, pos = rng.permutation(self.num_labels), 0
        for _ in range(self.num_batches):
            if pos + self.batch_size > len(order):           # drop the last partial batch
                order, pos = rng.permutation(self.num_labels), 0
            yield torch.from_numpy(order[pos:pos + self.batch_size].astype(np.int64))
            pos += self.batch_size

    def __repr__(self) -> str:
        return (f"RandomBatchSampler(batch_size={self.batch_size}, images={self.num_labels}, "
                f"batches={self.num_batches}, seed={self.seed}, epoch={self.epoch})")
