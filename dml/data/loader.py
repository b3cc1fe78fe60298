"""Training batches ready on the device: decoding in worker processes, augmentation on the device.

    with train_batches(ds.train, sampler, train_tf, device, workers=None) as batches:
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch)
            for idx, x in batches:                 # idx: the sampler's batch (CPU), x: on `device`
                y = train_y[idx].to(device)

Why: path-backed data sets (CUB, Cars, SOP, In-Shop) decode JPEGs, and decoding in the training
process stalls the model on every step. Here, for a path-backed split with ``workers > 0``, a
``DataLoader`` runs ``workers`` processes that only decode (uint8, one batch per item, one batch
at a time per process, no thread pool, one torch thread), ``prefetch`` batches ahead each, into
pinned memory when the device is CUDA, so ``.to(device, non_blocking=True)`` really overlaps.
The augmentation (``BatchTransform``) then runs on the device, in the training process, in batch
order, at the moment the consumer asks for the batch: it draws its random numbers from the same
CPU stream at the same points as ``transform(split.load(idx))`` in the loop did, so the batches
are bit-identical whatever ``workers`` is (on the CPU: identical to the old path too). The
DataLoader gets its own generator, so starting workers never consumes torch's global RNG.

In-memory splits (digits, Omniglot, CIFAR) are indexed in the training process (no workers: a
gather of a few KB needs none) and augmented on the device as well.
"""

from __future__ import annotations

from typing import Iterator

import torch

from dml.distributed import cores_given

from .images import ImageSplit
from .roots import DatasetError

MAX_DEFAULT_WORKERS = 8


def default_workers(split: ImageSplit) -> int:
    """Decoding processes for ``split`` when ``workers`` is None: 0 for in-memory splits; for
    path-backed ones one core is left to the trainer (which copies, augments and feeds the
    device), the rest decode, at most MAX_DEFAULT_WORKERS; 0 on a single core (a worker there
    only adds process switches)."""
    if split.in_memory:
        return 0
    cores = cores_given()
    return 0 if cores < 2 else min(MAX_DEFAULT_WORKERS, cores - 1)


class _DecodedBatches(torch.utils.data.Dataset):
    """One item = one whole batch: ``idx`` (the batch sampler's indices) -> ``(idx, uint8
    images)``. A DatasetError (a missing or corrupt image) is returned, not raised, so the training
    process re-raises it with its own one-line message instead of the worker's wrapped traceback."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx):
        try:
            return idx, self.split.load(idx)
        except DatasetError as e:
            return idx, e


class _IndexArrays:
    """The batch sampler, its batches as numpy arrays: a few hundred int64 go to a worker by value
    in the pickle, where a tensor would be passed as a shared-memory file descriptor (a socket
    handshake with the trainer's fd server per batch). Iterated afresh per epoch, like the sampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler:
            yield torch.as_tensor(idx).numpy()


def _as_is(item):
    """The worker's item unchanged (``(index array, uint8 tensor)``): the default conversion would
    turn the index array back into a tensor."""
    return item


def _worker_init(worker_id: int) -> None:
    """One torch thread per worker: the workers and the trainer share the cores, and a worker
    decodes one batch with PIL (``ImageSplit.load`` skips its thread pool in a worker)."""
    torch.set_num_threads(1)


class TrainBatches:
    """Iterable over one epoch of ``(idx, x)`` per ``iter()``; see the module docstring.

    Each ``iter()`` walks the sampler afresh (call ``sampler.set_epoch`` before), reusing the same
    worker processes (persistent) across epochs. ``close()`` (or leaving the ``with`` block, also
    on KeyboardInterrupt) ends them; iterating after ``close()`` starts new ones."""

    def __init__(self, split: ImageSplit, sampler, transform, device, workers: int | None,
                 *, prefetch: int = 2):
        workers = default_workers(split) if workers is None else int(workers)
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (or None for the default), got {workers}")
        if int(prefetch) < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.split, self.sampler, self.transform = split, sampler, transform
        self.device = torch.device(device)
        self.workers = 0 if split.in_memory else workers
        self.prefetch = int(prefetch)
        self.loader = self._make_loader() if self.workers > 0 else None

    def _make_loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            _DecodedBatches(self.split),
            batch_size=None,                    # each sampler item is already a whole batch
            sampler=_IndexArrays(self.sampler),
            collate_fn=_as_is,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch,
            persistent_workers=True,            # started once, not per epoch
            worker_init_fn=_worker_init,
            generator=torch.Generator(),        # worker seeds never draw from the global RNG
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __repr__(self) -> str:
        return (f"TrainBatches({self.split!r}, workers={self.workers}, prefetch={self.prefetch}, "
                f"device={self.device})")

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            for idx in self.sampler:
                yield idx, self.split.load(idx)
            return
        for idx, images in self.loader:
            if isinstance(images, BaseException):
                raise images
            yield torch.from_numpy(idx), images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx, images in self._uint8_batches():
            # the transform runs here, when the consumer asks for this batch: same RNG order as before
            yield idx, self.transform(images.to(self.device, non_blocking=True))

    def close(self) -> None:
        """End the worker processes (no-op without workers, or when already closed)."""
        it = None if self.loader is None else self.loader._iterator
        if it is not None:
            self.loader._iterator = None
            it._shutdown_workers()

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def train_batches(split: ImageSplit, sampler, transform, device, workers: int | None, *,
                  prefetch: int = 2) -> TrainBatches:
    """``(idx, x)`` for every batch of ``sampler`` in order, ``x = transform(split.load(idx))``
    computed on ``device``. ``workers``: decoding processes for a path-backed split (None:
    :func:`default_workers`; ignored for in-memory splits); ``prefetch``: batches each worker
    decodes ahead. Create it once and iterate it once per epoch; close it (``with``) at the end."""
    return TrainBatches(split, sampler, transform, device, workers, prefetch=prefetch)
