"""CIFAR-100 from the official python archive (``cifar-100-python.tar.gz``) or its extracted folder.

Layout: ``<root>/cifar-100-python.tar.gz`` or ``<root>/cifar-100-python/{train,test,meta}`` (or
``root`` itself being that folder). The files are Python pickles -- the official format, so reading
them needs pickle; they are read only from the user's own file, with a restricted unpickler that
accepts nothing but plain containers and numpy arrays (no arbitrary code).

Split: fine classes 0-49 are the training pool (taken from the official ``train`` file, 25,000
images), classes 50-99 the test set (from the official ``test`` file, 5,000 images); validation
classes are carved from the pool by ``seed``. 32x32 RGB.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .images import Dataset, ImageSplit, resize_uint8
from .roots import DatasetError, malformed, resolve_root
from .splits import assemble_pool

TRAIN_CLASSES = tuple(range(50))
TEST_CLASSES = tuple(range(50, 100))
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
LAYOUT = """\
<root>/cifar-100-python.tar.gz                 (the official python archive), or
<root>/cifar-100-python/train, test, meta      (its extracted folder; <root> may be that folder)"""

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _unpickle(data: bytes, what: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise malformed("cifar100", f"cannot read {what} ({e})", LAYOUT) from None
    if not isinstance(obj, dict):
        raise malformed("cifar100", f"{what} is not a CIFAR dictionary", LAYOUT)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _probe(path: Path):
    if (path / ARCHIVE).is_file():
        return path / ARCHIVE, ""
    for folder in (path / FOLDER, path):
        if (folder / "train").is_file() or (folder / "test").is_file():
            missing = [f for f in ("train", "test", "meta") if not (folder / f).is_file()]
            if missing:
                return None, f"missing {', '.join(str(folder / m) for m in missing)}"
            return folder, ""
    if path.is_file() and path.name.endswith(".tar.gz"):
        return path, ""
    return None, f"no {ARCHIVE} or {FOLDER}/ in it"


def _read(src: Path) -> dict[str, dict]:
    out = {}
    if src.is_file():
        try:
            with tarfile.open(src, "r:gz") as tar:
                for member in tar.getmembers():
                    base = member.name.rstrip("/").split("/")[-1]
                    if base in ("train", "test", "meta") and member.isfile():
                        out[base] = _unpickle(tar.extractfile(member).read(), f"{src}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise malformed("cifar100", f"cannot read the archive {src} ({e})", LAYOUT) from None
    else:
        for part in ("train", "test", "meta"):
            if (src / part).is_file():
                out[part] = _unpickle((src / part).read_bytes(), str(src / part))
    for part in ("train", "test"):
        if part not in out:
            raise malformed("cifar100", f"{src} has no '{part}' file", LAYOUT)
        if "data" not in out[part] or "fine_labels" not in out[part]:
            raise malformed("cifar100", f"{src}:{part} lacks 'data' or 'fine_labels'", LAYOUT)
    return out


def load_cifar100(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"cifar100: unknown split {split!r}; valid: 'default' (classes 0-49 train / 50-99 test)")
    src = resolve_root("cifar100", root, _probe, candidates=("data/cifar100",), aliases=("cifar-100", FOLDER), layout=LAYOUT)
    parts = _read(src)
    size = int(image_size or 32)
    names = [str(n.decode() if isinstance(n, bytes) else n) for n in parts.get("meta", {}).get("fine_label_names", [])]

    def make(part: str, classes) -> ImageSplit:
        d = parts[part]
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = torch.as_tensor(np.asarray(d["fine_labels"], dtype=np.int64))
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise malformed("cifar100", f"{src}:{part} has data {data.shape} / {len(labels)} labels (expected (N, 3072))", LAYOUT)
        keep = torch.isin(labels, torch.tensor(classes)).nonzero().flatten()
        imgs = torch.from_numpy(data.reshape(-1, 3, 32, 32))[keep]
        return ImageSplit(labels[keep], resize_uint8(imgs, size), image_size=size, channels=3)

    pool = make("train", TRAIN_CLASSES)
    test = make("test", TEST_CLASSES)
    return assemble_pool("cifar100", pool, test, names=dict(enumerate(names)), source=str(src),
                         val_classes=val_classes, seed=seed)
