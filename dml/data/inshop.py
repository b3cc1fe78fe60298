"""In-Shop Clothes Retrieval (DeepFashion, Liu et al. 2016), path-backed.

Layout: ``<root>/Eval/list_eval_partition.txt`` (first line: the number of rows, second: the header
``image_name item_id evaluation_status``, then ``img/<...>.jpg id_00000001 train|query|gallery``) and
``<root>/img/...``. Split: the official partition -- training items (3,997 items, 25,882 images) are
the training pool (validation items carved from it by ``seed``); ``Dataset.test`` holds the queries
(14,218 images) and ``Dataset.gallery`` the gallery (12,612 images); queries and gallery share item
ids (3,985 items) and are evaluated query-against-gallery. Class names are
``"<gender>/<category>/<item_id>"``. Images: RGB, shorter side resized to ``image_size`` (default 64),
centre-cropped.
"""

from __future__ import annotations

from pathlib import Path

from .images import IMAGENET_MEAN, IMAGENET_STD, PATH_DEFAULT_SIZE, Dataset, path_split
from .roots import DatasetError, check_files_exist, malformed, resolve_root
from .splits import assemble, choose_val_classes

NAME = "inshop"
PARTITION = "list_eval_partition.txt"
LAYOUT = """\
<root>/Eval/list_eval_partition.txt   line 1: row count; line 2: "image_name item_id evaluation_status";
                                      rows: "img/<gender>/<category>/<item_id>/<file>.jpg id_00000001 train|query|gallery"
<root>/img/..."""


def _probe(path: Path):
    for folder in (path, path / "In-shop Clothes Retrieval Benchmark", path / "inshop"):
        for f in (folder / "Eval" / PARTITION, folder / PARTITION):
            if f.is_file():
                return folder, ""
    return None, f"missing index file Eval/{PARTITION}"


def _item(value: str, where: str) -> int:
    try:
        return int(value.rsplit("_", 1)[-1])
    except ValueError:
        raise malformed(NAME, f"{where}: bad item id {value!r} (expected id_00000001)", LAYOUT) from None


def load_inshop(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split not in ("default", "class"):
        raise DatasetError(f"{NAME}: unknown split {split!r}; valid: 'default' (list_eval_partition.txt)")
    folder = resolve_root(NAME, root, _probe, candidates=(f"data/{NAME}", "data/In-shop Clothes Retrieval Benchmark"), aliases=("InShop", "In-shop Clothes Retrieval Benchmark"), layout=LAYOUT)
    size = int(image_size or PATH_DEFAULT_SIZE)
    index = folder / "Eval" / PARTITION
    if not index.is_file():
        index = folder / PARTITION
    with open(index, encoding="utf-8", errors="replace") as fh:
        lines = [ln.split() for ln in fh]
    rows = []
    expected = None
    for lineno, parts in enumerate(lines, 1):
        if not parts:
            continue
        if expected is None and len(parts) == 1 and parts[0].isdigit():
            expected = int(parts[0])
            continue
        if parts[0] == "image_name":
            continue
        if len(parts) < 3:
            raise malformed(NAME, f"{index}, line {lineno}: expected 'image_name item_id evaluation_status', got {' '.join(parts)!r}", LAYOUT)
        if parts[2] not in ("train", "query", "gallery"):
            raise malformed(NAME, f"{index}, line {lineno}: unknown evaluation_status {parts[2]!r}", LAYOUT)
        rows.append((parts[0], _item(parts[1], f"{index}, line {lineno}"), parts[2]))
    if expected is not None and expected != len(rows):
        raise malformed(NAME, f"{index} announces {expected} rows but has {len(rows)}", LAYOUT)
    if not rows:
        raise malformed(NAME, f"index file {index} is empty", LAYOUT)
    names = {}
    parts_of = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    for rel, item, status in rows:
        labs, paths = parts_of[status]
        labs.append(item)
        paths.append(str(folder / rel))
        if item not in names:
            segs = rel.split("/")
            names[item] = "/".join(segs[1:4]) if len(segs) >= 5 else f"id_{item:08d}"
    for status, (_, paths) in parts_of.items():
        if not paths:
            raise malformed(NAME, f"{index} has no '{status}' rows", LAYOUT)
        check_files_exist(NAME, paths, index, LAYOUT)
    pool = path_split(*parts_of["train"], size)
    return assemble(
        NAME,
        pool=pool,
        test=path_split(*parts_of["query"], size),
        gallery=path_split(*parts_of["gallery"], size),
        val_set=choose_val_classes(sorted(set(parts_of["train"][0])), val_classes, seed, NAME),
        names=names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=str(folder),
    )
