"""Images for thumbnails: reload a run's data set from its config and turn uint8 (B, C, H, W)
tensors into displayable (B, H', W', C) arrays. Pure (no Streamlit); the app caches the data set
with ``st.cache_resource``."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def load_run_dataset(cfg: Mapping[str, Any]):
    """The data set of a run with exactly the splits it was trained and evaluated on (its split
    version: 1 for a run written before split versions), from its config."""
    from dml.data.registry import dataset_for_config

    return dataset_for_config(cfg["data"])


def to_display(images, min_side: int = 64) -> np.ndarray:
    """uint8 (B, C, H, W) tensor/array -> uint8 (B, H', W', C) with C in {1, 3} -> (B, H', W')
    for grey, upscaled by an integer factor (nearest neighbour: pixels stay crisp) to at least
    ``min_side``."""
    x = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    x = np.transpose(x, (0, 2, 3, 1))
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    f = max(1, -(-min_side // max(1, x.shape[1])))
    if f > 1:
        x = x.repeat(f, axis=1).repeat(f, axis=2)
    return x[..., 0] if x.shape[-1] == 1 else x


def shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """A display image (H, W) or (H, W, C) uint8 no larger than ``max_side`` on its long side
    (area-averaged; a smaller one is returned as it is)."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    from PIL import Image

    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.BOX))


def split_images(ds, split: str, index) -> np.ndarray:
    """uint8 (B, C, H, W) of images ``index`` of a split ('train', 'val', 'test', 'gallery')."""
    import torch

    sp = getattr(ds, split, None)
    if sp is None:
        raise ValueError(f"the data set {getattr(ds, 'name', '')!r} has no {split} split")
    idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
    return sp.load(idx).numpy()
