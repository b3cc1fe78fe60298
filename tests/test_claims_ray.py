"""`dml bench claims --backend ray`: the grid as Ray tasks (issue 15, grids beyond one machine)."""

import socket
import sys

import pytest

from dml.claims import GRIDS, Cell, run_metrics
from dml.cli import main
from dml.runs import list_runs
from dml.stats import run_key

TINY = ["--dataset", "digits", "--seeds", "1", "--set", "train.epochs=1",
        "--set", "train.iterations_per_epoch=3", "--set", "model.params.width=8",
        "--set", "train.clustering=false", "--set", "train.projections=none",
        "--set", "train.threads=1"]       # one thread on both backends: the same numbers


def _bench(tmp_path, *extra):
    return main(["bench", "claims", "--grid", "smoke", "--runs-dir", str(tmp_path / "runs"),
                 *TINY, *extra])


def _numbers(run):
    """Every evaluation record of a run without its timing (elapsed_s, speed)."""
    keep = ("epoch", "step", "lr", "train", "val", "test", "utilization")
    return [{k: rec.get(k) for k in keep} for rec in run.metrics()]


def test_backend_ray_without_ray_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)         # `import ray` raises ImportError
    assert _bench(tmp_path, "--backend", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "needs Ray, which is not installed" in err and "pip install -e '.[cluster]'" in err
    assert not (tmp_path / "runs").exists()               # nothing started


@pytest.mark.parametrize("flags, message", [
    (["--backend", "slurm"], "unknown backend 'slurm'; valid: local, ray"),
    (["--backend", "ray", "--address", "http://head"], "bad Ray address 'http://head'"),
    (["--backend", "ray", "--address", "head:99999"], "bad Ray address 'head:99999'"),
    (["--address", "auto"], "--address: only with --backend ray"),
    (["--cpus-per-run", "2", "--gpus-per-run", "1"],
     "--cpus-per-run, --gpus-per-run: only with --backend ray"),
    (["--backend", "ray", "--jobs", "2"], "--jobs is for --backend local"),
    (["--backend", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be positive"),
    (["--backend", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be 0 or more"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_backend_argument_errors_are_one_line(tmp_path, capsys, flags, message):
    assert _bench(tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dml bench: error: ") and message in err
    assert not (tmp_path / "runs").exists()


def test_unreachable_ray_address_is_one_line_error_at_once(tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as sock:                         # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        assert _bench(tmp_path, "--backend", "ray", "--address", address) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"dml bench: error: cannot connect to Ray at {address}: "
                                  f"127.0.0.1:{port} does not answer")
        assert not any(line.startswith("dml") for line in err[:-1])


@pytest.mark.slow
def test_ray_grid_trains_the_local_grid_reports_failures_and_resumes(tmp_path, monkeypatch,
                                                                       capsys):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    # the smoke grid and a cell whose training fails (a data set folder that does not exist)
    broken = Cell("contrastive", "none", ("data.name=omniglot",
                                          f"data.root={tmp_path / 'no-omniglot'}"))
    monkeypatch.setitem(GRIDS, "smoke+broken", GRIDS["smoke"] + [broken])
    ray_runs = tmp_path / "ray"
    args = ["bench", "claims", "--runs-dir", str(ray_runs), *TINY, "--backend", "ray",
            "--address", "local", "--cpus-per-run", "1"]
    assert main(args + ["--grid", "smoke+broken"]) == 1
    err = capsys.readouterr().err
    assert "3 to train on Ray (local; 1 CPU(s) and 0 GPU(s) per run)" in err
    assert "ray: connected to local: 1 node(s)" in err
    assert err.count("FAILED") == 1 and "contrastive / none (name=omniglot" in err
    assert "dml bench: error: 1 of 3 runs failed" in err
    assert err.count("test R@1") == 2                      # the others went on
    assert not ray.is_initialized()                        # the local instance is shut down

    by_ray = {run_key(r.config()): r for r in list_runs(ray_runs)
              if r.status()["state"] == "finished"}
    assert len(by_ray) == 2

    # the same cells on the local backend: the same runs, number for number
    local_runs = tmp_path / "local"
    assert main(["bench", "claims", "--grid", "smoke", "--runs-dir", str(local_runs), *TINY,
                 "--jobs", "2"]) == 0
    by_local = {run_key(r.config()): r for r in list_runs(local_runs)}
    assert by_local.keys() == by_ray.keys()
    for key, run in by_local.items():
        assert run_metrics(by_ray[key]) == run_metrics(run)
        assert _numbers(by_ray[key]) == _numbers(run)
    capsys.readouterr()

    # rerun on Ray: the finished runs are reused, nothing is trained (and no Ray started)
    assert main(args + ["--grid", "smoke"]) == 0
    out = capsys.readouterr()
    assert "2 already finished, 0 to train" in out.err and "ray: connected" not in out.err
    assert "| contrastive | none (neg_margin=0.4) | 1 |" in out.out
    assert len(list_runs(ray_runs)) == 2        # the failed run stopped before its folder
