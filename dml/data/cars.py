"""Cars196 (Krause et al. 2013), path-backed.

Layout: ``<root>/cars_annos.mat`` (fields ``relative_im_path``, ``class``; read with
``scipy.io.loadmat``) and ``<root>/car_ims/<file>.jpg``. Split: classes 1-98 are the training pool
(8,054 images), 99-196 the test set (8,131 images); validation classes carved from the pool by
``seed``. Images: RGB, shorter side resized to ``image_size`` (default 64), centre-cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import PATH_DEFAULT_SIZE, Dataset
from .roots import DatasetError, check_files_exist, malformed, resolve_root
from .splits import assemble_by_threshold

NAME = "cars196"
LAYOUT = """\
<root>/cars_annos.mat     struct array 'annotations' with relative_im_path ('car_ims/000001.jpg') and class (1..196)
<root>/car_ims/<file>.jpg"""


def _probe(path: Path):
    for folder in (path, path / "cars196", path / "CARS196"):
        if (folder / "cars_annos.mat").is_file():
            return folder, ""
    return None, "missing index file cars_annos.mat"


def _str(x) -> str:
    x = np.asarray(x).squeeze()
    if x.dtype.kind in "US":
        return str(x.item() if x.ndim == 0 else x.flat[0])
    return str(np.asarray(x).flat[0])


def load_cars196(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"{NAME}: unknown split {split!r}; valid: 'default' (classes 1-98 train / 99-196 test)")
    folder = resolve_root(NAME, root, _probe, candidates=(f"data/{NAME}", "data/cars"), aliases=("CARS196", "cars"), layout=LAYOUT)
    size = int(image_size or PATH_DEFAULT_SIZE)
    mat_path = folder / "cars_annos.mat"
    try:
        from scipy.io import loadmat

        mat = loadmat(str(mat_path), squeeze_me=True)
    except Exception as e:
        raise malformed(NAME, f"cannot read {mat_path} ({e})", LAYOUT) from None
    annos = mat.get("annotations")
    if annos is None or annos.dtype.names is None or not {"relative_im_path", "class"} <= set(annos.dtype.names):
        raise malformed(NAME, f"{mat_path} has no 'annotations' struct with fields relative_im_path and class", LAYOUT)
    annos = np.atleast_1d(annos)
    rel = [_str(p) for p in annos["relative_im_path"]]
    labs = [int(np.asarray(c).squeeze()) for c in annos["class"]]
    raw_names = mat.get("class_names")
    names = {}
    if raw_names is not None:
        for i, n in enumerate(np.atleast_1d(raw_names), 1):
            names[i] = _str(n)
    paths = [str(folder / r) for r in rel]
    check_files_exist(NAME, paths, mat_path, LAYOUT)
    return assemble_by_threshold(NAME, labs, paths, 98, size, val_classes, seed, names, str(folder),
                                 mat_path, LAYOUT)
