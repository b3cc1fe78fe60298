"""app/projection_worker.py: the app's UMAP worker process (numba warm-up after a quiet moment,
maps computed elsewhere and equal to the ones computed here, failures and a dead worker
reported as ProjectionError)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from app import projection_worker as W
from dml import projection as P
from tests.test_projection import fake_eval, make_run


def test_warmup_is_optional_and_numba_cache_is_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("DML_NO_WARMUP", "1")
    assert W.start_warmup() is None
    monkeypatch.delenv("DML_NO_WARMUP")
    monkeypatch.setattr(W, "_WARMUP", None)
    monkeypatch.setattr(W, "_WORKER", None)
    started = []
    monkeypatch.setattr(W, "projection_worker", lambda warm=False: started.append(warm))
    W.note_activity()
    timer = W.start_warmup(delay=0.0, idle=0.6)   # once per process, however often pages call it
    try:
        assert timer is not None and W.start_warmup() is None
        time.sleep(0.3)
        W.note_activity()                          # a page ran: the quiet period starts again
        time.sleep(0.45)
        assert started == [] and W.warmup_state()["state"] == "cold"
        timer.join(timeout=5)
        assert started == [True]                   # the worker is started, warming
    finally:
        timer.cancel()
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert P.configure_numba_cache() == str(tmp_path / "tango" / "numba")
    assert (tmp_path / "tango" / "numba").is_dir()
    assert W.warm_numba(points=60) > 0


def test_worker_process_warms_computes_and_reports_errors(tmp_path):
    """The app's projection worker: a separate process that compiles numba first, then computes
    and caches maps equal to the ones computed here; failures come back as ProjectionError."""
    run = make_run(tmp_path, {1: fake_eval()}, best=1)
    w = W.ProjectionWorker(warm=True)
    try:
        assert w.alive() and w.pid != os.getpid()
        assert w.state()["state"] in ("warming", "warm")
        task = w.submit(run.path, 1, "umap")          # queued behind the warm-up
        assert task.result(timeout=600) >= 0
        state = w.state()
        assert state["state"] == "warm" and state["seconds"] > 0
        assert task.message.startswith("placing 30 synthetic points")   # its last progress line
        proj = P.load_projection(run.path, 1, "umap")
        here = P.compute_projection(fake_eval(), "umap")
        for split in ("train", "test", "synthetic"):
            np.testing.assert_allclose(proj[split], here[split], atol=1e-3)
        with pytest.raises(P.ProjectionError, match="no evaluation for epoch 9"):
            w.submit(run.path, 9, "pca").result(timeout=60)
        cold = W.ProjectionWorker(warm=False)      # no warm-up: warm once it has fitted a UMAP
        try:
            assert cold.state()["state"] == "cold"
            cold.submit(run.path, 1, "umap").result(timeout=60)    # cached: nothing compiled
            assert cold.state()["state"] == "cold"
            other = make_run(tmp_path, {1: fake_eval(seed=3)}, best=1)
            cold.submit(other.path, 1, "umap").result(timeout=600)
            assert cold.state()["state"] == "warm"
        finally:
            cold.close()
        with pytest.raises(P.ProjectionError, match="unknown projection"):
            w.submit(run.path, 1, "tsne")
        assert w.submit(run.path, 1, "pca").result(timeout=60) >= 0    # still serving
        assert P.load_projection(run.path, 1, "pca") is not None
    finally:
        w.close()
    assert not w.alive()
    with pytest.raises(P.ProjectionError, match="worker process stopped"):
        w.submit(run.path, 1, "pca").result(timeout=10)


def test_worker_that_dies_fails_its_running_task(tmp_path):
    import signal

    w = W.ProjectionWorker(warm=True)                  # a task that runs for seconds
    try:
        while not w.alive():
            pass
        os.kill(w.pid, signal.SIGKILL)
        with pytest.raises(P.ProjectionError, match="exit code -9"):
            w.warm_task.result(timeout=30)
        assert w.state()["state"] == "failed"
    finally:
        w.close()


def test_worker_does_not_run_the_servers_main_script_again(tmp_path):
    """In a Streamlit server, ``__main__`` is the app script (app/main.py); a worker started
    with multiprocessing's "spawn" ran it again in the child (25 "missing ScriptRunContext"
    warnings, and its own warm-up timer failing with "daemonic processes are not allowed to have
    children"). The worker runs this module only."""
    import subprocess
    import sys
    import textwrap

    run = make_run(tmp_path, {1: fake_eval()}, best=1)
    marker = tmp_path / "the-app-script-ran"
    script = tmp_path / "app_script.py"
    script.write_text(f"open({str(marker)!r}, 'a').write('ran')\n")
    code = textwrap.dedent(f"""
        import sys, types
        main = types.ModuleType("__main__")       # as Streamlit's script runner makes it
        main.__file__ = {str(script)!r}
        sys.modules["__main__"] = main
        from app.projection_worker import ProjectionWorker
        w = ProjectionWorker(warm=False)
        print(w.submit({str(run.path)!r}, 1, "pca").result(timeout=120) >= 0, w.alive())
        w.close()
        """)
    repo = str(Path(__file__).resolve().parents[1])     # this checkout's app/ and dml/
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stderr[-3000:]
    assert not marker.exists(), "the worker ran the server's __main__ script"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert P.load_projection(run.path, 1, "pca") is not None
