"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015), read straight from the official zips.

Sources (in ``root``; the zips are never extracted to disk; extracted folders of the same names
also work):

* full set, when both present: ``images_background.zip`` (30 alphabets, 964 characters -> training
  pool) and ``images_evaluation.zip`` (20 alphabets, 659 characters -> test);
* otherwise the "minimal" background splits ``images_background_small1.zip`` and/or
  ``images_background_small2.zip``. Greek and Latin are in both with identical files: images are
  de-duplicated by (alphabet, character, file name); the union is 8 alphabets, 242 characters,
  4,840 images.

Images: the 105x105 binary drawings are **inverted so strokes are bright (255) on a black (0)
background** -- zero padding then matches the background (translation augmentation, conv padding)
and the convention matches MNIST-like data. They are resized with antialiasing (default 28 px).

Splits (class ids: train block, then val, then test; names ``"Alphabet/characterNN"``):

* ``split="alphabet"`` (default): test alphabets are never seen in training.
  Minimal set: test = Early_Aramaic, Korean, Tagalog (79 characters, 1,580 images, ~1/3); the
  training pool is Balinese, Greek, Japanese_(katakana), Latin, Sanskrit (163 characters).
  Validation = whole alphabets from the pool whose character count is closest to ``val_classes``
  (a fraction of the pool's characters or a count; ties broken by ``seed``); with the default 0.2 the
  target is 33 characters and the pick is Latin (26), leaving 137 training characters (2,740 images).
  Full set: background alphabets train (+ val alphabets carved the same way), evaluation alphabets test.
* ``split="class"``: character-disjoint but alphabets shared; the same number of test characters as
  the alphabet split, drawn at random by ``seed``; validation characters drawn at random from the rest.

Cache: the decoded, resized uint8 tensor of all characters (before splitting) is stored as
``omniglot-<size>px-<key>.pt`` under ``dml.data.cache.cache_dir()`` (``$DML_CACHE``, or
``data/cache/`` in a source checkout); the key covers the zip names, sizes and mtimes, the image
size and a format version. Written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import io
import itertools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import atomic_torch_save, cache_dir, file_fingerprint
from .images import Dataset, ImageSplit, open_image, resize_uint8
from .roots import DatasetError, malformed, resolve_root
from .splits import assemble_pool, choose_val_classes, num_val_classes, split_by_classes

NATIVE_SIZE = 105
CACHE_VERSION = 1
FULL = ("images_background", "images_evaluation")
MINIMAL = ("images_background_small1", "images_background_small2")
# Fixed test alphabets for the minimal set (~1/3 of the 242 characters).
MINIMAL_TEST_ALPHABETS = ("Early_Aramaic", "Korean", "Tagalog")

CANDIDATES = ("data/omniglot", "../shared/data/omniglot")
LAYOUT = """\
<root>/images_background_small1.zip and/or images_background_small2.zip   (minimal set), or
<root>/images_background.zip + images_evaluation.zip                        (full set)
each zip: <split>/<Alphabet>/<characterNN>/<imageid>_<drawer>.png (105x105 PNG)
(extracted folders with the same names also work)"""


@dataclass
class _Source:
    stem: str  # e.g. images_background_small1
    path: Path  # zip file or extracted folder


def _sources(path: Path) -> list[_Source]:
    found = {}
    for stem in FULL + MINIMAL:
        for cand in (path / f"{stem}.zip", path / stem):
            if cand.exists():
                found[stem] = _Source(stem, cand)
                break
    if all(s in found for s in FULL):
        return [found[s] for s in FULL]
    return [found[s] for s in MINIMAL + FULL if s in found]


def _probe(path: Path):
    if path.is_file():
        return None, "not a folder"
    if _sources(path):
        return path, ""
    return None, "no images_background*.zip / images_evaluation.zip in it"


def _decode(sources: list[_Source], size: int) -> dict:
    """Decode every unique image -> dict with images (N,1,S,S) uint8, char (N,), characters, evaluation flags."""
    from PIL import Image

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    items = []  # (alphabet, character, filename, source, member name)
    seen = set()
    is_eval_char = {}
    for src in sources:
        evaluation = src.stem == "images_evaluation"
        if src.path.is_file():
            try:
                with zipfile.ZipFile(src.path) as z:
                    members = z.namelist()
            except (OSError, zipfile.BadZipFile) as e:
                raise malformed("omniglot", f"{src.path} is not a readable zip archive ({e})",
                                LAYOUT) from None
            for n in members:
                parts = n.strip("/").split("/")
                if not n.lower().endswith(".png") or len(parts) < 3:
                    continue
                key = (parts[-3], parts[-2], parts[-1])
                if key in seen:
                    continue
                seen.add(key)
                items.append((*key, src, n))
                is_eval_char[(key[0], key[1])] = evaluation
        else:
            for p in sorted(src.path.glob("*/*/*.png")):
                key = (p.parent.parent.name, p.parent.name, p.name)
                if key in seen:
                    continue
                seen.add(key)
                items.append((*key, src, str(p)))
                is_eval_char[(key[0], key[1])] = evaluation
    if not items:
        raise malformed("omniglot", f"no PNG images found in {', '.join(str(s.path) for s in sources)}", LAYOUT)
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    characters = sorted({(a, c) for a, c, *_ in items})
    char_index = {ac: i for i, ac in enumerate(characters)}

    raw = np.empty((len(items), NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
    zips = {}
    bar = tqdm(total=len(items), desc="omniglot: decoding", unit="img", disable=None, leave=False) if tqdm else None
    try:
        for i, (*_, src, member) in enumerate(items):
            try:
                if src.path.is_file():
                    z = zips.get(src.stem)
                    if z is None:
                        z = zips[src.stem] = zipfile.ZipFile(src.path)
                    data = z.read(member)
                    im = open_image(io.BytesIO(data), f"{src.path}:{member}")
                else:
                    im = open_image(member, member)
                im = im.convert("L")
                if im.size != (NATIVE_SIZE, NATIVE_SIZE):
                    im = im.resize((NATIVE_SIZE, NATIVE_SIZE), Image.BILINEAR)
                raw[i] = 255 - np.asarray(im, dtype=np.uint8)  # strokes bright
            except (OSError, zipfile.BadZipFile, KeyError) as e:
                raise malformed("omniglot", f"could not decode {src.path}:{member} ({e})", LAYOUT) from None
            if bar is not None and i % 256 == 255:
                bar.update(256)
    finally:
        for z in zips.values():
            z.close()
        if bar is not None:
            bar.close()
    images = resize_uint8(torch.from_numpy(raw)[:, None], size)
    return {
        "version": CACHE_VERSION,
        "images": images,
        "char": torch.tensor([char_index[(a, c)] for a, c, *_ in items], dtype=torch.long),
        "characters": [f"{a}/{c}" for a, c in characters],
        "evaluation": [bool(is_eval_char[ac]) for ac in characters],
        "sources": [str(s.path) for s in sources],
    }


def _load_all(sources: list[_Source], size: int) -> dict:
    cdir = cache_dir()
    if cdir is None:
        return _decode(sources, size)
    files = []
    for s in sources:
        files += [s.path] if s.path.is_file() else sorted(s.path.glob("*/*/*.png"))
    key = file_fingerprint(files, extra={"v": CACHE_VERSION, "size": size, "stems": [s.stem for s in sources]})
    path = Path(cdir) / f"omniglot-{size}px-{key}.pt"
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("version") == CACHE_VERSION and data["images"].shape[-1] == size:
                return data
        except Exception:  # torn / foreign file: rebuild it
            pass
    data = _decode(sources, size)
    atomic_torch_save(data, path)
    return data


def _closest_alphabet_subset(counts: dict[str, int], target: int, seed: int) -> list[str]:
    """Alphabets whose character count sum is closest to ``target`` (ties broken at random by seed)."""
    names = sorted(counts)
    rng = np.random.default_rng([seed, 0x0A1])
    order = list(rng.permutation(len(names)))
    names = [names[i] for i in order]
    if len(names) <= 16:
        best, best_key = [], None
        for r in range(1, len(names)):  # never all alphabets (training needs one)
            for combo in itertools.combinations(names, r):
                total = sum(counts[a] for a in combo)
                k = (abs(total - target), r)
                if best_key is None or k < best_key:
                    best, best_key = list(combo), k
        return sorted(best)
    chosen, total = [], 0  # greedy for many alphabets (full background set: 30)
    for a in names:
        if len(chosen) == len(names) - 1:
            break
        if abs(total + counts[a] - target) < abs(total - target):
            chosen.append(a)
            total += counts[a]
    return sorted(chosen or names[:1])


def load_omniglot(root=None, *, image_size=None, val_classes=0.2, split="default", seed=0) -> Dataset:
    if split == "default":
        split = "alphabet"
    if split not in ("alphabet", "class"):
        raise DatasetError(f"omniglot: unknown split {split!r}; valid: 'alphabet' (default), 'class'")
    path = resolve_root("omniglot", root, _probe, candidates=CANDIDATES, aliases=("Omniglot",), layout=LAYOUT)
    sources = _sources(path)
    size = int(image_size or 28)
    data = _load_all(sources, size)

    characters: list[str] = list(data["characters"])
    alphabet_of = [c.split("/")[0] for c in characters]
    evaluation = list(data["evaluation"])
    full = ImageSplit(data["char"], data["images"], image_size=size, channels=1)
    all_ids = list(range(len(characters)))

    if any(evaluation) and not all(evaluation):
        test_alphabets = sorted({a for a, e in zip(alphabet_of, evaluation) if e})
    else:
        test_alphabets = sorted(set(MINIMAL_TEST_ALPHABETS) & set(alphabet_of))
        if not test_alphabets or len(set(alphabet_of) - set(test_alphabets)) < 1:
            counts = {a: alphabet_of.count(a) for a in set(alphabet_of)}
            test_alphabets = _closest_alphabet_subset(counts, round(len(characters) / 3), 0)
    test_ids = [i for i in all_ids if alphabet_of[i] in test_alphabets]
    pool_ids = [i for i in all_ids if alphabet_of[i] not in test_alphabets]

    if split == "alphabet":
        n_val = num_val_classes(val_classes, len(pool_ids), "omniglot")
        val_ids = []
        pool_alphabets = sorted({alphabet_of[i] for i in pool_ids})
        if n_val and len(pool_alphabets) >= 2:
            counts = {a: sum(1 for i in pool_ids if alphabet_of[i] == a) for a in pool_alphabets}
            val_alphabets = _closest_alphabet_subset(counts, n_val, seed)
            val_ids = [i for i in pool_ids if alphabet_of[i] in val_alphabets]
    else:
        rng = np.random.default_rng([seed, 0x0C1])
        perm = [int(i) for i in rng.permutation(len(characters))]
        test_ids = sorted(perm[: len(test_ids)])
        pool_ids = sorted(perm[len(test_ids) :])
        val_ids = choose_val_classes(pool_ids, val_classes, seed, "omniglot")

    pool = split_by_classes(full, pool_ids)
    test = split_by_classes(full, test_ids)
    return assemble_pool("omniglot", pool, test, names=dict(enumerate(characters)),
                         source=", ".join(str(s.path) for s in sources), val_set=val_ids)
