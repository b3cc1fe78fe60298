"""Where Tango's files live by default: the source checkout and the per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The folder holding the ``dml`` package (the repository root in a source checkout)."""
    return Path(__file__).resolve().parent.parent


def env_with_checkout(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's environment) with the checkout first on
    PYTHONPATH, so that a child process imports this very ``dml`` (and ``app``) without
    ``pip install -e .``."""
    out = dict(os.environ if env is None else env)
    old = out.get("PYTHONPATH")
    out["PYTHONPATH"] = str(repo_root()) + (os.pathsep + old if old else "")
    return out


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/tango/<parts>`` (``~/.cache/tango/<parts>`` when XDG_CACHE_HOME is unset):
    the one per-user cache folder (data caches outside a source checkout, numba's compiled code)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).joinpath("tango", *parts)
