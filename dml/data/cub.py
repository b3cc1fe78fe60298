"""CUB-200-2011 (Wah et al. 2011), path-backed.

Layout: ``<root>/images.txt``, ``image_class_labels.txt``, ``classes.txt``, ``images/<class>/<file>.jpg``
(``root`` may also be the parent of ``CUB_200_2011/``). Split (the DML standard, *not*
``train_test_split.txt``): classes 1-100 are the training pool (5,864 images), 101-200 the test set
(5,924 images); validation classes are carved from the pool by ``seed``. Images are decoded on
demand, converted to RGB, shorter side resized to ``image_size`` (default 64) and centre-cropped.
"""

from __future__ import annotations

from pathlib import Path

from .images import PATH_DEFAULT_SIZE, Dataset
from .roots import DatasetError, check_files_exist, malformed, read_index, resolve_root, to_int
from .splits import assemble_by_threshold

NAME = "cub200"
INDEX_FILES = ("images.txt", "image_class_labels.txt", "classes.txt")
LAYOUT = """\
<root>/images.txt               "<image_id> <class_folder>/<file>.jpg"
<root>/image_class_labels.txt   "<image_id> <class_id 1..200>"
<root>/classes.txt              "<class_id> <NNN.Class_name>"
<root>/images/<class_folder>/<file>.jpg
(<root> may also be the folder that contains CUB_200_2011/)"""


def _probe(path: Path):
    for folder in (path, path / "CUB_200_2011"):
        if (folder / "images.txt").is_file():
            missing = [f for f in INDEX_FILES if not (folder / f).is_file()]
            if missing:
                return None, f"missing index file {folder / missing[0]}"
            return folder, ""
    return None, "missing index file images.txt (and no CUB_200_2011/ in it)"


def load_cub200(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"{NAME}: unknown split {split!r}; valid: 'default' (classes 1-100 train / 101-200 test)")
    folder = resolve_root(NAME, root, _probe, candidates=(f"data/{NAME}", "data/CUB_200_2011"), aliases=("CUB_200_2011", "cub"), layout=LAYOUT)
    size = int(image_size or PATH_DEFAULT_SIZE)
    images = {r[0]: r[1] for r in read_index(NAME, folder / "images.txt", 2, LAYOUT)}
    labels = {r[0]: to_int(NAME, r[1], str(folder / "image_class_labels.txt"), LAYOUT) for r in read_index(NAME, folder / "image_class_labels.txt", 2, LAYOUT)}
    names = {}
    for r in read_index(NAME, folder / "classes.txt", 2, LAYOUT):
        cid = to_int(NAME, r[0], str(folder / "classes.txt"), LAYOUT)
        names[cid] = r[1].split(".", 1)[-1] if "." in r[1] else r[1]
    missing = [i for i in images if i not in labels]
    if missing:
        raise malformed(NAME, f"image id {missing[0]} of images.txt has no entry in {folder / 'image_class_labels.txt'}", LAYOUT)
    ids = sorted(images, key=lambda s: (len(s), s))
    paths = [str(folder / "images" / images[i]) for i in ids]
    check_files_exist(NAME, paths, folder / "images.txt", LAYOUT)
    labs = [labels[i] for i in ids]
    return assemble_by_threshold(NAME, labs, paths, 100, size, val_classes, seed, names, str(folder),
                                 folder / 'image_class_labels.txt', LAYOUT)
