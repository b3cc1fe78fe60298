"""One writer per run (``dml.runs.RunWriter``'s lock on ``<run>/lock``), true statuses from that
lock rather than from a PID that may have been reused, distinct folders for runs created at the
same moment, and the removal of the temporary files a killed writer leaves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dml.runs import (LOCK_FILE, Run, RunFormatError, RunLockedError, RunWriter, open_run)

REPO = Path(__file__).resolve().parents[1]
CFG = {"data": {"name": "digits"}, "model": {"name": "small-cnn"},
       "loss": {"name": "contrastive"}, "mixing": {"name": "none"}, "train": {"seed": 3},
       "name": None}

# A child process that creates (or resumes) a run, prints its path, then waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from dml.runs import Run, RunWriter
if sys.argv[1] == "create":
    w = RunWriter.create(sys.argv[2], {cfg!r}, run_id=sys.argv[3])
else:
    w = RunWriter.resume(Run(Path(sys.argv[2])))
print(w.path, flush=True)
time.sleep(600)
""".format(cfg=CFG)


def start_holder(*args: str) -> tuple[subprocess.Popen, Path]:
    """A child process holding a run's lock; returns it and the run's path once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"the holder did not start: {proc.stderr.read()}")
    return proc, Path(line)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def set_status_pid(run: Path, pid: int) -> None:
    st = json.loads((run / "status.json").read_text())
    st["pid"] = pid
    (run / "status.json").write_text(json.dumps(st))


# --------------------------------------------------------------------------- one writer per run

def test_a_second_writer_of_a_run_is_refused_with_the_holder(tmp_path):
    w = RunWriter.create(tmp_path, CFG, run_id="r")
    assert w.locked and (w.path / LOCK_FILE).is_file()
    holder = w.run.lock_holder()
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as info:
        RunWriter.resume(Run(w.path))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(w.path) in msg and f"PID {os.getpid()}" in msg
    assert f"host {socket.gethostname()}" in msg and f"since {holder['since']}" in msg
    assert "wait for it to finish or stop that process" in msg
    assert isinstance(info.value, RunFormatError) and isinstance(info.value, ValueError)
    assert info.value.holder["pid"] == os.getpid()
    import pickle                                   # crosses a process pool intact
    back = pickle.loads(pickle.dumps(info.value))
    assert str(back) == msg and back.holder == info.value.holder
    w.close()
    w.close()                                                   # idempotent
    assert not w.locked and not (w.path / LOCK_FILE).exists()
    with RunWriter.resume(Run(w.path)) as again:                # free again
        assert again.locked
        with pytest.raises(RunLockedError):
            RunWriter.resume(Run(w.path))
    assert not again.locked


def test_two_resumes_of_one_run_from_two_processes(tmp_path):
    w = RunWriter.create(tmp_path, CFG, run_id="r")
    w.close()
    proc, path = start_holder("resume", w.path)
    try:
        with pytest.raises(RunLockedError, match=f"PID {proc.pid} on host"):
            RunWriter.resume(Run(path))
    finally:
        kill(proc)
    RunWriter.resume(Run(path)).close()           # the kernel dropped the killed holder's lock


def test_dml_train_resume_of_a_run_being_written_is_refused(tmp_path, capsys):
    """`dml train --resume RUN` while another process writes RUN: exit 2, one line naming the
    holder's PID and what to do; nothing of the run is touched."""
    from dml.cli import main
    from dml.config import RunConfig

    cfg = RunConfig().with_overrides([
        "data.name=digits", "loss.name=contrastive", "train.epochs=1",
        "train.iterations_per_epoch=2", "model.params.width=8", "model.embedding_dim=8",
        "train.threads=1", "train.projections=none"]).to_dict()
    w = RunWriter.create(tmp_path, cfg, run_id="busy")
    w.close()
    before = {p.name: p.stat().st_mtime_ns for p in w.path.iterdir()}
    proc, path = start_holder("resume", w.path)
    try:
        rc = main(["train", "--resume", str(path), "--quiet"])
        err = capsys.readouterr().err
    finally:
        kill(proc)
    assert rc == 2
    assert f"PID {proc.pid}" in err and "wait for it to finish or stop that process" in err
    assert len(err.strip().splitlines()) == 1
    after = {p.name: p.stat().st_mtime_ns for p in w.path.iterdir() if p.name != LOCK_FILE}
    assert after == {k: v for k, v in before.items() if k != LOCK_FILE}


def test_a_writer_killed_with_sigkill_releases_the_lock_and_reads_interrupted(tmp_path):
    proc, path = start_holder("create", tmp_path, "victim")
    try:
        run = Run(path)
        assert run.is_locked() is True and run.status()["state"] == "running"
        assert run.lock_holder()["pid"] == proc.pid
    finally:
        kill(proc)
    assert (path / LOCK_FILE).is_file() and run.is_locked() is False
    st = run.status()
    assert st["state"] == "interrupted"
    # the PID recorded in status.json is reused (here: by this live process): still interrupted
    set_status_pid(path, os.getpid())
    st = run.status()
    assert st["state"] == "interrupted"
    # no complete epoch: nothing to resume, start a new run
    assert "--resume" not in st["error"] and "nothing to resume" in st["error"]
    assert f"dml train --config {path / 'config.json'}" in st["error"]
    with RunWriter.resume(run):
        assert run.is_locked() is True


def test_the_lock_test_sees_a_lock_held_by_this_process():
    """flock locks belong to open file descriptions: the reader's test, on its own descriptor,
    sees the lock of a writer in the same process, and leaves it held."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with RunWriter.create(d, CFG, run_id="mine") as w:
            run = Run(w.path)
            for _ in range(3):
                assert run.is_locked() is True and run.status()["state"] == "running"
            set_status_pid(w.path, 2**22 + 12345)             # a PID that does not exist
            assert run.status()["state"] == "running"          # the lock says it trains
            with pytest.raises(RunLockedError):
                RunWriter.resume(run)
            assert w.locked


def test_a_free_lock_file_means_interrupted_even_when_the_pid_is_alive(tmp_path):
    with RunWriter.create(tmp_path, CFG, run_id="r") as w:
        pass
    set_status_pid(w.path, os.getpid())                # status 'running', PID alive
    assert Run(w.path).status()["state"] == "running"  # no lock file: the PID check of old runs
    (w.path / LOCK_FILE).write_text("")                # a lock file nobody holds
    st = Run(w.path).status()
    assert st["state"] == "interrupted" and "nothing to resume" in st["error"]


def write_resume_point(run: Path, epoch: int, layout: str) -> None:
    """The files that make an epoch resumable, without torch: the resume point folder
    (``checkpoints/resume/epoch_NNNN``, state.json written last) or the earlier layout."""
    ck = run / "checkpoints"
    if layout == "points":
        point = ck / "resume" / f"epoch_{epoch:04d}"
        point.mkdir(parents=True)
        (point / "state.json").write_text(json.dumps({"epoch": epoch}))
        unfinished = ck / "resume" / f"epoch_{epoch + 1:04d}"     # no state.json: incomplete
        unfinished.mkdir()
    else:
        ck.mkdir()
        (ck / "last.safetensors").write_bytes(b"x")
        (ck / "last_state.safetensors").write_bytes(b"x")
        (ck / "last_state.json").write_text(json.dumps({"epoch": epoch}))


@pytest.mark.parametrize("layout", ["points", "last_state"])
def test_interrupted_after_a_complete_epoch_suggests_resume(tmp_path, layout):
    with RunWriter.create(tmp_path, CFG, run_id="r") as w:
        assert w.run.last_complete_epoch() is None
        write_resume_point(w.path, 2, layout)
        assert w.run.last_complete_epoch() == 2
    (w.path / LOCK_FILE).write_text("")                # as a killed writer leaves it
    st = Run(w.path).status()
    assert st["state"] == "interrupted"
    assert f"dml train --resume {w.path}" in st["error"] and "epoch 2 is the last" in st["error"]


def test_a_final_status_written_before_close_is_kept(tmp_path):
    with RunWriter.create(tmp_path, CFG, run_id="r") as w:
        w.set_status("finished")
    assert Run(w.path).status()["state"] == "finished"
    assert not (w.path / LOCK_FILE).exists()


def test_a_writer_dropped_without_close_releases_its_lock(tmp_path):
    w = RunWriter.create(tmp_path, CFG, run_id="r")
    path = w.path
    del w
    RunWriter.resume(Run(path)).close()


def test_a_forked_child_closing_its_copy_of_the_writer_keeps_the_parents_lock(tmp_path):
    with RunWriter.create(tmp_path, CFG, run_id="r") as w:
        pid = os.fork()
        if pid == 0:                      # the child: close its copy, exit without clean-up
            try:
                w.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert w.run.is_locked() is True and (w.path / LOCK_FILE).is_file()
        with pytest.raises(RunLockedError):
            RunWriter.resume(Run(w.path))
    assert w.run.is_locked() is None


# --------------------------------------------------------------------------- distinct folders

def test_runs_created_at_once_by_threads_get_distinct_folders(tmp_path):
    n = 8
    barrier, paths, errors = threading.Barrier(n), [], []

    def make():
        try:
            barrier.wait()
            with RunWriter.create(tmp_path, CFG, run_id="same") as w:
                paths.append(w.path)
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(paths)) == n
    assert {p.name for p in paths} == {"same"} | {f"same-{i}" for i in range(2, n + 1)}
    for p in paths:
        assert open_run(p).config() == CFG


def test_runs_created_at_once_by_processes_get_distinct_folders(tmp_path):
    """Several processes create a run of the same config at the same second (same run id):
    each gets its own folder, with its own complete files."""
    go = tmp_path / "go"
    code = ("import sys, time, os\n"
            "from dml.runs import RunWriter\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
            f"w = RunWriter.create(sys.argv[1], {CFG!r})\n"
            "print(w.path, flush=True)\n"
            "w.close()\n")
    root = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(4)]
    time.sleep(1.0)          # let every process import and wait
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    paths = [Path(o.strip()) for o, _ in outs]
    assert len(set(paths)) == 4
    for p in paths:
        run = open_run(p)
        assert run.config() == CFG and run.info()["id"] == p.name
        assert not (p / LOCK_FILE).exists()


# --------------------------------------------------------------------------- temporary files

def orphan_like_a_killed_writer(target: Path, monkeypatch) -> Path:
    """The temporary file that dml.atomic leaves when its process dies before the rename."""
    import dml.atomic as atomic

    def die(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", die)
        m.setattr(atomic.os, "unlink", lambda *a, **k: None)   # as if killed: no clean-up
        with pytest.raises(KeyboardInterrupt):
            atomic.atomic_write_bytes(target, b"half")
    (tmp,) = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")
              and p.name.startswith(f".{target.name}.")]
    return tmp


def age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_resume_and_close_remove_orphan_temporary_files(tmp_path, monkeypatch):
    w = RunWriter.create(tmp_path, CFG, run_id="r")
    w.close()
    orphans = [orphan_like_a_killed_writer(w.path / "status.json", monkeypatch),
               orphan_like_a_killed_writer(w.path / "checkpoints" / "last.safetensors",
                                           monkeypatch),
               orphan_like_a_killed_writer(w.path / "evals" / "epoch_0001.npz", monkeypatch)]
    for p in orphans:
        age(p)
    folder = w.path / "checkpoints" / "resume" / ".epoch_0003.k2j4.tmp"   # a half resume point
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")
    age(folder / "model.safetensors")
    age(folder)
    orphans.append(folder)
    fresh = orphan_like_a_killed_writer(w.path / "evals" / "epoch_0002.npz", monkeypatch)
    mine = w.path / "notes.tmp"          # not a name dml.atomic writes: never touched
    mine.write_text("keep")
    age(mine)

    w2 = RunWriter.resume(Run(w.path))
    assert not any(p.exists() for p in orphans)
    assert fresh.exists() and mine.exists()       # may be another process's write in flight
    late = orphan_like_a_killed_writer(w.path / "metrics.jsonl", monkeypatch)
    age(late)
    w2.close()
    assert not late.exists() and fresh.exists() and mine.exists()
    with RunWriter.resume(Run(w.path)) as w3:
        assert w3.clean_temporary_files(min_age_s=0) == [fresh]
    assert mine.exists()
    run = open_run(w.path)                                      # the real files are intact
    assert run.config() == CFG and run.status()["progress"] == {}
