"""Core data types and helpers shared by every data-set family.

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

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageSplit",
    "Dataset",
    "DatasetError",
    "POINT_HINT",
    "repo_root",
    "resolve_root",
    "cache_dir",
    "atomic_torch_save",
    "resize_uint8",
    "channel_stats",
    "assemble_pool",
    "num_val_classes",
    "choose_val_classes",
    "assemble",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POINT_HINT = (
    "Point Tango at it with the --data-root PATH flag, `data.root` in the run config, or the DML_DATA "
    "environment variable (DML_DATA=/datasets finds /datasets/{name}, or DML_DATA may be the data folder itself)."
)


class DatasetError(ValueError):
    """A data set could not be found or is malformed. The message says what was tried and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Splits and data set containers
# --------------------------------------------------------------------------------------------------


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


def _load_image_file(path: str, size: int, channels: int) -> np.ndarray:
    """Decode one image, resize its shorter side to ``size`` and centre-crop a square. -> (H, W, C) uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
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
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"could not decode image file {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


_POOL: ThreadPoolExecutor | None = None


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
        """uint8 (B, C, H, W) images for an index tensor/array/list (in-memory: plain tensor indexing)."""
        idx = _as_index(index)
        if self.images is not None:
            return self.images[idx]
        paths = [self.paths[i] for i in idx.tolist()]
        size, ch = self.image_size, self.channels
        if len(paths) >= 8:
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


# --------------------------------------------------------------------------------------------------
# Root resolution
# --------------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The folder holding the ``dml`` package (the repository root in a source checkout)."""
    return Path(__file__).resolve().parent.parent.parent


Probe = Callable[[Path], "tuple[Path | None, str]"]


def resolve_root(
    name: str,
    root: str | os.PathLike | None,
    probe: Probe,
    *,
    candidates: Sequence[str | os.PathLike] = (),
    aliases: Sequence[str] = (),
    layout: str = "",
) -> Path:
    """Find a data set's folder: explicit ``root`` > ``$DML_DATA/<name>`` (or an alias folder name) >
    ``$DML_DATA`` itself > built-in ``candidates`` (relative ones are tried from the current directory
    and from the repository root).

    ``probe(path)`` returns ``(data_dir, "")`` when ``path`` holds the data set (``data_dir`` may be a
    sub-folder such as ``CUB_200_2011``) or ``(None, reason)``. An explicit root is never skipped: if
    it does not hold the data the error says why; neither is an existing ``$DML_DATA/<name>`` folder.
    Otherwise every place is tried and the error lists all.
    """
    tried: list[str] = []

    def attempt(path: Path, label: str) -> Path | None:
        path = Path(os.path.expanduser(str(path)))
        if not path.exists():
            tried.append(f"{path}  ({label}): does not exist")
            return None
        if not path.is_dir() and not path.is_file():
            tried.append(f"{path}  ({label}): not a folder")
            return None
        found, reason = probe(path)
        if found is not None:
            return found
        tried.append(f"{path}  ({label}): {reason}")
        return None

    if root is not None and str(root) != "":
        found = attempt(Path(root), "explicit root")
        if found is not None:
            return found
        raise _not_found(name, tried, layout)

    env = os.environ.get("DML_DATA")
    if env:
        base = Path(os.path.expanduser(env))
        seen = set()
        for sub in (name, *aliases):
            if sub in seen:
                continue
            seen.add(sub)
            p = base / sub
            if p.exists() or sub == name:
                existed = p.exists()
                found = attempt(p, f"$DML_DATA/{sub}")
                if found is not None:
                    return found
                if existed:  # the user's own folder for this data set is broken: say so, do not skip it
                    raise _not_found(name, tried, layout)
        found = attempt(base, "$DML_DATA")
        if found is not None:
            return found

    seen_paths: set[str] = set()
    for cand in candidates:
        cand = Path(os.path.expanduser(str(cand)))
        if cand.is_absolute():
            options = [(cand, "built-in candidate")]
        else:
            options = [
                (Path.cwd() / cand, f"{cand} relative to the current directory"),
                (repo_root() / cand, f"{cand} relative to the repository root"),
            ]
        for p, label in options:
            key = os.path.normpath(str(p))
            if key in seen_paths:
                continue
            seen_paths.add(key)
            found = attempt(Path(key), label)
            if found is not None:
                return found
    raise _not_found(name, tried, layout)


def _not_found(name: str, tried: list[str], layout: str) -> DatasetError:
    lines = [f"Could not find the {name!r} data set. Tried:"]
    lines += [f"  - {t}" for t in tried] or ["  - (nothing: no root given, DML_DATA unset, no candidates)"]
    if layout:
        lines.append("Expected layout:")
        lines += ["  " + ln for ln in layout.strip("\n").splitlines()]
    lines.append(POINT_HINT.format(name=name))
    return DatasetError("\n".join(lines))


def malformed(name: str, problem: str, layout: str = "") -> DatasetError:
    """A data set was found but is malformed (``problem`` names the file)."""
    lines = [f"The {name!r} data set is malformed: {problem}"]
    if layout:
        lines.append("Expected layout:")
        lines += ["  " + ln for ln in layout.strip("\n").splitlines()]
    lines.append(POINT_HINT.format(name=name))
    return DatasetError("\n".join(lines))


def check_files_exist(name: str, paths: Iterable[str], index_file: Path | str, layout: str = "") -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise malformed(name, f"{index_file} references the image {p}, which does not exist", layout)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path | None:
    """``$DML_CACHE`` (``none``/``off``/``0`` disables caching) > ``<repo>/data/cache`` in a source
    checkout > ``~/.cache/tango-dml``."""
    env = os.environ.get("DML_CACHE")
    if env is not None and env.strip():
        if env.strip().lower() in {"none", "off", "0", "false", "no"}:
            return None
        return Path(os.path.expanduser(env))
    root = repo_root()
    if (root / "pyproject.toml").exists():
        return root / "data" / "cache"
    return Path.home() / ".cache" / "tango-dml"


def file_fingerprint(paths: Iterable[Path], extra: object = None) -> str:
    """sha1 over (file name, size, mtime_ns) of ``paths`` plus ``extra`` -- cheap, changes when a file does."""
    items = []
    for p in paths:
        st = os.stat(p)
        items.append([os.path.basename(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": items, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def atomic_torch_save(obj, path: Path) -> bool:
    """torch.save through ``dml.atomic.atomic_write_bytes`` (readable by all: a cache is
    shareable). Returns False (and warns) on failure."""
    import io

    from dml.atomic import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        atomic_write_bytes(path, buf.getvalue(), mode=0o644)
        return True
    except OSError as e:
        warnings.warn(f"could not write cache file {path}: {e}", stacklevel=2)
        return False


# --------------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Class-disjoint splits
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Index-file helpers for the path-backed data sets
# --------------------------------------------------------------------------------------------------

PATH_DEFAULT_SIZE = 64  # default side for CUB / Cars / SOP / In-Shop; use 224 (via config) for ImageNet backbones


def read_index(name: str, path: Path, ncols: int, layout: str = "", skip_header: str | None = None) -> list[list[str]]:
    """Whitespace-separated rows of an index file with at least ``ncols`` columns (blank lines skipped).
    ``skip_header``: drop the first row if its first field equals this string."""
    if not path.is_file():
        raise malformed(name, f"missing index file {path}", layout)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and skip_header is not None and parts[0] == skip_header:
                continue
            if len(parts) < ncols:
                raise malformed(name, f"{path}, line {lineno}: expected {ncols} columns, got {line.strip()!r}", layout)
            rows.append(parts)
    if not rows:
        raise malformed(name, f"index file {path} is empty", layout)
    return rows


def to_int(name: str, value: str, where: str, layout: str = "") -> int:
    try:
        return int(value)
    except ValueError:
        raise malformed(name, f"{where}: expected an integer, got {value!r}", layout) from None


def path_split(labels: Sequence[int], paths: Sequence[str], size: int) -> ImageSplit:
    return ImageSplit(torch.tensor(list(labels), dtype=torch.long), None, list(paths), image_size=size, channels=3)


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
