"""The app's job queue (``app.jobs.JobQueue``): jobs launched from the app run at most
``max_jobs`` at once, the others wait as "queued" in submission order and start when a slot
frees; each started job gets an explicit thread count (cores given / max_jobs) unless its
configuration sets one; a queued job can be cancelled and then never starts; queued jobs are
shown (with their position and a Cancel button) on the Runs page, also after a reload.

Most tests run the real queue with a stub job command (a small script that records when it
started and ended and the threads it was given); one runs two real tiny training jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app import jobs
from app.jobs import JobQueue, job_limits

STUB = textwrap.dedent("""
    import json, os, sys, time
    start = time.time()
    sleep_s, path = float(sys.argv[1]), sys.argv[2]
    with open(path) as fh:
        job = json.load(fh)
    threads = [r["config"]["train"].get("threads") for r in job["runs"]]
    time.sleep(sleep_s)
    end = time.time()
    def write(p, obj):
        tmp = p + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
        os.replace(tmp, p)
    write(path + ".stub", {"start": start, "end": end, "threads": threads,
                           "omp": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()})
    with open(path) as fh:
        job = json.load(fh)
    job.update(state="finished", finished_ts=end)
    write(path, job)
""")


@pytest.fixture
def stub(tmp_path):
    """``stub(seconds)``: the command of a job process that records and sleeps that long."""
    script = tmp_path / "stub_job.py"
    script.write_text(STUB)
    return lambda seconds=1.0: [sys.executable, str(script), str(seconds)]


def config(name: str, *extra: str) -> dict:
    from dml.config import RunConfig
    return RunConfig().with_overrides(["data.name=digits", "train.epochs=1",
                                       "train.iterations_per_epoch=2", f"name={name}",
                                       *extra]).to_dict()


def record(job: dict) -> dict | None:
    p = Path(job["path"] + ".stub")
    return json.loads(p.read_text()) if p.is_file() else None


def wait_done(paths: list[str], queue: JobQueue, timeout: float = 60) -> list[dict]:
    t0 = time.time()
    while True:
        js = [jobs.read_job(p, queue) for p in paths]
        if all(j["state"] not in ("queued", "running") for j in js):
            return js
        assert time.time() - t0 < timeout, js
        time.sleep(0.1)


# --------------------------------------------------------------------------- limits

def test_limits_default_to_one_job_on_small_machines_and_split_the_cores(monkeypatch):
    for var in (jobs.MAX_JOBS_ENV, jobs.JOB_THREADS_ENV):
        monkeypatch.delenv(var, raising=False)

    def lim(cores, env=None, max_jobs=None):
        got = job_limits(cores, max_jobs, env or {})
        return got["max_jobs"], got["threads"]

    assert [lim(c) for c in (1, 2, 4)] == [(1, 1), (1, 2), (1, 4)]
    assert [lim(c) for c in (5, 8, 16, 64)] == [(1, 5), (2, 4), (4, 4), (16, 4)]
    assert lim(2, {"DML_MAX_JOBS": "2"}) == (2, 1)            # cores / N, at least 1
    assert lim(2, {"DML_MAX_JOBS": "3"}) == (3, 1)
    assert lim(8, {"DML_MAX_JOBS": "3"}) == (3, 2)
    assert lim(8, {"DML_JOB_THREADS": "2"}) == (4, 2)
    assert lim(8, {"DML_MAX_JOBS": "1", "DML_JOB_THREADS": "3"}) == (1, 3)
    assert lim(8, {"DML_MAX_JOBS": "4"}, max_jobs=1) == (1, 8)  # the app's setting wins
    bad = job_limits(2, None, {"DML_MAX_JOBS": "many"})
    assert (bad["max_jobs"], bad["threads"]) == (1, 2) and "DML_MAX_JOBS" in bad["warnings"][0]
    # cores given: the process's CPU affinity, as the queue sees it
    assert jobs.cores_given() == len(os.sched_getaffinity(0)) == JobQueue().cores
    monkeypatch.setenv("DML_MAX_JOBS", "2")
    env_lim = JobQueue(cores=2).limits()
    assert (env_lim["max_jobs"], env_lim["threads"]) == (2, 1)
    q = JobQueue(cores=2)
    q.set_max_jobs(1)
    assert (q.limits()["max_jobs"], q.limits()["threads"]) == (1, 2)
    # `dml app --max-jobs / --job-threads` set the environment of the server
    from dml import launch
    env = launch.build_command(["--max-jobs", "3", "--job-threads", "2"])[1]
    assert (env["DML_MAX_JOBS"], env["DML_JOB_THREADS"]) == ("3", "2")
    with pytest.raises(SystemExit, match="--max-jobs must be >= 1"):
        launch.build_command(["--max-jobs", "0"])


# --------------------------------------------------------------------------- the queue

def test_one_job_at_a_time_the_second_waits_and_each_gets_all_cores(tmp_path, stub):
    q = JobQueue(max_jobs=1, cores=2, command=stub(1.0), poll_s=0.1)
    j1 = jobs.start_job(tmp_path, [config("a")], title="first", queue=q)
    j2 = jobs.start_job(tmp_path, [config("b")], title="second", queue=q)
    assert j1["state"] == "running" and j1["pid"]
    assert j2["state"] == "queued" and not j2.get("pid") and j2["position"] == 1
    listed = {j["id"]: j for j in jobs.list_jobs(tmp_path, active_only=True, queue=q)}
    assert listed[j2["id"]]["position"] == 1
    assert jobs.job_progress(listed[j2["id"]])[1] == \
        "second: queued (position 1) - starts when a running job ends"
    done = wait_done([j1["path"], j2["path"]], q)
    assert [d["state"] for d in done] == ["finished", "finished"], done
    r1, r2 = record(j1), record(j2)
    assert r2["start"] >= r1["end"], (r1, r2)          # never two at once
    assert r1["threads"] == r2["threads"] == [2] and r1["omp"] == r2["omp"] == "2"
    assert [d["threads"] for d in done] == [2, 2]
    assert done[1]["launched_ts"] >= done[0]["finished_ts"]


def test_two_jobs_on_two_cores_get_one_thread_each_and_a_third_waits(tmp_path, stub):
    q = JobQueue(max_jobs=2, cores=2, command=stub(1.5), poll_s=0.1)
    js = [jobs.start_job(tmp_path, [config(n)], title=n, queue=q) for n in ("a", "b", "c")]
    assert [j["state"] for j in js] == ["running", "running", "queued"]
    assert js[2]["position"] == 1
    done = wait_done([j["path"] for j in js], q)
    assert all(d["state"] == "finished" for d in done), done
    r = [record(j) for j in js]
    assert r[0]["threads"] == r[1]["threads"] == r[2]["threads"] == [1]
    assert r[0]["omp"] == r[1]["omp"] == "1"
    assert r[1]["start"] < r[0]["end"] and r[0]["start"] < r[1]["end"]   # ran together
    assert r[2]["start"] >= min(r[0]["end"], r[1]["end"])               # only once one ended


def test_threads_the_user_set_are_kept(tmp_path, stub):
    q = JobQueue(max_jobs=1, cores=2, command=stub(0.1), poll_s=0.1)
    j = jobs.start_job(tmp_path, [config("x", "train.threads=3")], queue=q)
    done = wait_done([j["path"]], q)[0]
    assert record(j)["threads"] == [3] and record(j)["omp"] == "3" and done["threads"] == 3
    assert "threads_auto" not in done["runs"][0]


def test_submission_order_is_kept(tmp_path, stub):
    q = JobQueue(max_jobs=1, cores=2, command=stub(0.3), poll_s=0.05)
    js = [jobs.start_job(tmp_path, [config(f"n{i}")], title=f"n{i}", queue=q) for i in range(4)]
    assert [j.get("position") for j in js] == [None, 1, 2, 3]
    wait_done([j["path"] for j in js], q)
    starts = [record(j)["start"] for j in js]
    assert starts == sorted(starts)


def test_a_cancelled_queued_job_is_removed_and_never_starts(tmp_path, stub):
    q = JobQueue(max_jobs=1, cores=2, command=stub(1.5), poll_s=0.1)
    j1, j2, j3 = (jobs.start_job(tmp_path, [config(n)], title=n, queue=q) for n in "abc")
    assert (j2["position"], j3["position"]) == (1, 2)
    assert jobs.cancel_job(j2["path"], q) is True
    assert jobs.cancel_job(j2["path"], q) is False               # once
    assert jobs.cancel_job(j1["path"], q) is False               # started: not the queue's
    assert q.waiting() == [Path(j3["path"]).resolve()]
    assert jobs.read_job(j3["path"], q)["position"] == 1
    c = jobs.read_job(j2["path"], q)
    assert c["state"] == "cancelled" and "position" not in c
    assert jobs.job_progress(c)[1] == "b: cancelled before it started"
    assert j2["id"] not in {j["id"] for j in jobs.list_jobs(tmp_path, active_only=True, queue=q)}
    done = wait_done([j1["path"], j3["path"]], q)
    assert [d["state"] for d in done] == ["finished", "finished"]
    time.sleep(0.5)
    c = jobs.read_job(j2["path"], q)
    assert c["state"] == "cancelled" and not c.get("pid") and record(c) is None
    assert record(j3)["start"] >= record(j1)["end"]


def test_a_job_process_that_dies_frees_its_slot_and_says_so(tmp_path):
    q = JobQueue(max_jobs=1, cores=2, command=[sys.executable, "-c", "import sys; sys.exit(3)"],
                 poll_s=0.1)
    js = [jobs.start_job(tmp_path, [config(n)], title=n, queue=q) for n in ("dies", "next")]
    assert js[1]["state"] == "queued"
    t0 = time.time()
    while not all("exit code 3" in (jobs.read_job(j["path"], q).get("error") or "") for j in js):
        assert time.time() - t0 < 30, [jobs.read_job(j["path"], q) for j in js]
        time.sleep(0.1)
    assert [jobs.read_job(j["path"], q)["state"] for j in js] == ["interrupted"] * 2
    assert not q.waiting() and not q.running()


def test_a_queued_job_of_a_stopped_server_reads_as_lost(tmp_path):
    from dml.atomic import atomic_write_json
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    d = jobs.jobs_dir(tmp_path)
    job = {"id": "j", "title": "t", "state": "queued", "runs": [], "started_ts": time.time(),
           "queued_by": {"host": jobs.socket.gethostname(), "pid": gone.pid, "start": None}}
    atomic_write_json(d / "j.json", job)
    got = jobs.read_job(d / "j.json")
    assert got["state"] == "interrupted" and "lost" in got["error"]
    assert not jobs.list_jobs(tmp_path, active_only=True)
    if Path("/proc/self/stat").is_file():    # this pid, but another process's start time
        atomic_write_json(d / "j.json", dict(job, queued_by=dict(
            jobs.owner_token(), start="1")))
        assert jobs.read_job(d / "j.json")["state"] == "interrupted"
    atomic_write_json(d / "j.json", dict(job, queued_by=jobs.owner_token()))
    assert jobs.read_job(d / "j.json")["state"] == "queued"      # its server is alive
    # a started job whose pid now belongs to a later process (this one) is not running
    if Path("/proc/self/stat").is_file():
        atomic_write_json(d / "j.json", dict(job, state="running", pid=os.getpid(),
                                             host=jobs.socket.gethostname(), pid_start="1"))
        assert jobs.read_job(d / "j.json")["state"] == "interrupted"
        atomic_write_json(d / "j.json", dict(job, state="running", pid=os.getpid(),
                                             host=jobs.socket.gethostname(),
                                             pid_start=jobs.owner_token()["start"]))
        assert jobs.read_job(d / "j.json")["state"] == "running"


# --------------------------------------------------------------------------- the Runs page

def test_runs_page_shows_queued_jobs_after_a_reload_and_cancels_them(tmp_path, monkeypatch,
                                                                     stub):
    from tests.test_app_pages import open_app, rerun
    q = JobQueue(max_jobs=1, cores=2, command=stub(3.0), poll_s=0.1)
    monkeypatch.setattr(jobs, "_QUEUE", q)           # the server process's queue
    root = tmp_path / "runs"
    j1 = jobs.start_job(root, [config("a")], title="first job", queue=None)
    j2 = jobs.start_job(root, [config("b")], title="second job")
    assert j1.get("pid") and j2["position"] == 1
    for _ in range(2):                                # a page (re)load: a new session
        at = open_app(root, monkeypatch)
        assert "Training jobs" in [h.value for h in at.subheader]
        assert any("queued** #1 · second job" in m.value for m in at.markdown)
        assert any("lost" in c.value and "At most 1 training job" in c.value for c in at.caption)
        assert [b.key for b in at.button if b.key.startswith("cancel-")] == [f"cancel-{j2['id']}"]
        bars = [p.proto.text for p in at.sidebar.get("progress")]
        assert "second job: queued (position 1) - starts when a running job ends" in bars
    at.button(key=f"cancel-{j2['id']}").click()
    rerun(at)
    assert jobs.read_job(j2["path"])["state"] == "cancelled"
    assert not [b for b in at.button if b.key.startswith("cancel-")]
    assert any("Cancelled job" in s.value for s in at.success)
    done = wait_done([j1["path"]], q)[0]
    assert done["state"] == "finished"
    time.sleep(0.5)
    assert record(j2) is None and not jobs.read_job(j2["path"]).get("pid")


def test_the_launch_form_queues_when_a_job_runs(tmp_path, monkeypatch, stub):
    from tests.test_app_pages import open_app, rerun
    q = JobQueue(max_jobs=1, cores=2, command=stub(2.0), poll_s=0.1)
    monkeypatch.setattr(jobs, "_QUEUE", q)
    root = tmp_path / "runs"
    j1 = jobs.start_job(root, [config("a")], title="busy")
    at = open_app(root, monkeypatch)
    at.text_input(key="new-name").input("from-the-form")
    at.button(key="launch").click()
    rerun(at)
    assert any("Queued (job" in s.value and "position 1" in s.value for s in at.success)
    queued = [j for j in jobs.list_jobs(root) if j["title"] == "from-the-form"]
    assert queued and queued[0]["state"] == "queued"
    done = wait_done([j1["path"], queued[0]["path"]], q)
    assert record(done[1])["start"] >= record(done[0])["end"]
    assert record(done[1])["threads"] == [2]


def test_jobs_at_once_is_an_app_setting(tmp_path, monkeypatch):
    from tests.test_app_pages import open_app, rerun
    monkeypatch.delenv(jobs.MAX_JOBS_ENV, raising=False)
    monkeypatch.delenv(jobs.JOB_THREADS_ENV, raising=False)
    q = JobQueue(cores=2)
    monkeypatch.setattr(jobs, "_QUEUE", q)
    at = open_app(tmp_path / "runs", monkeypatch)
    assert at.number_input(key="max-jobs").value == 1
    at.number_input(key="max-jobs").set_value(2)
    rerun(at)
    assert (q.limits()["max_jobs"], q.limits()["threads"]) == (2, 1)
    assert any("At most 2 training job(s) run at once, 1 thread(s) each" in c.value
               for c in at.caption)


# --------------------------------------------------------------------------- real jobs

@pytest.mark.slow
def test_real_training_jobs_do_not_oversubscribe(tmp_path, monkeypatch):
    """Two tiny digits jobs through the real job process: with one job at a time the second
    trains only after the first ended, and each run's config records threads = cores given."""
    from dml.runs import Run
    from tests.test_app_fixtures import TINY
    monkeypatch.setenv("DML_PRECOMPUTE", "pca")
    tiny = [o for o in TINY if not o.startswith("train.threads")]
    q = JobQueue(max_jobs=1, poll_s=0.1)
    cores = jobs.cores_given()
    js = [jobs.start_job(tmp_path, [config(n, *tiny)], title=n, queue=q) for n in ("r1", "r2")]
    assert js[1]["state"] == "queued"
    done = wait_done([j["path"] for j in js], q, timeout=240)
    assert [d["state"] for d in done] == ["finished", "finished"], done
    assert done[1]["launched_ts"] >= done[0]["finished_ts"]
    for d in done:
        run = Run(d["runs"][0]["run_dir"])
        assert run.status()["state"] == "finished"
        assert run.config()["train"]["threads"] == cores == d["threads"]
