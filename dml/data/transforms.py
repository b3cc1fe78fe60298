"""Batched augmentation on uint8 (B, C, H, W) tensors -> float32 normalised tensors, on any device.

Kinds (``make_transform(dataset, train, kind)``):

* ``"default"``: grey data sets (1 channel: digits, Omniglot, MNIST-likes) -> ``"translate"``;
  colour data sets (CIFAR-100, CUB, Cars, SOP, In-Shop) -> ``"resized_crop"``. Eval is always plain.
* ``"translate"``: zero-pad by ``max(1, size // 12)`` px (28 px -> 2) and crop back at a random offset per
  sample (integer shift, one gather for the batch; zero is the background for bright-stroke images).
* ``"affine"``: per-sample small random affine (rotation +-10 deg, scale 0.9-1.1, shift up to the
  translate padding), one ``grid_sample`` for the batch, zero fill.
* ``"resized_crop"``: per-sample random resized crop (area 20-100 %, aspect 3/4-4/3) back to the input
  size plus a horizontal flip with probability 1/2, one ``grid_sample`` for the batch.
* ``"none"``: no augmentation (train == eval).

Random parameters are drawn on the CPU (from ``generator`` if given, else the transform's own seeded
generator when ``seed`` was set, else torch's global CPU RNG) and moved to the images' device, so a
batch augmented on the GPU (``dml.data.loader.train_batches``) uses the same random stream as one
augmented on the CPU; generators are CPU generators.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("default", "none", "translate", "affine", "resized_crop")
ALIASES = {"crop": "resized_crop", "rrc": "resized_crop", "random_resized_crop": "resized_crop", "shift": "translate", "off": "none"}


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A few random parameters (CPU) to the images' device. ``non_blocking``: a blocking copy to
    a GPU synchronises its stream, so each batch's augmentation would wait for the previous
    training step to finish; a host-to-device copy from ordinary memory is staged by the driver
    before the call returns, so the CPU tensor may go at once."""
    return t.to(device, non_blocking=True)


class BatchTransform:
    """Callable: uint8 (B, C, H, W) -> float32 (B, C, H, W), ``(x / 255 - mean) / std`` after augmentation."""

    def __init__(
        self,
        mean,
        std,
        kind: str = "none",
        *,
        pad: int | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        max_rotation: float = 10.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        seed: int | None = None,
    ):
        kind = ALIASES.get(kind, kind)
        if kind not in KINDS or kind == "default":
            raise ValueError(f"unknown transform kind {kind!r}; valid: {', '.join(KINDS)}")
        self.kind = kind
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = pad
        self.crop_scale, self.crop_ratio, self.flip = crop_scale, crop_ratio, flip
        self.max_rotation, self.scale_range = max_rotation, scale_range
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchTransform(kind={self.kind!r}, mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"

    @property
    def augments(self) -> bool:
        return self.kind != "none"

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        if dev not in self._stats:
            self._stats[dev] = (self.mean.to(dev), self.std.to(dev))
        mean, std = self._stats[dev]
        if mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"images have {x.shape[1]} channels but the normalisation has {mean.shape[1]}")
        return (x - mean) / std

    def _rand(self, *shape, generator=None) -> torch.Tensor:
        # always on the CPU (whatever torch's default device): the same numbers for a CPU or a
        # CUDA batch, from a CPU generator, so where the batch is augmented changes nothing
        return torch.rand(*shape, generator=generator or self.generator, device="cpu")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.kind == "translate" and images.shape[0]:
            images = self._translate(images, generator)
        x = images.float().div_(255.0)
        if self.kind == "affine" and x.shape[0]:
            x = self._affine(x, generator)
        elif self.kind == "resized_crop" and x.shape[0]:
            x = self._resized_crop(x, generator)
        return self._norm(x)

    def _pad_for(self, size: int) -> int:
        return self.pad if self.pad is not None else max(1, size // 12)

    def _translate(self, x: torch.Tensor, generator) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self._pad_for(min(H, W))
        if p <= 0:
            return x
        xp = F.pad(x, (p, p, p, p))  # zero = background
        off = (self._rand(2, B, generator=generator) * (2 * p + 1)).long().clamp_(max=2 * p)
        off = _to(off, x.device)
        rows = off[0][:, None] + torch.arange(H, device=x.device)  # (B, H)
        cols = off[1][:, None] + torch.arange(W, device=x.device)  # (B, W)
        b = torch.arange(B, device=x.device)[:, None, None, None]
        c = torch.arange(C, device=x.device)[None, :, None, None]
        return xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]

    def _affine(self, x: torch.Tensor, generator) -> torch.Tensor:
        B, C, H, W = x.shape
        r = self._rand(4, B, generator=generator)
        angle = (r[0] * 2 - 1) * math.radians(self.max_rotation)
        lo, hi = self.scale_range
        scale = lo + r[1] * (hi - lo)
        p = self._pad_for(min(H, W))
        tx = (r[2] * 2 - 1) * (2 * p / W)  # normalised coords span 2
        ty = (r[3] * 2 - 1) * (2 * p / H)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(_to(theta, x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _resized_crop(self, x: torch.Tensor, generator) -> torch.Tensor:
        B = x.shape[0]
        r = self._rand(5, B, generator=generator)
        lo, hi = self.crop_scale
        area = lo + r[0] * (hi - lo)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + r[1] * (log_hi - log_lo))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (r[2] * 2 - 1) * (1 - w)  # crop centre in normalised coords, crop stays inside
        cy = (r[3] * 2 - 1) * (1 - h)
        sx = torch.where(r[4] < 0.5, -w, w) if self.flip else w
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(_to(theta, x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def denormalize(x, mean, std) -> np.ndarray:
    """Float normalised (B, C, H, W), a tensor or an array -> uint8 (B, C, H, W): undoes the
    ``(x / 255 - mean) / std`` of ``BatchTransform`` (mixed input images, for display)."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.clip((np.asarray(x, np.float32) * s + m) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def default_kind(dataset) -> str:
    return "translate" if int(getattr(dataset, "channels", 1)) == 1 else "resized_crop"


def make_transform(dataset, train: bool, kind: str = "default", *, seed: int | None = None, **options) -> BatchTransform:
    """Batched transform for ``dataset`` (anything with ``mean``, ``std``, ``channels``).

    train=False -> scale to [0, 1] and normalise only. train=True -> ``kind`` augmentation (see module
    docstring); ``kind="none"`` disables it. Extra ``options`` go to :class:`BatchTransform`.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; valid: {', '.join(KINDS)}")
    if not train:
        kind = "none"
    elif kind == "default":
        kind = default_kind(dataset)
    return BatchTransform(dataset.mean, dataset.std, kind, seed=seed, **options)
