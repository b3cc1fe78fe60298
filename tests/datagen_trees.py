"""Generators of tiny on-disk data-set trees with the real layouts (for tests of dml.data)."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, seed: int, size=(20, 14), fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_cub(root: Path, classes: int = 6, per_class: int = 3) -> Path:
    """CUB_200_2011 tree with class ids 1..classes/2 (train) and 101.. (test)."""
    root = Path(root)
    ids = list(range(1, classes // 2 + 1)) + list(range(101, 101 + classes - classes // 2))
    images, labels, names = [], [], []
    k = 0
    for c in ids:
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for j in range(per_class):
            k += 1
            rel = f"{folder}/Bird_{c}_{j:04d}.jpg"
            _image(root / "images" / rel, k, size=(24 + j, 16), fmt="JPEG")
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def make_cars(root: Path, classes: int = 6, per_class: int = 3) -> Path:
    from scipy.io import savemat

    root = Path(root)
    ids = list(range(1, classes // 2 + 1)) + list(range(99, 99 + classes - classes // 2))
    rows = []
    k = 0
    for c in ids:
        for j in range(per_class):
            k += 1
            rel = f"car_ims/{k:06d}.jpg"
            _image(root / rel, 100 + k, size=(30, 18), fmt="JPEG")
            rows.append((rel, 1, 2, 20, 15, c, j % 2))
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    annos = np.zeros((1, len(rows)), dtype=dtype)
    for i, r in enumerate(rows):
        annos[0, i] = (np.array([r[0]]), *[np.array([[v]], dtype=np.int32) for v in r[1:]])
    class_names = np.empty((1, 196), dtype=object)
    for i in range(196):
        class_names[0, i] = f"Make Model {i + 1}"
    savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": class_names})
    return root


def make_sop(root: Path, train_classes: int = 4, test_classes: int = 4, per_class: int = 2) -> Path:
    root = Path(root)
    k = 0

    def write(file: str, class_ids):
        nonlocal k
        lines = ["image_id class_id super_class_id path"]
        for c in class_ids:
            sup = 1 + c % 2
            folder = ["bicycle_final", "chair_final"][sup - 1]
            for j in range(per_class):
                k += 1
                rel = f"{folder}/{1000 + c}_{j}.JPG"
                _image(root / rel, 200 + k, fmt="JPEG")
                lines.append(f"{k} {c} {sup} {rel}")
        (root / file).write_text("\n".join(lines) + "\n")

    write("Ebay_train.txt", range(1, train_classes + 1))
    write("Ebay_test.txt", range(train_classes + 1, train_classes + test_classes + 1))
    return root


def make_inshop(root: Path, train_items: int = 4, test_items: int = 3, per_item: int = 3) -> Path:
    root = Path(root)
    rows = []
    item = 0
    for split, n in (("train", train_items), ("test", test_items)):
        for _ in range(n):
            item += 1
            iid = f"id_{item:08d}"
            for j in range(per_item):
                rel = f"img/WOMEN/Dresses/{iid}/{j:02d}_1_front.jpg"
                _image(root / rel, 300 + item * 10 + j, size=(16, 24), fmt="JPEG")
                status = "train" if split == "train" else ("query" if j == 0 else "gallery")
                rows.append(f"{rel} {iid} {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def _cifar_dict(n_per_class: int, classes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = [c for c in classes for _ in range(n_per_class)]
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        b"batch_label": b"testing batch",
        b"fine_labels": labels,
        b"coarse_labels": [c // 5 for c in labels],
        b"data": data,
    }


def make_cifar100(root: Path, archive: bool = True, n_per_class: int = 2) -> Path:
    """Full 100-class CIFAR-100 python archive (tiny: n_per_class images per class per file)."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": _cifar_dict(n_per_class, range(100), 0),
        "test": _cifar_dict(n_per_class, range(100), 1),
        "meta": {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20},
    }
    for name, obj in parts.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        for name in parts:
            (folder / name).unlink()
        folder.rmdir()
    return root


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def make_idx(root: Path, n_train: int = 60, n_test: int = 40, gz: bool = True, size: int = 28) -> Path:
    """MNIST-format files with labels cycling 0..9."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        for kind, arr, dims in (("images", images, "idx3"), ("labels", labels, "idx1")):
            data = _idx_bytes(arr)
            name = f"{prefix}-{kind}-{dims}-ubyte"
            if gz:
                with gzip.open(root / (name + ".gz"), "wb") as fh:
                    fh.write(data)
            else:
                (root / name).write_bytes(data)
    return root
