"""Tests for dml.data.loader: training batches decoded by worker processes and augmented on the
device give exactly the batches of the in-process path, epoch after epoch, and shut down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import BalancedBatchSampler, DatasetError, ImageSplit, RandomBatchSampler
from dml.data import loader as loader_mod
from dml.data.images import path_split
from dml.data.loader import TrainBatches, default_workers, train_batches
from dml.data.transforms import BatchTransform

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _tree(root: Path, classes: int = 6, per_class: int = 5) -> ImageSplit:
    """Small JPEG and PNG files of varied sizes, a path-backed 16 px split over them."""
    labels, paths = [], []
    rng = np.random.default_rng(0)
    for c in range(classes):
        for j in range(per_class):
            w, h = 20 + 3 * j, 18 + 2 * c
            path = root / f"{c:03d}" / f"{j}.{'png' if j % 3 == 0 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            labels.append(c)
            paths.append(str(path))
    return path_split(labels, paths, 16)


@pytest.fixture
def split(tmp_path) -> ImageSplit:
    return _tree(tmp_path)


def _old_path(split, sampler, transform, seed: int):
    """What dml/train.py did: ``transform(split.load(idx))`` in the loop, global RNG seeded."""
    torch.manual_seed(seed)
    out = [(idx.clone(), transform(split.load(idx))) for idx in sampler]
    return out, torch.get_rng_state()


def _new_path(split, sampler, transform, workers, seed: int, **kw):
    torch.manual_seed(seed)
    with train_batches(split, sampler, transform, torch.device("cpu"), workers, **kw) as batches:
        out = [(idx.clone(), x) for idx, x in batches]
    return out, torch.get_rng_state()


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, xa), (ib, xb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb)            # bit-identical, not merely close


@pytest.mark.parametrize("kind", ["resized_crop", "translate"])
def test_workers_0_and_2_give_the_old_batches_bit_identically(split, kind):
    sampler = BalancedBatchSampler(split.labels, 3, 2, num_batches=5, seed=1)
    tf = BatchTransform(MEAN, STD, kind)             # global RNG, as dml/train.py's train_tf
    old, old_rng = _old_path(split, sampler, tf, seed=7)
    new0, rng0 = _new_path(split, sampler, tf, 0, seed=7)
    new2, rng2 = _new_path(split, sampler, tf, 2, seed=7)
    _assert_same(old, new0)
    _assert_same(old, new2)
    # the loader draws nothing from the global RNG: the training that follows is unchanged too
    assert torch.equal(old_rng, rng0) and torch.equal(old_rng, rng2)
    assert all(x.shape == (6, 3, 16, 16) for _, x in new2)


def test_seeded_transform_and_random_sampler_with_one_worker(split):
    sampler = RandomBatchSampler(split.labels, 8, num_batches=4, seed=3)
    tf_old, tf_new = BatchTransform(MEAN, STD, "affine", seed=5), BatchTransform(MEAN, STD, "affine", seed=5)
    old = [(idx, tf_old(split.load(idx))) for idx in sampler]
    with train_batches(split, sampler, tf_new, "cpu", 1, prefetch=1) as batches:
        _assert_same(old, list(batches))


def test_in_memory_split_indexes_in_process_and_augments(split):
    mem = split.to_memory()
    sampler = BalancedBatchSampler(mem.labels, 2, 3, num_batches=3, seed=0)
    tf = BatchTransform(MEAN, STD, "translate")
    old, _ = _old_path(mem, sampler, tf, seed=2)
    batches = train_batches(mem, sampler, tf, torch.device("cpu"), 4)
    assert batches.workers == 0 and batches.loader is None   # workers are ignored in memory
    torch.manual_seed(2)
    _assert_same(old, list(batches))
    assert len(batches) == 3


def test_epochs_reiterate_the_sampler_with_persistent_workers(split):
    sampler = BalancedBatchSampler(split.labels, 3, 2, num_batches=4, seed=0)
    tf = BatchTransform(MEAN, STD, "none")
    with train_batches(split, sampler, tf, "cpu", 2) as batches:
        assert batches.loader.persistent_workers
        seen = {}
        for epoch in (1, 2, 1):
            sampler.set_epoch(epoch)
            got = [idx.clone() for idx, _ in batches]
            expected = list(sampler)
            assert len(got) == len(expected) == 4
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
            if epoch in seen:
                assert all(torch.equal(a, b) for a, b in zip(got, seen[epoch]))
            seen[epoch] = got
        assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))
        pids = [w.pid for w in batches.loader._iterator._workers]
    assert len(set(pids)) == 2                  # the same two processes served every epoch
    for pid in pids:
        _wait_gone(pid)


def test_a_partly_consumed_epoch_then_a_full_one(split):
    sampler = BalancedBatchSampler(split.labels, 3, 2, num_batches=6, seed=0)
    tf = BatchTransform(MEAN, STD, "none")
    with train_batches(split, sampler, tf, "cpu", 2) as batches:
        for i, _ in enumerate(batches):
            if i == 1:
                break
        sampler.set_epoch(5)
        got = [idx for idx, _ in batches]
    assert all(torch.equal(a, b) for a, b in zip(got, list(sampler))) and len(got) == 6


def test_default_workers(split, monkeypatch):
    mem = split.to_memory()
    for cores, expected in [(1, 0), (2, 1), (3, 2), (8, 7), (9, 8), (64, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_workers(split) == expected
        assert default_workers(mem) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    sampler = BalancedBatchSampler(split.labels, 2, 2, num_batches=1)
    assert TrainBatches(split, sampler, None, "cpu", None).workers == 3   # None -> the default
    monkeypatch.delattr(os, "sched_getaffinity")                       # not on every platform
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert default_workers(split) == 2                                  # 3 cores


def test_pin_memory_only_for_cuda_and_the_loader_settings(split):
    sampler = BalancedBatchSampler(split.labels, 2, 2, num_batches=1)
    cpu = TrainBatches(split, sampler, None, torch.device("cpu"), 2, prefetch=3)
    cuda = TrainBatches(split, sampler, None, torch.device("cuda"), 2)   # nothing runs on it
    assert cpu.loader.pin_memory is False and cuda.loader.pin_memory is True
    assert cpu.loader.num_workers == 2 and cpu.loader.prefetch_factor == 3
    assert cpu.loader.batch_size is None and cpu.loader.sampler.sampler is sampler
    assert cpu.loader.worker_init_fn is loader_mod._worker_init
    with pytest.raises(ValueError, match="workers must be >= 0"):
        TrainBatches(split, sampler, None, "cpu", -1)
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        TrainBatches(split, sampler, None, "cpu", 1, prefetch=0)


def test_workers_decode_single_threaded(split):
    """Inside a worker ImageSplit.load skips its thread pool, and torch runs one thread. The
    trainer's pool exists before the fork: a forked copy of it has no threads, and submitting to
    it would hang (the timeout turns that into a failure)."""
    split.load(torch.arange(10))                # the pool of this process is started
    probe = torch.utils.data.DataLoader(_Probe(split), batch_size=None, num_workers=1, timeout=30,
                                        worker_init_fn=loader_mod._worker_init)
    threads, pool_used, images = next(iter(probe))
    assert threads == 1 and not pool_used and images.shape == (10, 3, 16, 16)


class _Probe(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return 1

    def __getitem__(self, i):
        import threading

        before = {t.name for t in threading.enumerate()}
        images = self.split.load(torch.arange(10))
        after = {t.name for t in threading.enumerate()}
        return torch.get_num_threads(), any(n.startswith("dml-img") for n in after - before), images


def test_a_corrupt_image_is_the_one_line_dataset_error(split):
    Path(split.paths[4]).write_bytes(b"not an image")
    sampler = RandomBatchSampler(split.labels, 30, num_batches=1)
    for workers in (0, 2):
        with train_batches(split, sampler, BatchTransform(MEAN, STD), "cpu", workers) as batches:
            with pytest.raises(DatasetError) as e:
                list(batches)
        assert "could not decode image file" in str(e.value) and "\n" not in str(e.value)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:                                    # a finished child of this process: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still alive {timeout} s after close")


def test_keyboard_interrupt_in_the_consumer_ends_the_workers(split):
    sampler = BalancedBatchSampler(split.labels, 3, 2, num_batches=50)
    with pytest.raises(KeyboardInterrupt):
        with train_batches(split, sampler, BatchTransform(MEAN, STD), "cpu", 2) as batches:
            for i, _ in enumerate(batches):
                if i == 2:
                    pids = [w.pid for w in batches.loader._iterator._workers]
                    raise KeyboardInterrupt
    assert batches.loader._iterator is None
    for pid in pids:
        _wait_gone(pid)


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_data_loader import _tree
    from pathlib import Path
    from dml.data import BalancedBatchSampler
    from dml.data.loader import train_batches
    from dml.data.transforms import BatchTransform
    split = _tree(Path({root!r}))
    sampler = BalancedBatchSampler(split.labels, 3, 2, num_batches=100000)
    batches = train_batches(split, sampler, BatchTransform((0.5,), (0.5,)), "cpu", 2)
    for i, (idx, x) in enumerate(batches):
        if i == 3:
            print("ready", *[w.pid for w in batches.loader._iterator._workers], flush=True)
        if i == {stop}:
            raise KeyboardInterrupt            # without closing `batches`
        time.sleep(0.01)
""")


@pytest.mark.parametrize("how", ["sigint to the group", "no close"])
def test_ctrl_c_does_not_hang(tmp_path, how):
    """Ctrl-C reaches the trainer and its workers (one process group); without any close the
    interpreter still exits promptly and leaves no worker behind."""
    script = SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path / "tree"),
                           stop=5 if how == "no close" else -1)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", proc.stderr.read()
        if how == "sigint to the group":
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert err.count("Traceback") == 1, err        # the trainer's only: workers exit quietly
    for pid in map(int, line[1:]):
        _wait_gone(pid)


@pytest.mark.parametrize("kind", ["none", "translate", "affine", "resized_crop"])
def test_the_transform_is_device_correct(kind):
    """No GPU here: on the meta device every operand must already be on the images' device (a
    CPU tensor left behind raises), and with a non-CPU default device the random parameters are
    still drawn on the CPU, from the same stream as for a CPU batch."""
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    tf = BatchTransform(MEAN, STD, kind)
    torch.manual_seed(0)
    on_cpu = tf(x)
    after_cpu = torch.get_rng_state()
    torch.manual_seed(0)
    with torch.device("meta"):
        on_meta = tf(x.to("meta"))
    assert on_meta.device.type == "meta"
    assert (on_meta.shape, on_meta.dtype) == (on_cpu.shape, on_cpu.dtype)
    assert torch.equal(torch.get_rng_state(), after_cpu)
