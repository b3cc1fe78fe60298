import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_CANDIDATES = [REPO.parent / "shared" / "data" / "omniglot", REPO / "data" / "omniglot"]


def _find_omniglot() -> Path | None:
    env = os.environ.get("DML_DATA")
    cands = ([Path(env) / "omniglot"] if env else []) + OMNIGLOT_CANDIDATES
    for c in cands:
        if (c / "images_background_small1.zip").is_file() or (c / "images_background.zip").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The real Omniglot zips. Skips locally when absent; in CI (CI=true) a missing copy fails."""
    found = _find_omniglot()
    if found is None:
        msg = ("Omniglot zips not found (looked in $DML_DATA/omniglot, "
               + ", ".join(map(str, OMNIGLOT_CANDIDATES)) + ")")
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "; CI=true requires them")
        pytest.skip(msg)
    return found


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Data caches go to a per-session temp dir, never into the repo."""
    monkeypatch.setenv("DML_CACHE", str(tmp_path_factory.getbasetemp() / "dml-cache"))
