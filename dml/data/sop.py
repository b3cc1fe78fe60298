"""Stanford Online Products (Oh Song et al. 2016), path-backed.

Layout: ``<root>/Ebay_train.txt`` and ``<root>/Ebay_test.txt`` (header ``image_id class_id
super_class_id path``; ``root`` may also be the parent of ``Stanford_Online_Products/``), images at
``<root>/<path>``. Split: the official files -- 11,318 training classes (59,551 images), 11,316 test
classes (60,502 images); validation classes carved from the training classes by ``seed``.
Class names are ``"<super class folder>/<class_id>"``. Images: RGB, shorter side resized to
``image_size`` (default 64), centre-cropped.
"""

from __future__ import annotations

from pathlib import Path

from .images import IMAGENET_MEAN, IMAGENET_STD, PATH_DEFAULT_SIZE, Dataset, path_split
from .roots import DatasetError, check_files_exist, read_index, resolve_root, to_int
from .splits import assemble, choose_val_classes

NAME = "sop"
LAYOUT = """\
<root>/Ebay_train.txt   "image_id class_id super_class_id path" (header line, then one row per image)
<root>/Ebay_test.txt    same columns; test classes differ from training classes
<root>/<super_class>_final/<file>.JPG
(<root> may also be the folder that contains Stanford_Online_Products/)"""


def _probe(path: Path):
    for folder in (path, path / "Stanford_Online_Products"):
        if (folder / "Ebay_train.txt").is_file() or (folder / "Ebay_test.txt").is_file():
            for f in ("Ebay_train.txt", "Ebay_test.txt"):
                if not (folder / f).is_file():
                    return None, f"missing index file {folder / f}"
            return folder, ""
    return None, "missing index file Ebay_train.txt (and no Stanford_Online_Products/ in it)"


def _read(folder: Path, file: str):
    labels, paths, names = [], [], {}
    index = folder / file
    for r in read_index(NAME, index, 4, LAYOUT, skip_header="image_id"):
        c = to_int(NAME, r[1], str(index), LAYOUT)
        labels.append(c)
        paths.append(str(folder / r[3]))
        if c not in names:
            names[c] = f"{r[3].split('/')[0].removesuffix('_final')}/{c}"
    check_files_exist(NAME, paths, index, LAYOUT)
    return labels, paths, names


def load_sop(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"{NAME}: unknown split {split!r}; valid: 'default' (Ebay_train.txt / Ebay_test.txt)")
    folder = resolve_root(NAME, root, _probe, candidates=(f"data/{NAME}", "data/Stanford_Online_Products"), aliases=("Stanford_Online_Products",), layout=LAYOUT)
    size = int(image_size or PATH_DEFAULT_SIZE)
    tr_labels, tr_paths, names = _read(folder, "Ebay_train.txt")
    te_labels, te_paths, te_names = _read(folder, "Ebay_test.txt")
    names.update(te_names)
    pool = path_split(tr_labels, tr_paths, size)
    return assemble(
        NAME,
        pool=pool,
        test=path_split(te_labels, te_paths, size),
        val_set=choose_val_classes(sorted(set(tr_labels)), val_classes, seed, NAME),
        names=names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=str(folder),
    )
