"""Data-parallel training (dml.distributed) on the CPU with gloo: one step of a 2-process run on
a global batch gives the loss, the gradients and the updated parameters of a 1-process run on
that batch, for a pair loss, a proxy loss and one strategy of each mixing family; a real
``torchrun`` training finishes with one run directory whose metrics match a 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dml import distributed
from dml.config import ConfigError, RunConfig
from dml.data.sampler import BalancedBatchSampler

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pieces

def test_context_from_torchrun_variables():
    assert distributed.from_env({}) == distributed.Context()
    ctx = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "2"})
    assert (ctx.world, ctx.rank, ctx.local_rank, ctx.local_world) == (4, 3, 1, 2)
    assert ctx.active and not ctx.is_main
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="integers"):
        distributed.from_env({"WORLD_SIZE": "two"})


def test_rank_shares_are_disjoint_and_make_the_global_batch():
    labels = torch.arange(40) % 10
    glob = BalancedBatchSampler(labels, 4, 3, num_batches=5, seed=1)
    shares = []
    for r in range(3):
        s = distributed.RankShare(BalancedBatchSampler(labels, 4, 3, num_batches=5, seed=1),
                                  distributed.Context(3, r, r, 3))
        s.set_epoch(2)
        shares.append(list(s))
    glob.set_epoch(2)
    for b, batch in enumerate(glob):
        parts = [shares[r][b] for r in range(3)]
        assert all(len(p) == 4 for p in parts)
        assert torch.equal(torch.cat(parts), batch)            # rank order = the global batch


def test_a_batch_that_cannot_be_shared_equally_is_refused():
    share = distributed.RankShare(BalancedBatchSampler(torch.arange(40) % 10, 3, 3, 2),
                                  distributed.Context(2, 0, 0, 2))
    with pytest.raises(ValueError, match="divisible by 2"):
        list(share)
    from dml.train import _check_distributable
    from dml.mixing import build_mixing

    cfg = RunConfig()
    with pytest.raises(ConfigError, match="divisible by 2"):
        _check_distributable(cfg, build_mixing("none", "contrastive"), 9,
                             distributed.Context(2, 0, 0, 2))
    with pytest.raises(ConfigError, match="inside the network"):
        _check_distributable(cfg, build_mixing("metrix-input", "contrastive"), 8,
                             distributed.Context(2, 0, 0, 2))


def test_default_threads_share_the_cores_given(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert distributed.default_threads(distributed.Context()) == 6
    assert distributed.default_threads(distributed.Context(4, 0, 0, 4)) == 1
    assert distributed.default_threads(distributed.Context(2, 1, 1, 2)) == 3


# --------------------------------------------------------------------------- one step

CASES = [("contrastive", "none", {}), ("proxy-anchor", "none", {}),
         ("multi-similarity", "metrix-embed", {}),
         ("triplet", "embedding-expansion", {}),
         ("proxy-anchor", "proxy-synthesis", {})]
B, D = 16, 8


def _one_step(loss_name: str, mixing: str, params: dict, dctx: distributed.Context):
    """Build model, loss and strategy (same seed everywhere), take this rank's share of a
    fixed global batch, one SGD step through dml.train's step function. Returns the loss,
    every gradient and every updated parameter."""
    from dml.losses import build_loss
    from dml.mixing import build_mixing
    from dml.models import build_model
    from dml.train import _step_fn

    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 16, D, width=4, bn_freeze=True)
    loss_fn = build_loss(loss_name, num_classes=4, embedding_dim=D)
    strategy = build_mixing(mixing, loss_fn, **params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 16, 16, generator=gen)
    y = torch.arange(4).repeat_interleave(4)                   # 4 classes x 4 images
    if dctx.active:
        b = B // dctx.world
        x, y = x[dctx.rank * b:(dctx.rank + 1) * b], y[dctx.rank * b:(dctx.rank + 1) * b]
    params_all = [p for m in (model, loss_fn, strategy) for p in m.parameters()]
    params_all = list({id(p): p for p in params_all}.values())
    opt = torch.optim.SGD(params_all, lr=0.5)
    torch.manual_seed(7)                                       # the mixing's draws
    step = _step_fn(model, model, loss_fn, strategy, dctx, torch.device("cpu"))
    loss = step(x, y)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params_all]
    opt.step()
    return float(loss.detach()), grads, [p.detach().clone() for p in params_all]


def _worker(rank: int, world: int, port: int, out: str, barrier: bool = True,
            exit_now: bool = True) -> None:
    """One rank of the two-process step (also run by benchmarks/repro_gloo_teardown.py, which
    varies ``barrier`` and keeps the interpreter's own exit: ``exit_now`` False)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = distributed.from_env()
    distributed.setup(ctx, torch.device("cpu"))
    try:
        results = {f"{l}/{m}": _one_step(l, m, p, ctx) for l, m, p in CASES}
        if rank == 0:
            torch.save(results, out)
    except BaseException:
        distributed.teardown(ctx)
        raise
    distributed.teardown(ctx, finished=barrier)
    if exit_now:
        _exit_now()


def _exit_now() -> None:
    """A worker whose work is done and written leaves without the interpreter's teardown: a
    gloo thread sometimes aborts it there ("terminate called without an active exception",
    SIGABRT; see dml.distributed.teardown), which would fail the test for nothing."""
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("loss_name,mixing,params", CASES, ids=[f"{l}/{m}" for l, m, _ in CASES])
def test_a_two_process_step_equals_the_one_process_step(two_process_results, loss_name,
                                                         mixing, params):
    torch.set_num_threads(1)
    want_loss, want_grads, want_params = _one_step(loss_name, mixing, params,
                                                   distributed.Context())
    got_loss, got_grads, got_params = two_process_results[f"{loss_name}/{mixing}"]
    assert got_loss == pytest.approx(want_loss, abs=1e-5)
    assert any(g.abs().sum() > 0 for g in want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    for g, w in zip(got_params, want_params):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- torchrun

TINY = ["--dataset", "digits", "--loss", "contrastive", "--epochs", "2", "--seed", "3",
        "--set", "train.iterations_per_epoch=3", "--set", "model.params.width=8",
        "--set", "model.params.bn_freeze=true", "--set", "data.augment=none",
        "--set", "data.classes_per_batch=4", "--set", "data.samples_per_class=4",
        "--set", "train.projections=none", "--set", "train.clustering=false",
        "--set", "train.threads=1", "--quiet"]


@pytest.mark.slow
def test_torchrun_training_makes_one_run_matching_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "dml.cli", "train", "--nproc", "2",
                           "--runs-dir", str(two), *TINY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in two.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs                                  # rank 0 alone writes
    assert proc.stdout.strip().splitlines() == [str(runs[0])]   # printed once
    subprocess.run([sys.executable, "-m", "dml.cli", "train", "--runs-dir", str(one), *TINY],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    (single,) = [p for p in one.iterdir() if p.is_dir()]

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    got, want = metrics(runs[0]), metrics(single)
    assert [m["epoch"] for m in got] == [1, 2]
    for g, w in zip(got, want):
        assert g["train"]["loss"] == pytest.approx(w["train"]["loss"], abs=1e-4)
        for k, v in w["test"].items():
            assert g["test"][k] == pytest.approx(v, abs=2e-3), k
    status = json.loads((runs[0] / "status.json").read_text())
    assert status["state"] == "finished" and status["progress"]["processes"] == 2


# --------------------------------------------------------------------------- resume

def _train_worker(rank: int, world: int, port: int, root: str, mode: str) -> None:
    from dml.train import resume, train

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))

    def stop_in_epoch_2(p):
        if p["epoch"] == 2 and p["step"] == 4:
            raise KeyboardInterrupt

    cfg = RunConfig().with_overrides([
        "data.name=digits", "loss.name=proxy-anchor", "mixing.name=proxy-synthesis",
        "train.epochs=2", "train.seed=4", "train.iterations_per_epoch=3",
        "model.params.width=8", "model.embedding_dim=16", "data.classes_per_batch=4",
        "data.samples_per_class=2", "train.threads=1", "train.projections=none",
        "train.clustering=false"])                     # augmentation on: per-rank generators
    if mode == "resume":
        (path,) = [p for p in Path(root).iterdir() if p.is_dir()]
        resume(path, progress=False)
    elif mode == "interrupt":
        try:
            train(cfg, root, progress=False, on_progress=stop_in_epoch_2)
        except KeyboardInterrupt:
            pass
    else:
        train(cfg, root, progress=False)
    _exit_now()


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from dml.runs import open_run

    for root, mode in ((tmp_path / "ref", "full"), (tmp_path / "cut", "interrupt"),
                       (tmp_path / "cut", "resume")):
        mp.spawn(_train_worker, args=(2, _free_port(), str(root), mode), nprocs=2, join=True)
        if mode == "interrupt":
            (cut,) = list(root.iterdir())
            assert open_run(cut).status()["state"] == "interrupted"
            assert [m["epoch"] for m in open_run(cut).metrics()] == [1]
    (ref,) = list((tmp_path / "ref").iterdir())
    (cut,) = list((tmp_path / "cut").iterdir())
    assert open_run(cut).status()["state"] == "finished"
    got, want = (load_file(p / "checkpoints" / "last.safetensors") for p in (cut, ref))
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ"
    state = load_file(next((cut / "checkpoints" / "resume").glob("epoch_*"))
                      / "state.safetensors")
    assert {"rng.torch", "rng.rank0.torch", "rng.rank1.torch"} <= set(state)
