"""Maps off the training path (dml.maps): a run is finished when its training is, its maps
follow in a background process, one per runs folder, that takes every queued run in turn."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dml import maps
from dml.config import RunConfig
from dml.projection import load_projection
from dml.runs import open_run
from dml.train import train

TINY = ["data.name=digits", "loss.name=contrastive", "train.epochs=2",
        "train.iterations_per_epoch=3", "model.params.width=8", "model.embedding_dim=16",
        "train.threads=1"]


def _wait(path: Path, states=("done", "failed"), timeout: float = 240.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = maps.maps_status(path)
        if st and st["state"] in states:
            return st
        time.sleep(0.2)
    raise AssertionError(f"maps of {path} not {states} after {timeout} s: "
                         f"{maps.maps_status(path)}; log: "
                         f"{(path / 'maps.log').read_text() if (path / 'maps.log').exists() else ''}")


def test_a_run_is_finished_before_its_maps_which_then_arrive(tmp_path):
    path = train(RunConfig().with_overrides(TINY + ["train.projections=all"]), tmp_path,
                 progress=False)
    returned = time.time()
    st = open_run(path).status()
    assert st["state"] == "finished" and st["progress"]["projections"] == "background"
    assert not open_run(path).is_locked()          # the run's writer is done with it
    queued = maps.maps_status(path)
    assert queued["state"] in ("queued", "running", "done")
    assert queued["epochs"] == [1, 2] and queued["methods"][0] == "pca"
    done = _wait(path)
    assert done["state"] == "done", done
    assert done["finished_ts"] > returned          # train() did not wait for the maps
    assert sorted(done["done"]) == sorted(done["todo"]) == \
        sorted(f"{m}:{e}" for m in done["methods"] for e in (1, 2))
    for e in (1, 2):
        for m in done["methods"]:
            assert load_projection(path, e, m) is not None
    assert "maps done in" in (path / "maps.log").read_text()
    assert not list((tmp_path / maps.QUEUE_DIR).glob("*.json"))   # the queue is empty


def test_one_process_per_runs_folder_takes_every_queued_run(tmp_path, monkeypatch):
    """While another process holds the folder's queue lock, finished runs only queue (their
    own drainers leave at once, leaving the entries to the holder); once it is released,
    one drainer makes the maps of every queued run, in the order they were queued."""
    import fcntl

    import dml.projection as P

    monkeypatch.setattr(P, "umap_available", lambda: False)   # PCA only: fast
    q = tmp_path / maps.QUEUE_DIR
    q.mkdir()
    fd = os.open(q / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        paths = [train(RunConfig().with_overrides(TINY + [f"train.seed={s}", "train.epochs=1",
                                                          "train.projections=last"]),
                       tmp_path, progress=False) for s in range(3)]
        _wait_for_no_drainer(tmp_path)         # their drainers started, found the lock, left
        for p in paths:
            st = maps.maps_status(p)
            assert st["state"] == "queued" and st["alive"] and st["pending"] == 1
            assert load_projection(p, 1, "pca") is None
        assert len(list(q.glob("*.json"))) == 3
    finally:
        os.close(fd)                          # the "other process" goes away
    assert maps.drain(tmp_path) == 3          # this one takes all three
    for p in paths:
        st = maps.maps_status(p)
        assert st["state"] == "done" and not st["alive"] and st["methods"] == ["pca"]
        assert load_projection(p, 1, "pca") is not None
    started = [maps.maps_status(p)["started_ts"] for p in paths]
    assert started == sorted(started)          # oldest queued first
    assert not list(q.glob("*.json")) and maps.drain(tmp_path) == 0


def _wait_for_no_drainer(root: Path, timeout: float = 120.0) -> None:
    """Until no `python -m dml.maps drain <root>` process is alive (they start slowly on a
    loaded machine)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        alive = False
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dml.maps" in cmd and str(root).encode() in cmd:
                alive = True
                break
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"a drainer of {root} is still alive after {timeout} s")


def test_maps_left_by_a_killed_process_are_reported_as_not_alive(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / maps.STATUS_FILE).write_text(json.dumps(
        {"state": "running", "epochs": [1, 2], "methods": ["pca", "umap"],
         "todo": ["pca:1", "umap:1", "pca:2", "umap:2"], "done": ["pca:1"],
         "current": "umap:1"}))
    st = maps.maps_status(run)
    assert st["state"] == "running" and st["alive"] is False and st["pending"] == 3
    assert maps.maps_status(tmp_path / "none") is None


def test_a_run_without_maps_queues_nothing(tmp_path):
    path = train(RunConfig().with_overrides(TINY + ["train.projections=none"]), tmp_path,
                 progress=False)
    assert maps.maps_status(path) is None and not (tmp_path / maps.QUEUE_DIR).exists()
    path = train(RunConfig().with_overrides(TINY + ["train.save_embeddings=none"]), tmp_path,
                 progress=False)
    assert maps.maps_status(path) is None


def test_map_mode_is_checked():
    from dml.config import ConfigError, validate

    with pytest.raises(ConfigError, match="train.map_mode must be background or inline"):
        validate(RunConfig().with_overrides(["train.map_mode=later"]))


def test_how_a_run_keeps_its_maps_is_not_part_of_its_configuration():
    """Runs that differ only in what they keep for viewing are seeds of one configuration
    (grouped on the Compare page, reused by `dml bench claims`)."""
    from dml.stats import configuration_key

    plain = RunConfig().to_dict()
    viewing = RunConfig().with_overrides(["train.map_mode=inline", "train.projections=none",
                                          "train.save_embeddings=none",
                                          "train.map_fit_max=0"]).to_dict()
    assert configuration_key(plain) == configuration_key(viewing)
    assert configuration_key(plain) != configuration_key(
        RunConfig().with_overrides(["train.lr=0.5"]).to_dict())


def test_a_run_its_map_process_died_on_twice_is_failed_and_the_queue_goes_on(tmp_path,
                                                                            monkeypatch):
    """A drainer killed while mapping a run (a crash, OOM) leaves the entry; the next ones try
    again, and after MAX_ATTEMPTS the run is marked failed and dropped, so that one run cannot
    block every later run's maps."""
    import dml.projection as P

    monkeypatch.setattr(P, "umap_available", lambda: False)
    q = tmp_path / maps.QUEUE_DIR
    paths = []
    for s in range(2):
        cfg = RunConfig().with_overrides(TINY + [f"train.seed={s}", "train.epochs=1",
                                                 "train.projections=none"])
        paths.append(train(cfg, tmp_path, progress=False))
    for p in paths:
        maps.enqueue(p, "last")
    _wait(paths[0], timeout=60), _wait(paths[1], timeout=60)
    (paths[1] / "evals" / "epoch_0001.pca.npz").unlink()
    maps.enqueue(paths[1], "last")   # queued again (its drainer may take it at once: fine)
    # the first run's entry as a twice-killed drainer leaves it, then a new drainer
    (paths[0] / maps.STATUS_FILE).unlink()
    (q / f"{paths[0].name}.json").write_text(json.dumps(
        {"run": str(paths[0]), "epochs": "last", "seed": 0, "queued_ts": 1.0,
         "attempts": maps.MAX_ATTEMPTS}))
    (paths[0] / maps.STATUS_FILE).write_text(json.dumps(
        {"state": "running", "todo": ["pca:1"], "done": [], "queued_ts": 1.0}))
    maps.drain(tmp_path)             # (or the re-queued run's own drainer, still at work)
    st = _wait(paths[0], timeout=60)
    assert st["state"] == "failed" and "stopped 2 times" in st["error"] and not st["alive"]
    assert _wait(paths[1], timeout=60)["state"] == "done"
    t0 = time.time()
    while list(q.glob("*.json")) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not list(q.glob("*.json"))


def test_a_queued_run_counts_as_alive_while_its_drainer_starts(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    q = tmp_path / maps.QUEUE_DIR
    q.mkdir()
    st = {"state": "queued", "todo": ["pca:1"], "done": [], "queued_ts": time.time()}
    (run / maps.STATUS_FILE).write_text(json.dumps(st))
    assert not maps.maps_status(run)["alive"]            # no entry: nobody will make them
    (q / "r.json").write_text(json.dumps({"run": str(run)}))
    assert maps.maps_status(run)["alive"]                # just queued: a drainer is starting
    (run / maps.STATUS_FILE).write_text(json.dumps(
        dict(st, queued_ts=time.time() - maps.START_GRACE_S - 1)))
    assert not maps.maps_status(run)["alive"]            # no drainer came: the app makes them


def test_dml_runs_says_a_finished_runs_maps_are_on_their_way(tmp_path, capsys):
    from dml.cli import main

    path = train(RunConfig().with_overrides(TINY + ["train.projections=none"]), tmp_path,
                 progress=False)
    q = tmp_path / maps.QUEUE_DIR
    q.mkdir()
    (q / f"{path.name}.json").write_text(json.dumps({"run": str(path)}))
    (path / maps.STATUS_FILE).write_text(json.dumps(
        {"state": "queued", "todo": ["pca:2", "umap:2"], "done": [], "queued_ts": time.time()}))
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert "finished (maps queued)" in capsys.readouterr().out
    (path / maps.STATUS_FILE).write_text(json.dumps(
        {"state": "done", "todo": ["pca:2", "umap:2"], "done": ["pca:2", "umap:2"]}))
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "maps" not in out


def test_a_run_whose_maps_are_all_cached_starts_no_process(tmp_path, monkeypatch):
    import dml.projection as P

    monkeypatch.setattr(P, "umap_available", lambda: False)
    path = train(RunConfig().with_overrides(TINY + ["train.epochs=1", "train.projections=last",
                                                    "train.map_mode=inline"]),
                 tmp_path, progress=False)
    assert load_projection(path, 1, "pca") is not None
    monkeypatch.setattr(maps, "start_drainer", lambda *a, **k: pytest.fail("a drainer started"))
    st = maps.enqueue(path, "last")                    # e.g. a resumed run with its maps
    assert st["state"] == "done" and st["todo"] == [] and st["epochs"] == [1]
    assert maps.maps_text(maps.maps_status(path)) is None
    assert not (tmp_path / maps.QUEUE_DIR).exists()


def test_the_map_process_command_line_says_how_to_call_it(capsys):
    assert maps.main(["drain"]) == 2
    assert "usage: python -m dml.maps drain RUNS_ROOT" in capsys.readouterr().err
