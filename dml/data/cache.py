"""The data sets' decoded-image cache: where it lives, a cheap fingerprint of its source files,
and an atomic write."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import torch

from dml.paths import repo_root, user_cache_dir

def cache_dir() -> Path | None:
    """``$DML_CACHE`` (``none``/``off``/``0`` disables caching) > ``<repo>/data/cache`` in a source
    checkout > ``$XDG_CACHE_HOME/tango/data`` (:func:`dml.paths.user_cache_dir`)."""
    env = os.environ.get("DML_CACHE")
    if env is not None and env.strip():
        if env.strip().lower() in {"none", "off", "0", "false", "no"}:
            return None
        return Path(os.path.expanduser(env))
    root = repo_root()
    if (root / "pyproject.toml").exists():
        return root / "data" / "cache"
    return user_cache_dir("data")


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
