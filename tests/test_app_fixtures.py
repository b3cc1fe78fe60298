"""Real runs for the app tests, made by the trainer (no test in this module; the other app test
modules import the ``app_runs`` fixture from here).

The runs are trained once per test session and shared between pytest-xdist workers through a
lock file beside the workers' temp folders, so ``pytest -n 2`` trains them (and compiles UMAP's
numba code) once, not once per worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

def _tiny() -> list[str]:
    import dataclasses

    from dml.config import TrainConfig
    # data.split=class: validation classes carved from digits 0-4, so class ids are not the
    # digits (training ids 0, 1, 2 are the digits 0, 1, 4) and the app must show the names
    tiny = ["train.epochs=2", "train.iterations_per_epoch=5", "model.params.width=8",
            "model.embedding_dim=16", "train.threads=1", "data.split=class"]
    if "projections" in {f.name for f in dataclasses.fields(TrainConfig)}:
        tiny.append("train.projections=none")   # the fixture chooses which maps are cached
    return tiny


TINY = _tiny()

# (loss, strategy, seed): a baseline and a Metrix configuration with two seeds each, Embedding
# Expansion with one; strategies not registered (yet) are skipped.
PLAN = [("contrastive", "none", 0), ("contrastive", "none", 1),
        ("contrastive", "metrix-embed", 0), ("contrastive", "metrix-embed", 1),
        ("multi-similarity", "embedding-expansion", 0)]
FAILED_ERROR = "FloatingPointError: the loss became nan at epoch 1, step 3 (made by the fixture)"


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:   # not POSIX: no sharing between workers, each builds its own
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_app_runs(root: Path) -> dict:
    """Train the plan's runs under ``root``, one failed run, and precompute their maps (PCA for
    all; UMAP for the best evaluation of the first run with synthetic points, to exercise both
    the cached-UMAP and the PCA fallback paths). Returns a manifest (also written to
    ``root/manifest.json``)."""
    from dml.config import RunConfig
    from dml.mixing import supported_pairs
    from dml.projection import precompute_projections
    from dml.runs import Run, RunWriter
    from dml.train import train

    pairs = set(supported_pairs())
    runs = []
    for loss, strategy, seed in PLAN:
        if (strategy, loss) not in pairs:
            continue
        cfg = RunConfig().with_overrides(TINY + [f"loss.name={loss}", f"mixing.name={strategy}",
                                                 f"train.seed={seed}",
                                                 f"name=t-{strategy}-s{seed}"])
        path = train(cfg, root, progress=False)
        runs.append({"id": path.name, "path": str(path), "loss": loss, "mixing": strategy,
                     "seed": seed})
    umap_run = next((r for r in runs if "synthetic_embeddings" in
                     Run(r["path"]).load_eval(Run(r["path"]).eval_epochs()[-1])), runs[0])
    for r in runs:
        methods = ("pca", "umap") if r is umap_run else ("pca",)
        precompute_projections(r["path"], "best+last", methods)
    # a failed run, written through the trainer's own run writer
    cfg = RunConfig().with_overrides(TINY + ["name=t-failed"]).to_dict()
    w = RunWriter.create(root, cfg, run_id="failed-run")
    w.set_status("failed", error=FAILED_ERROR, traceback="Traceback (most recent call last):\n"
                 "  ...\nFloatingPointError: the loss became nan")
    manifest = {"root": str(root), "runs": runs, "umap_run": umap_run["id"],
                "failed": w.path.name}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "tango-app-runs"
    with _lock(shared / "tango-app-runs.lock"):
        manifest = root / "manifest.json"
        if manifest.is_file():
            return json.loads(manifest.read_text())
        root.mkdir(parents=True, exist_ok=True)
        return make_app_runs(root)
