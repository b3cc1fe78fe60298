"""The data types every data set family returns (:class:`ImageSplit`, :class:`Dataset`), image
decoding for path-backed splits, and uint8 image helpers.

Conventions (all data sets):

* Splits are class-disjoint: train, validation and test never share a class.
* Class ids are unique across the whole data set and laid out in blocks:
  train classes get ids ``0 .. n_train-1`` (so a proxy/softmax head can use them directly),
  validation classes come next, test classes last; an In-Shop gallery shares the query ids.
  Inside a block, ids follow the data set's own class order. ``Dataset.class_names`` maps every
  id back to a human readable name.
* Images are ``uint8`` tensors ``(N, C, H, W)``; small data sets are held in memory, large ones
  (CUB, Cars, SOP, In-Shop) keep file paths and decode + resize on demand in ``ImageSplit.load``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .roots import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATH_DEFAULT_SIZE = 64  # default side for CUB / Cars / SOP / In-Shop; use 224 (via config) for ImageNet backbones


def _as_index(index) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        if index.dtype == torch.bool:
            return index.nonzero().flatten()
        return index.long().flatten().cpu() if index.device.type != "cpu" else index.long().flatten()
    if isinstance(index, (int, np.integer)):
        return torch.tensor([int(index)], dtype=torch.long)
    if isinstance(index, slice):
        raise TypeError("use an index tensor/array/list, not a slice")
    arr = np.asarray(index)
    if arr.dtype == bool:
        arr = np.flatnonzero(arr)
    return torch.as_tensor(arr.astype(np.int64, copy=False)).flatten()


MAX_IMAGE_PIXELS = 64 * 1024 * 1024   # larger images are refused before decoding (64 Mpx)


def open_image(source, where: str):
    """``PIL.Image.open`` of a path or file object, refusing images whose header announces more
    than MAX_IMAGE_PIXELS (a decompression bomb) before any pixel is decoded. Every failure is a
    DatasetError naming ``where``; the caller closes the image (``with open_image(...) as im``)."""
    from PIL import Image

    try:
        im = Image.open(source)
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {where}") from None
    except (OSError, Image.DecompressionBombError) as e:   # UnidentifiedImageError is an OSError
        raise DatasetError(f"could not decode image file {where}: {e}") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise DatasetError(f"image file {where} is {w} x {h} pixels, more than the "
                           f"{MAX_IMAGE_PIXELS // 2**20} Mpx Tango decodes (a corrupt file or a "
                           f"decompression bomb)")
    return im


def _load_image_file(path: str, size: int, channels: int) -> np.ndarray:
    """Decode one image, resize its shorter side to ``size`` and centre-crop a square. -> (H, W, C) uint8."""
    from PIL import Image

    try:
        with open_image(path, path) as im:
            mode = "RGB" if channels == 3 else "L"
            if im.format == "JPEG":
                im.draft(mode, (size, size))  # decode at a reduced scale (>= size): much faster for big JPEGs
            im = im.convert(mode)
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:  # a truncated file fails while decoding
        raise DatasetError(f"could not decode image file {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


_POOL: ThreadPoolExecutor | None = None


def _in_loader_worker() -> bool:
    """True inside a DataLoader worker process (dml.data.loader): there one process decodes one
    batch, so a thread pool there would only fight the other workers and the trainer for cores
    (and a pool inherited through fork has no live threads: submitting to it could hang)."""
    return torch.utils.data.get_worker_info() is not None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2), thread_name_prefix="dml-img")
    return _POOL


@dataclass(repr=False)
class ImageSplit:
    """One split: labels plus images held in memory (``images``) or as files (``paths``).

    labels: (N,) int64 class ids.  images: (N, C, H, W) uint8 or None.  paths: N file names or None.
    Path-backed images are decoded with PIL, converted to RGB (or L), the shorter side resized to
    ``image_size`` and centre-cropped to a square.
    """

    labels: torch.Tensor
    images: torch.Tensor | None
    paths: list[str] | None = None
    image_size: int = 28
    channels: int = 1

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).flatten()
        if self.images is None and self.paths is None:
            raise ValueError("ImageSplit needs images or paths")
        if self.images is not None:
            if self.images.dtype != torch.uint8 or self.images.ndim != 4:
                raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
            if len(self.images) != len(self.labels):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __repr__(self) -> str:
        where = "in memory" if self.images is not None else "from files"
        return (
            f"ImageSplit({len(self)} images, {len(self.classes())} classes, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {where})"
        )

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def load(self, index) -> torch.Tensor:
        """uint8 (B, C, H, W) images for an index tensor/array/list (in-memory: plain tensor indexing;
        path-backed: decoded by a thread pool, or sequentially inside a DataLoader worker)."""
        idx = _as_index(index)
        if self.images is not None:
            return self.images[idx]
        paths = [self.paths[i] for i in idx.tolist()]
        size, ch = self.image_size, self.channels
        if len(paths) >= 8 and not _in_loader_worker():
            arrays = list(_pool().map(lambda p: _load_image_file(p, size, ch), paths))
        else:
            arrays = [_load_image_file(p, size, ch) for p in paths]
        if not arrays:
            return torch.empty((0, ch, size, size), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def subset(self, index) -> "ImageSplit":
        idx = _as_index(index)
        return ImageSplit(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            image_size=self.image_size,
            channels=self.channels,
        )

    def classes(self) -> torch.Tensor:
        """Sorted unique labels."""
        return torch.unique(self.labels)

    def to_memory(self, batch_size: int = 256) -> "ImageSplit":
        """Decode every path-backed image once (handy for small test splits). No-op when in memory."""
        if self.images is not None:
            return self
        n = len(self)
        chunks = [self.load(torch.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
        images = torch.cat(chunks) if chunks else torch.empty((0, self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        return ImageSplit(self.labels.clone(), images, None, self.image_size, self.channels)


@dataclass(repr=False)
class Dataset:
    """A data set with class-disjoint train / validation / test splits (see the module docstring for ids)."""

    name: str
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit
    gallery: ImageSplit | None = None
    class_names: dict[int, str] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    channels: int = 1
    image_size: int = 28
    source: str = ""

    def splits(self) -> dict[str, ImageSplit]:
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        if self.gallery is not None:
            out["gallery"] = self.gallery
        return out

    def summary(self) -> str:
        parts = [f"{k} {len(s)} images / {len(s.classes())} classes" for k, s in self.splits().items()]
        return f"{self.name} ({self.channels}x{self.image_size}x{self.image_size}): " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"Dataset({self.summary()}, source={self.source!r})"


def path_split(labels: Sequence[int], paths: Sequence[str], size: int) -> ImageSplit:
    return ImageSplit(torch.tensor(list(labels), dtype=torch.long), None, list(paths), image_size=size, channels=3)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) to (N, C, size, size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of uint8 (N, C, H, W) images scaled to [0, 1]."""
    c = images.shape[1]
    x = images.transpose(0, 1).reshape(c, -1)
    mean = x.float().mean(1) / 255.0 if x.numel() else torch.full((c,), 0.5)
    # std in float64 via sums to keep memory small for big tensors
    sq = torch.zeros(c, dtype=torch.float64)
    step = 1 << 24
    for i in range(0, x.shape[1], step):
        xi = x[:, i : i + step].double() / 255.0
        sq += ((xi - mean.double()[:, None]) ** 2).sum(1)
    std = (sq / max(1, x.shape[1])).sqrt().float()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
