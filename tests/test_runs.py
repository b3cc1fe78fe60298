import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dml.runs import (RUN_VERSION, Run, RunFormatError, RunWriter, iter_runs, list_runs,
                      open_run, resolve_run)

CFG = {"data": {"name": "digits"}, "model": {"name": "small-cnn"},
       "loss": {"name": "contrastive"}, "mixing": {"name": "none"}, "train": {"seed": 3},
       "name": None}


def test_create_write_read(tmp_path):
    w = RunWriter.create(tmp_path, CFG)
    assert w.path.parent == tmp_path and w.path.name.endswith("digits-contrastive-none-s3")
    run = open_run(w.path)
    assert run.info()["version"] == RUN_VERSION
    assert run.status()["state"] == "running"
    w.append_metrics({"epoch": 1, "test": {"recall@1": 0.5}})
    w.append_metrics({"epoch": 2, "test": {"recall@1": 0.6}})
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    w.truncate_metrics(1)
    assert [m["epoch"] for m in run.metrics()] == [1]
    emb = np.random.rand(4, 3).astype(np.float32)
    w.save_eval(1, test_embeddings=emb)
    assert run.eval_epochs() == [1]
    np.testing.assert_array_equal(run.load_eval(1)["test_embeddings"], emb)
    with pytest.raises(FileNotFoundError, match="available: \\[1\\]"):
        run.load_eval(5)
    w.set_status("finished", best={"epoch": 1, "val": {}, "test": {"recall@1": 0.5}})
    s = run.summary()
    assert s["state"] == "finished" and s["test"]["recall@1"] == 0.5 and s["seed"] == 3
    # no temporary files left behind
    assert not [p for p in w.path.rglob("*.tmp")]


def test_same_id_twice_gets_a_new_folder(tmp_path):
    a = RunWriter.create(tmp_path, CFG, run_id="x")
    b = RunWriter.create(tmp_path, CFG, run_id="x")
    assert a.path != b.path and b.path.name == "x-2"


def test_dead_process_of_a_run_without_lock_file_reads_as_interrupted(tmp_path):
    """Runs written before the run lock (no lock file) fall back to checking the PID."""
    w = RunWriter.create(tmp_path, CFG)
    w.close()                                  # the lock file goes with the lock
    assert not (w.path / "lock").exists()
    st = json.loads((w.path / "status.json").read_text())
    st["pid"] = 2**22 + 12345  # no such process
    (w.path / "status.json").write_text(json.dumps(st))
    status = Run(w.path).status()
    assert status["state"] == "interrupted" and "dml train --config" in status["error"]
    st["pid"] = os.getpid()
    (w.path / "status.json").write_text(json.dumps(st))
    assert Run(w.path).status()["state"] == "running"


def test_foreign_and_future_runs_are_refused(tmp_path):
    with pytest.raises(RunFormatError, match="does not exist"):
        open_run(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunFormatError, match="run.json is missing"):
        open_run(tmp_path / "plain")
    w = RunWriter.create(tmp_path, CFG, run_id="future")
    info = json.loads((w.path / "run.json").read_text())
    info["version"] = RUN_VERSION + 1
    (w.path / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunFormatError, match="format version 2"):
        open_run(w.path)
    (w.path / "run.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="not valid JSON"):
        open_run(w.path)
    RunWriter.create(tmp_path, CFG, run_id="good")
    listed = list(iter_runs(tmp_path))
    assert sum(isinstance(r, RunFormatError) for r in listed) == 1
    assert [r.id for r in list_runs(tmp_path)] == ["good"]
    assert resolve_run("goo", tmp_path).id == "good"
    with pytest.raises(RunFormatError, match="no run"):
        resolve_run("zzz", tmp_path)


def test_reading_runs_does_not_import_torch():
    code = "import sys, dml.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False", out.stderr


def test_class_names_round_trip_and_tolerate_a_bad_file(tmp_path):
    from dml.runs import RunWriter

    w = RunWriter.create(tmp_path, {"data": {"name": "x"}})
    assert w.run.class_names() == {}                       # older runs have no classes.json
    w.write_class_names({0: "alpha", 3: "Korean/character07"})
    assert w.run.class_names() == {0: "alpha", 3: "Korean/character07"}
    (w.path / "classes.json").write_text("{not json")
    assert w.run.class_names() == {}


def test_evaluations_from_before_the_weight_rename_read_in_todays_layout(tmp_path):
    """Old evaluations stored ``synthetic_ratio`` and, for Symmetrical Synthesis, parents (i, j)
    with a flag (1: the reflection of i, 0: of j); they read as today's weight (NaN for a
    reflection) with parents (reflected point, axis), the layout symmetric_points writes now."""
    import torch

    from dml.mixing.synthesis import symmetric_points

    _, _, parents, weight = symmetric_points(torch.eye(2, dtype=torch.float64),
                                             torch.tensor([0, 0]))
    w = RunWriter.create(tmp_path, CFG)
    w.save_eval(1, synthetic_kind=np.array(["symmetrical", "symmetrical", "ee"]),
                synthetic_parents=np.array([[0, 1], [0, 1], [2, 3]]),
                synthetic_ratio=np.array([1.0, 0.0, 2 / 3], np.float32))
    ev = open_run(w.path).load_eval(1)
    assert "synthetic_ratio" not in ev
    assert ev["synthetic_parents"][:2].tolist() == parents.tolist() == [[0, 1], [1, 0]]
    assert ev["synthetic_parents"][2].tolist() == [2, 3]
    assert np.isnan(ev["synthetic_weight"][:2]).all() and torch.isnan(weight).all()
    assert ev["synthetic_weight"][2] == pytest.approx(2 / 3)
    w.save_eval(2, synthetic_weight=np.array([0.25], np.float32))     # today's: as written
    assert open_run(w.path).load_eval(2)["synthetic_weight"].tolist() == [0.25]


# --------------------------------------------------------------------------- broken runs

BROKEN = {   # file -> garbage that a crash, a disk error or a hand edit could leave
    "config.json": "{not json",
    "status.json": "\x00\x00garbage",
    "metrics.jsonl": '{"epoch": 1, "test": {"recall@1": 0.5}}\n{"epoch": 2, "te\n',
}
BROKEN_ERRORS = {"config.json": "not valid JSON", "status.json": "not valid JSON",
                 "metrics.jsonl": "line 2 is not valid JSON"}


def three_runs(root, broken_file: str) -> str:
    """Runs good-a, good-c (finished, with metrics) and bad-b with ``broken_file`` garbage."""
    for rid in ("good-a", "bad-b", "good-c"):
        with RunWriter.create(root, CFG, run_id=rid) as w:
            w.append_metrics({"epoch": 1, "test": {"recall@1": 0.5}})
            w.set_status("finished", best={"epoch": 1, "val": {"recall@1": 0.4},
                                           "test": {"recall@1": 0.5, "map@r": 0.25}})
    (root / "bad-b" / broken_file).write_text(BROKEN[broken_file], encoding="utf-8")
    return "bad-b"


@pytest.mark.parametrize("broken_file", list(BROKEN))
def test_a_broken_run_is_listed_as_unreadable_and_hides_no_other(tmp_path, broken_file):
    from dml.runs import RunFileError, summarize_runs

    bad = three_runs(tmp_path, broken_file)
    summaries, errors = summarize_runs(tmp_path)
    assert [s["id"] for s in summaries] == ["good-c", "good-a"]
    (err,) = errors
    assert isinstance(err, RunFileError) and err.run == tmp_path / bad
    assert err.file == tmp_path / bad / broken_file
    assert err.parts() == {"run": bad, "file": broken_file, "error": err.reason}
    assert BROKEN_ERRORS[broken_file] in err.reason
    assert str(err).startswith(f"{tmp_path / bad / broken_file}: ")


@pytest.mark.parametrize("broken_file", list(BROKEN))
def test_dml_runs_lists_the_good_runs_and_names_the_bad_file(tmp_path, broken_file, capsys):
    from dml.cli import main

    bad = three_runs(tmp_path, broken_file)
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    table, _, notes = out.partition("\n\n")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"good-a", "bad-b", "good-c"}
    assert rows["good-a"][5] == "finished" and rows["good-a"][7] == "50.0"
    assert rows[bad][1:] == ["unreadable"]
    assert "1 unreadable run(s)" in notes
    assert f"{bad}/{broken_file}: {BROKEN_ERRORS[broken_file]}" in notes


def test_readers_name_the_file_and_the_error(tmp_path):
    from dml.runs import RunFileError

    w = RunWriter.create(tmp_path, CFG, run_id="r")
    w.close()
    run = Run(w.path)
    (w.path / "metrics.jsonl").write_text('{"epoch": 1}\n\n[1, 2]\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl: line 3 holds a JSON list"):
        run.metrics()
    (w.path / "status.json").write_text("[]")
    with pytest.raises(RunFileError, match=r"status.json: holds a JSON list, not an object"):
        run.status()
    w.set_status("finished")
    (w.path / "config.json").write_text(json.dumps({"data": {"name": "digits"}}))
    with pytest.raises(RunFileError, match=r"config.json: has no model.name"):
        run.summary()
    (w.path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(RunFileError, match=r"config.json: not valid JSON"):
        open_run(w.path)
    (w.path / "config.json").write_text("{")
    with pytest.raises(RunFormatError, match=r"config.json: not valid JSON"):
        resolve_run(str(w.path), tmp_path)
