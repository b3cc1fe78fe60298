"""Training jobs launched from the app: each job is a subprocess (``python -m app.jobs run
JOBFILE``) that trains one or more configurations in sequence and precomputes their maps.

A job is a JSON file ``<runs_root>/.jobs/<job_id>.json`` (written atomically) holding the
configurations, the run directory of each as soon as it is created, the current step, and the
state; the app polls it for progress bars, from any session, also after an app restart. The run
directories themselves follow the normal contract (``dml/runs/``), so a job's runs show up in
every page while they train.

Jobs queue (``JobQueue``, one per app server process): at most ``max_jobs`` job processes run at
once, the others wait in the server, in submission order, with the state "queued" in their job
file, and start as slots free; a queued job can be cancelled ("cancelled": it never starts).
Each started job gets an explicit thread count, ``train.threads`` = the cores given to the
server process (``os.sched_getaffinity``) divided by ``max_jobs`` (at least 1), written into its
configurations unless the configuration sets ``train.threads`` itself; OMP_NUM_THREADS and its
kin are set to the same number for the job's maps. Settings (environment; ``dml app --max-jobs /
--job-threads`` set them; the Runs page's "Jobs at once" overrides the first until a restart):
``DML_MAX_JOBS`` (jobs at once) and ``DML_JOB_THREADS`` (threads per job; then jobs at once =
cores // it when DML_MAX_JOBS is unset); with neither, 1 job on a process given <= 4 cores, else
cores // 4 (see ``job_limits``). Queued jobs live in the server process:
a job file that stays "queued" after its server stopped reads as "interrupted" (lost; launch it
again); running jobs are separate processes and keep running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from dml.atomic import atomic_write_json, read_json
from dml.distributed import cores_given
from dml.paths import env_with_checkout
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


LOST_TEXT = ("the app server that queued it stopped before it could start (queued jobs wait "
             "in the server process and are lost when it stops); launch it again")


def read_job(path: str | os.PathLike, queue: "JobQueue | None" = None) -> dict[str, Any] | None:
    """A job file, with the state it really has: a job whose process is gone, or a queued one
    whose app server is gone, reads as "interrupted"; a job waiting in ``queue`` (default: this
    process's queue) gets its 1-based ``position``."""
    try:
        job = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(job, dict):
        return None
    if job.get("state") in ("queued", "running"):
        if job.get("pid"):
            if not _job_process_alive(job):
                job = dict(job, state="interrupted",
                           error=job.get("error") or "the job process is gone")
        elif not _owner_alive(job.get("queued_by")):
            job = dict(job, state="interrupted", error=job.get("error") or (
                LOST_TEXT if job.get("state") == "queued"
                else "the app server stopped while starting the job"))
    if job.get("state") == "queued" and not job.get("pid"):
        q = queue if queue is not None else _QUEUE
        pos = q.position(path) if q is not None else None
        if pos is not None:
            job["position"] = pos
    job["path"] = str(path)
    return job


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def list_jobs(root: str | os.PathLike, active_only: bool = False,
              max_age_s: float | None = None,
              queue: "JobQueue | None" = None) -> list[dict[str, Any]]:
    """Jobs under a runs root, newest first (optionally only queued / running ones, or only
    ones submitted within ``max_age_s``)."""
    d = jobs_dir(root)
    if not d.is_dir():
        return []
    jobs = []
    for p in sorted(d.glob("*.json"), key=_mtime, reverse=True):
        j = read_job(p, queue)
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
    if state == "queued" and not job.get("pid"):
        pos = job.get("position")
        return 0.0, (f"{job.get('title', 'job')}: queued" + (f" (position {pos})" if pos else "")
                     + " - starts when a running job ends")
    if state == "cancelled":
        return 0.0, f"{job.get('title', 'job')}: cancelled before it started"
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
              python: str | None = None, queue: "JobQueue | None" = None) -> dict[str, Any]:
    """Write a job file and hand it to the job queue (default: this process's): it starts at
    once, as a detached subprocess that outlives the app's reruns, when fewer than the queue's
    ``max_jobs`` jobs run, else it waits as "queued". Returns the job as read back (``pid``
    set when it started, ``position`` when it waits)."""
    from dml.config import RunConfig, validate

    for c in configs:   # fail here, in the app, with the config error, not in the subprocess
        validate(RunConfig.from_dict(c))
    queue = queue if queue is not None else job_queue()
    root = Path(root).resolve()
    d = jobs_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    path = d / f"{job_id}.json"
    log = d / f"{job_id}.log"
    now = time.time()
    job = {"id": job_id, "title": title, "state": "queued", "root": str(root),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "started_ts": now, "queued_ts": now,
           "runs": [{"name": c.get("name") or f"{c['data']['name']} {c['loss']['name']} "
                     f"{c['mixing']['name']} s{c['train']['seed']}", "config": c, "run_dir": None,
                     "error": None} for c in configs],
           "current": 0, "progress": {}, "phase": "training", "notes": notes or [],
           "precompute": precompute, "log": str(log), "host": socket.gethostname(),
           "queued_by": owner_token(), "python": python or sys.executable}
    atomic_write_json(path, job)
    queue.submit(path)
    return read_job(path, queue) or dict(job, path=str(path))


def cancel_job(path: str | os.PathLike, queue: "JobQueue | None" = None) -> bool:
    """Cancel a job that waits in the queue: it leaves the queue, its file says "cancelled",
    and it never starts. False when it is not waiting (started already, or not queued here)."""
    queue = queue if queue is not None else job_queue()
    return queue.cancel(path)


# --------------------------------------------------------------------------- the job queue

MAX_JOBS_ENV = "DML_MAX_JOBS"          # jobs that run at once
JOB_THREADS_ENV = "DML_JOB_THREADS"    # threads per job
DEFAULT_JOB_THREADS = 4     # per job, for the default number of jobs on more than 4 cores
SMALL_MACHINE_CORES = 4     # up to this many cores given: one job at a time
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "NUMBA_NUM_THREADS")
ACTIVE_STATES = ("queued", "running")


def _positive_int(env: Any, name: str, warnings: list[str]) -> int | None:
    raw = env.get(name)
    if raw is None or not str(raw).strip():
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if value < 1:
        warnings.append(f"{name}={raw!r} is not a whole number >= 1; ignored")
        return None
    return value


def job_limits(cores: int | None = None, max_jobs: int | None = None,
               env: Any = None) -> dict[str, Any]:
    """How many jobs run at once and with how many threads each, on ``cores`` cores (default:
    the cores given to this process): ``max_jobs`` (the app's setting) if given, else
    $DML_MAX_JOBS, else cores // $DML_JOB_THREADS when that is set, else 1 on <= 4 cores and
    cores // 4 on more. Threads per job: $DML_JOB_THREADS if set, else cores // jobs (>= 1).
    Returns {"max_jobs", "threads", "cores", "source", "warnings"}."""
    env = os.environ if env is None else env
    cores = int(cores or cores_given())
    warnings: list[str] = []
    env_jobs = _positive_int(env, MAX_JOBS_ENV, warnings)
    env_threads = _positive_int(env, JOB_THREADS_ENV, warnings)
    if max_jobs:
        n, source = int(max_jobs), "set in the app"
    elif env_jobs:
        n, source = env_jobs, f"${MAX_JOBS_ENV}"
    elif env_threads:
        n, source = max(1, cores // env_threads), f"cores // ${JOB_THREADS_ENV}"
    elif cores <= SMALL_MACHINE_CORES:
        n, source = 1, f"default: {cores} core(s) given, one job at a time"
    else:
        n, source = cores // DEFAULT_JOB_THREADS, f"default: {cores} cores // {DEFAULT_JOB_THREADS}"
    n = max(1, n)
    threads = env_threads or max(1, cores // n)
    return {"max_jobs": n, "threads": threads, "cores": cores, "source": source,
            "warnings": warnings}


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux /proc; None elsewhere): tells a live process
    from a later one that got the same pid."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def owner_token() -> dict[str, Any]:
    """This process (the app server whose queue holds a queued job)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid)}


def _job_process_alive(job: dict[str, Any]) -> bool:
    """Whether the job's process runs: its pid is alive and, where its start time was
    recorded, is still the same process (not a later one that got the pid)."""
    if not process_alive(job.get("host"), job.get("pid")):
        return False
    if job.get("host") not in (None, socket.gethostname()) or not job.get("pid_start"):
        return True
    now = _proc_start(job["pid"])
    return now is None or now == job["pid_start"]


def _owner_alive(owner: Any) -> bool:
    if not isinstance(owner, dict) or not owner.get("pid"):
        return False                 # a queued file nobody holds: it can never start
    if not process_alive(owner.get("host"), owner.get("pid")):
        return False
    if owner.get("host") not in (None, socket.gethostname()) or not owner.get("start"):
        return True
    now = _proc_start(owner["pid"])
    return now is None or now == owner["start"]


class JobQueue:
    """The app server's job queue: at most ``limits()["max_jobs"]`` job processes at once
    (counting the running jobs of every runs root this queue has launched into, also those
    started before a server restart); the others wait in submission order and a background
    thread starts them as slots free. Each started job gets ``train.threads`` = the queue's
    thread count in every configuration that does not set it.

    ``max_jobs`` overrides the environment's setting; ``cores`` the cores given to this process
    (tests); ``command`` the job process's command before the job file (default
    ``python -m app.jobs run``)."""

    def __init__(self, max_jobs: int | None = None, cores: int | None = None,
                 command: list[str] | None = None, poll_s: float = 0.5):
        self.max_jobs = max_jobs
        self.cores = int(cores or cores_given())
        self.command = list(command) if command else None
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._waiting: list[Path] = []
        self._children: dict[Path, subprocess.Popen] = {}
        self._dirs: set[Path] = set()
        self._ended: set[Path] = set()    # job files known to be in a final state
        self._thread: threading.Thread | None = None

    # ---- settings and views
    def limits(self) -> dict[str, Any]:
        return job_limits(self.cores, self.max_jobs)

    def set_max_jobs(self, n: int | None) -> None:
        """Change the number of jobs at once (None: back to the environment / default)."""
        with self._lock:
            self.max_jobs = int(n) if n else None
            self.pump()
            self._ensure_thread()

    def position(self, path: str | os.PathLike) -> int | None:
        """1-based place of a waiting job; None when it does not wait in this queue."""
        p = Path(path).resolve()
        with self._lock:
            return self._waiting.index(p) + 1 if p in self._waiting else None

    def waiting(self) -> list[Path]:
        with self._lock:
            return list(self._waiting)

    def running(self) -> list[Path]:
        """Job files of the job processes that run now: this queue's children and every other
        live job under the runs roots it has launched into."""
        with self._lock:
            active: set[Path] = set()
            for path, proc in list(self._children.items()):
                code = proc.poll()        # also reaps it: a zombie would look alive
                if code is None:
                    job = read_job(path, self)
                    if job is None or job.get("state") in ACTIVE_STATES:
                        active.add(path)  # (done, just exiting: its slot is free)
                    continue
                del self._children[path]
                self._ended.add(path)
                self._after_exit(path, code)
            for d in self._dirs:
                for p in d.glob("*.json"):
                    if p in active or p in self._ended or p in self._waiting:
                        continue
                    job = read_job(p, self)
                    if job is None:
                        continue
                    state = job.get("state")
                    if state == "running" or (state == "queued" and job.get("pid")):
                        active.add(p)     # started by another process, or before a restart
                    elif state not in ACTIVE_STATES:
                        self._ended.add(p)
            return sorted(active)

    # ---- changes
    def submit(self, path: str | os.PathLike) -> None:
        """Queue a job file (state "queued"); start it now if a slot is free."""
        p = Path(path).resolve()
        with self._lock:
            self._dirs.add(p.parent)
            if p not in self._waiting:
                self._waiting.append(p)
            self.pump()
            self._ensure_thread()

    def cancel(self, path: str | os.PathLike) -> bool:
        p = Path(path).resolve()
        with self._lock:
            if p not in self._waiting:
                return False
            self._waiting.remove(p)
            self._ended.add(p)
            try:
                _update(p, state="cancelled", cancelled_ts=time.time())
            except (OSError, ValueError):
                pass
        self._wake.set()
        return True

    def pump(self) -> list[Path]:
        """Start waiting jobs, oldest first, while fewer than max_jobs run. Returns those."""
        started: list[Path] = []
        with self._lock:
            if not self._waiting:
                self.running()            # reap ended children all the same
                return started
            lim = self.limits()
            busy = len(self.running())
            while self._waiting and busy < lim["max_jobs"]:
                path = self._waiting.pop(0)
                try:
                    if self._launch(path, lim):
                        started.append(path)
                        busy += 1
                except Exception as exc:     # job file gone, or the process cannot start
                    self._ended.add(path)
                    try:
                        _update(path, state="failed",
                                error=f"the job could not start: {type(exc).__name__}: {exc}")
                    except (OSError, ValueError):
                        pass
        return started

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no job waits (all started or cancelled); False on timeout."""
        t0 = time.time()
        while self.waiting():
            if timeout is not None and time.time() - t0 > timeout:
                return False
            self._wake.set()
            time.sleep(self.poll_s)
        return True

    # ---- internals
    def _launch(self, path: Path, lim: dict[str, Any]) -> bool:
        job = read_json(path)
        if job.get("state") != "queued" or job.get("pid"):
            return False                  # cancelled or started by someone else meanwhile
        threads = int(lim["threads"])
        explicit = []
        for spec in job.get("runs", []):
            train_cfg = spec.setdefault("config", {}).setdefault("train", {})
            if train_cfg.get("threads") is None:
                train_cfg["threads"] = threads
                spec["threads_auto"] = True
            else:
                explicit.append(int(train_cfg["threads"]))
        job_threads = threads if len(explicit) < len(job.get("runs", [])) or not explicit \
            else max(explicit)
        job.update(state="running", threads=job_threads, max_jobs=lim["max_jobs"],
                   cores=lim["cores"], launched_ts=time.time(), queued_by=owner_token())
        atomic_write_json(path, job)      # the configurations say their threads before it runs
        env = env_with_checkout()
        env.setdefault("PYTHONUNBUFFERED", "1")
        for var in THREAD_ENV_VARS:       # the job's maps (numba, BLAS) keep to its share too
            env[var] = str(job_threads)
        env["NUMBA_NUM_THREADS"] = str(max(1, min(job_threads, os.cpu_count() or 1)))
        cmd = (self.command or [job.get("python") or sys.executable, "-m", "app.jobs", "run"]) \
            + [str(path)]
        with open(job.get("log") or path.with_suffix(".log"), "ab") as fh:
            proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._children[path] = proc
        _update(path, pid=proc.pid, pid_start=_proc_start(proc.pid))
        return True

    def _after_exit(self, path: Path, code: int) -> None:
        """A job process ended: if its file still says it runs, it died without saying so."""
        try:
            job = read_json(path)
        except (OSError, ValueError):
            return
        if job.get("state") in ACTIVE_STATES:
            _update(path, state="interrupted", finished_ts=time.time(),
                    error=job.get("error") or f"the job process ended (exit code {code}) "
                                              f"before it finished; see {job.get('log')}")

    def _ensure_thread(self) -> None:
        """(Under the lock.) The thread that starts waiting jobs and reaps ended ones."""
        if (self._waiting or self._children) and \
                (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._loop, name="dml-job-queue", daemon=True)
            self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            with self._lock:
                try:
                    self.pump()
                except Exception:         # never let the thread die with jobs waiting
                    traceback.print_exc()
                if not self._waiting and not self._children:
                    self._thread = None
                    return


_QUEUE: JobQueue | None = None
_QUEUE_LOCK = threading.Lock()


def job_queue() -> JobQueue:
    """This process's job queue (the app server's: shared by every session and page)."""
    global _QUEUE
    with _QUEUE_LOCK:
        if _QUEUE is None:
            _QUEUE = JobQueue()
        return _QUEUE


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
    job = _update(path, state="running", pid=os.getpid(), host=socket.gethostname(),
                  pid_start=_proc_start(os.getpid()))
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
            if p.get("step") == p.get("steps") and p.get("steps") and \
                    cfg.train.map_mode == "inline":
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
        job_queue().drain()   # a queued job lives in this process: stay until it has started
        return 0
    print("usage: python -m app.jobs run JOBFILE | demo RUNS_ROOT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
