"""Training jobs launched from the app: each job is a subprocess (``python -m app.jobs run
JOBFILE``) that trains one or more configurations in sequence and precomputes their maps.

A job is a JSON file ``<runs_root>/.jobs/<job_id>.json`` (written atomically) holding the
configurations, the run directory of each as soon as it is created, the current step, and the
state; the app polls it for progress bars, from any session, also after an app restart. The run
directories themselves follow the normal contract (``dml/runs.py``), so a job's runs show up in
every page while they train.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from dml.atomic import atomic_write_json, read_json
from dml.runs import make_run_id, process_alive

REPO = Path(__file__).resolve().parents[1]
JOBS_DIR = ".jobs"

# The demo set: (loss, strategy) pairs tried in order for each slot; the first registered pair wins.
DEMO_PLAN = [
    {"title": "baseline", "choices": [("contrastive", "none")]},
    {"title": "Metrix", "choices": [("contrastive", "metrix-embed"),
                                    ("contrastive", "metrix-feature"),
                                    ("contrastive", "metrix-input")]},
    {"title": "Embedding Expansion", "choices": [("multi-similarity", "embedding-expansion"),
                                                 ("triplet", "embedding-expansion"),
                                                 ("lifted-structure", "embedding-expansion")]},
]
DEMO_OVERRIDES = ["data.name=digits", "train.epochs=8", "train.seed=0"]


def demo_configs() -> tuple[list[dict[str, Any]], list[str]]:
    """The demo set's run configs (baseline, Metrix, Embedding Expansion on digits), using only
    registered strategies, and notes on every slot that had to fall back to 'none'."""
    from dml.config import RunConfig
    from dml.mixing import supported_pairs

    pairs = set(supported_pairs())
    configs, notes = [], []
    for slot in DEMO_PLAN:
        choice = next((c for c in slot["choices"] if (c[1], c[0]) in pairs), None)
        if choice is None:
            loss, strategy = slot["choices"][0][0], "none"
            wanted = slot["choices"][0][1]
            if wanted != "none":
                notes.append(f"{slot['title']}: strategy {wanted!r} is not registered in this "
                             f"installation; trained {loss} without mixing instead")
        else:
            loss, strategy = choice
        cfg = RunConfig().with_overrides(DEMO_OVERRIDES + [
            f"loss.name={loss}", f"mixing.name={strategy}", f"name=demo {slot['title']}"])
        configs.append(cfg.to_dict())
    return configs, notes


# --------------------------------------------------------------------------- job files

def jobs_dir(root: str | os.PathLike) -> Path:
    return Path(root) / JOBS_DIR


def read_job(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        job = read_json(path)
    except (OSError, ValueError):
        return None
    if job.get("state") in ("queued", "running") and job.get("pid") and \
            not process_alive(job.get("host"), job.get("pid")):
        job = dict(job, state="interrupted",
                   error=job.get("error") or "the job process is gone")
    job["path"] = str(path)
    return job


def list_jobs(root: str | os.PathLike, active_only: bool = False,
              max_age_s: float | None = None) -> list[dict[str, Any]]:
    """Jobs under a runs root, newest first (optionally only queued / running ones, or only
    ones started within ``max_age_s``)."""
    d = jobs_dir(root)
    if not d.is_dir():
        return []
    jobs = []
    for p in sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        j = read_job(p)
        if j is None:
            continue
        if active_only and j.get("state") not in ("queued", "running"):
            continue
        if max_age_s is not None and time.time() - float(j.get("started_ts", 0)) > max_age_s:
            continue
        jobs.append(j)
    return jobs


def job_progress(job: dict[str, Any]) -> tuple[float, str]:
    """(fraction in [0, 1], one-line text) of a job: finished runs plus the current one."""
    runs = job.get("runs", [])
    n = max(1, len(runs))
    cur = int(job.get("current", 0))
    prog = job.get("progress") or {}
    frac_cur = 0.0
    if prog.get("steps"):
        frac_cur = min(1.0, prog.get("step", 0) / prog["steps"])
    state = job.get("state")
    if state == "finished":
        return 1.0, f"{job.get('title', 'job')}: done ({len(runs)} run(s))"
    phase = "maps" if prog.get("phase") == "maps" else job.get("phase", "training")
    # training is ~90% of a run's time, the maps the rest
    within = 0.9 * frac_cur + (0.9 if phase == "maps" else 0.0)
    frac = min(1.0, (min(cur, n) + (within if cur < n else 0.0)) / n)
    name = runs[cur]["name"] if cur < len(runs) else ""
    if state in ("failed", "interrupted"):
        return frac, f"{job.get('title', 'job')}: {state}: {job.get('error', '')}"
    if phase == "maps":
        what = "computing maps"
    elif prog.get("epochs"):
        what = f"epoch {prog.get('epoch')}/{prog['epochs']}, step {prog.get('step')}/{prog['steps']}"
    else:
        what = "starting"
    return frac, f"{job.get('title', 'job')}: run {min(cur + 1, n)}/{n} {name} - {what}"


def start_job(root: str | os.PathLike, configs: list[dict[str, Any]], title: str = "training",
              notes: list[str] | None = None, precompute: bool = True,
              python: str | None = None) -> dict[str, Any]:
    """Write a job file and start its subprocess (detached: it outlives the app's reruns)."""
    from dml.config import RunConfig, validate

    for c in configs:   # fail here, in the app, with the config error, not in the subprocess
        validate(RunConfig.from_dict(c))
    root = Path(root).resolve()
    d = jobs_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    path = d / f"{job_id}.json"
    log = d / f"{job_id}.log"
    job = {"id": job_id, "title": title, "state": "queued", "root": str(root),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "started_ts": time.time(),
           "runs": [{"name": c.get("name") or f"{c['data']['name']} {c['loss']['name']} "
                     f"{c['mixing']['name']} s{c['train']['seed']}", "config": c, "run_dir": None,
                     "error": None} for c in configs],
           "current": 0, "progress": {}, "phase": "training", "notes": notes or [],
           "precompute": precompute, "log": str(log), "host": socket.gethostname()}
    atomic_write_json(path, job)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "ab") as fh:
        proc = subprocess.Popen([python or sys.executable, "-m", "app.jobs", "run", str(path)],
                                cwd=str(REPO), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    job["pid"] = proc.pid
    _update(path, pid=proc.pid)
    job["path"] = str(path)
    return job


def _update(path: Path, **fields) -> dict[str, Any]:
    job = read_json(path)
    job.update(fields)
    atomic_write_json(path, job)
    return job


def run_job(path: str | os.PathLike) -> int:
    """The job subprocess: train each configuration in turn, then precompute its maps."""
    from dml.config import RunConfig
    from dml.projection import configure_numba_cache, precompute_projections
    from dml.train import train

    configure_numba_cache()
    path = Path(path)
    job = _update(path, state="running", pid=os.getpid(), host=socket.gethostname())
    root = Path(job["root"])
    failures = 0
    for i, spec in enumerate(job["runs"]):
        cfg = RunConfig.from_dict(spec["config"])
        base = make_run_id(spec["config"])
        run_id, n = base, 1
        while (root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        job["runs"][i]["run_dir"] = str(root / run_id)
        job = _update(path, runs=job["runs"], current=i, progress={}, phase="training")
        last = [0.0]

        def on_progress(p, _i=i):
            now = time.time()
            if p.get("step") == p.get("steps") and p.get("steps"):
                p = dict(p, phase="maps")     # training done: the trainer caches the maps next
            if now - last[0] >= 1.0 or p.get("step") == p.get("steps"):
                last[0] = now
                _update(path, progress=p)

        try:
            run_dir = train(cfg, root, progress=False, on_progress=on_progress, run_id=run_id)
            job["runs"][i]["run_dir"] = str(run_dir)
            # maps for the explorer: the trainer caches them itself (train.projections);
            # a trainer without that option leaves them to the job
            if job.get("precompute", True) and not hasattr(cfg.train, "projections"):
                _update(path, runs=job["runs"], phase="maps")
                methods = os.environ.get("DML_PRECOMPUTE", "pca,umap").split(",")
                precompute_projections(run_dir, "best+last", [m for m in methods if m])
        except Exception as exc:   # the run's status.json has the traceback; keep going
            failures += 1
            job["runs"][i]["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        job = _update(path, runs=job["runs"], current=i + 1, phase="training")
    errors = [r["error"] for r in job["runs"] if r.get("error")]
    _update(path, state="failed" if failures else "finished",
            error="; ".join(errors) if errors else None, finished_ts=time.time())
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "run":
        return run_job(argv[1])
    if len(argv) == 2 and argv[0] == "demo":
        configs, notes = demo_configs()
        job = start_job(argv[1], configs, "demo set", notes)
        print(job["path"])
        return 0
    print("usage: python -m app.jobs run JOBFILE | demo RUNS_ROOT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
