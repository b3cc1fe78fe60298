"""Time to first map in the embedding explorer, in a real browser, on a run with ~10,000 points.

    python benchmarks/bench_app_map.py                 # builds a 10,000-point run in a temp dir
    python benchmarks/bench_app_map.py --run data/runs/<id> --repeat 3

The run has 10,000 real points (6,000 train, 4,000 test, 100 classes) and 2,048 synthetic ones.
Measured in one Chromium tab, each from navigation until the WebGL map is drawn, after the tab
has been idle for a second (a user does not reload the instant a map appears); the tab leaves
the app before each server stops, so that it cannot reconnect to the next one and warm it:

* first_visit_new_browser_profile: a browser with empty caches (its own start-up dominates);
* warm: the page loaded again on the same server (--repeat times, at least 3);
* cold_fresh_server: a freshly started server process (projections cached on disk, as the
  trainer leaves them), the browser having seen the app before;
* cold_fresh_server_sidebar_click: on a fresh server, the Runs page shown, a second later a
  click on "Embedding explorer";
* baseline_minimal_app_warm: a bare Streamlit script drawing one Scattergl of as many points
  (the floor this machine and browser set);
* scratch_{pca,umap}_fresh_server: a fresh server with no cached projection: computed on the
  spot (the first UMAP in a process also compiles numba code).

Without Chromium / Playwright it falls back to timing the explorer page's first script run with
AppTest in a fresh process (server side only). The numbers are printed, nothing is written except
into the temporary run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = os.environ.get("DML_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SETTLE_S = 1.0     # idle time before each timed visit (see time_to_map)
MAP_DRAWN = """() => {
  const g = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
  return !!(g && g._fullData && g._fullData.length && g.querySelector('canvas'));
}"""


def make_bench_run(root: Path, n: int = 10_000, dim: int = 64, classes: int = 100,
                   synthetic: int = 2048, seed: int = 0) -> Path:
    """A finished run directory (written through dml.runs.RunWriter, the trainer's writer) whose
    best evaluation holds ``n`` real points (60% train / 40% test, clustered by class on the unit
    sphere) and ``synthetic`` Metrix-style mixes of probe-batch pairs."""
    from dml.config import RunConfig
    from dml.runs import RunWriter

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n_train = int(n * 0.6)
    ytr = rng.integers(0, classes // 2, n_train)
    yte = rng.integers(classes // 2, classes, n - n_train)
    tr = unit(centres[ytr] + 0.6 * rng.standard_normal((n_train, dim)))
    te = unit(centres[yte] + 0.6 * rng.standard_normal((n - n_train, dim)))
    probe = rng.choice(n_train, 64, replace=False)
    parents = rng.integers(0, 64, (synthetic, 2))
    lam = rng.beta(2, 2, synthetic)
    syn = unit(lam[:, None] * tr[probe[parents[:, 0]]] + (1 - lam[:, None]) * tr[probe[parents[:, 1]]])
    cfg = RunConfig().with_overrides(["name=bench-10k", "mixing.name=none"]).to_dict()
    w = RunWriter.create(root, cfg, run_id="bench-10k")
    w.save_eval(1, train_embeddings=tr.astype(np.float16), train_labels=ytr,
                test_embeddings=te.astype(np.float16), test_labels=yte,
                synthetic_embeddings=syn.astype(np.float32),
                synthetic_parents=parents, synthetic_weight=lam.astype(np.float32),
                synthetic_kind=np.array(["metrix-embed"] * synthetic),
                synthetic_top_classes=np.stack([ytr[probe[parents[:, 0]]],
                                                ytr[probe[parents[:, 1]]]], 1),
                synthetic_membership=np.zeros((synthetic, 2), np.float32),
                synthetic_hardest=np.zeros(synthetic, bool), probe_index=probe)
    rec = {"epoch": 1, "test": {"recall@1": 0.5, "map@r": 0.2}, "utilization": 0.1,
           "utilization_mixed": 0.09}
    w.append_metrics(rec)
    w.set_status("finished", progress={"epoch": 1, "epochs": 1},
                 best={"epoch": 1, "test": rec["test"], "val": {}, "utilization": 0.1})
    return w.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dml.launch` in a new process (its own session, stopped by its pid)."""

    def __init__(self, root: Path, warmup: bool, port: int | None = None,
                 script: Path | None = None):
        self.port = port or _free_port()
        env = dict(os.environ)
        if not warmup:
            env["DML_NO_WARMUP"] = "1"
        self.log = tempfile.TemporaryFile()
        if script is None:
            cmd = [sys.executable, "-m", "dml.launch", "--runs-dir", str(root), "--port",
                   str(self.port), "--address", "127.0.0.1"]
        else:   # a plain streamlit script (the baseline)
            cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port",
                   str(self.port), "--server.address", "127.0.0.1", "--server.headless", "true",
                   "--browser.gatherUsageStats", "false"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if urllib.request.urlopen(self.url + "/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > 120:
                self.log.seek(0)
                raise RuntimeError("server did not start:\n" + self.log.read().decode()[-3000:])
            time.sleep(0.05)
        self.start_s = time.perf_counter() - t0

    def stop(self):
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)


BASELINE_APP = """
import numpy as np, plotly.graph_objects as go, streamlit as st
x = np.random.default_rng(0).random((2, {n})).astype(np.float32)
st.title("baseline")
st.plotly_chart(go.Figure(go.Scattergl(x=x[0], y=x[1], mode="markers")), key="m")
"""


def time_to_map(page, url: str, timeout_ms: float = 600_000, settle_s: float = 0.0) -> float:
    """Seconds from navigation to the drawn WebGL map, after ``settle_s`` seconds of letting the
    page finish what it was doing (a user does not reload the instant a map appears)."""
    if settle_s:
        page.wait_for_timeout(settle_s * 1000)
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function(MAP_DRAWN, timeout=timeout_ms, polling=50)
    return time.perf_counter() - t0


def leave(page) -> None:
    """Close the app in the tab before its server stops: an open tab would reconnect to the next
    server on the same port and warm it up before the timed visit."""
    page.goto("about:blank")


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM)


def bench_browser(run: Path, repeat: int, scratch: bool) -> dict:
    """All in one Chromium page, the way a user keeps a tab open; servers are restarted on the
    same port so the browser's cache of Streamlit's static files stays valid."""
    from playwright.sync_api import sync_playwright

    from dml.projection import precompute_projections, projection_path

    root, rid = run.parent, run.name
    url = lambda m: f"/explorer?run={rid}&method={m}"  # noqa: E731
    out: dict = {"points": None}
    t = time.perf_counter()
    precompute_projections(run, "best+last", ("pca", "umap"))
    out["precompute_s"] = round(time.perf_counter() - t, 2)
    port = _free_port()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        srv = Server(root, warmup=True, port=port)
        try:
            out["first_visit_new_browser_profile"] = round(time_to_map(page, srv.url + url("umap")), 3)
            out["warm"] = [round(time_to_map(page, srv.url + url("umap"), settle_s=SETTLE_S), 3)
                           for _ in range(max(3, repeat))]
            out["points"] = page.evaluate(
                "() => document.querySelector('.js-plotly-plot')._fullData"
                ".reduce((n, t) => n + ((t.x && t.x.length > 1) ? t.x.length : 0), 0)")
            leave(page)
        finally:
            srv.stop()
        out["cold_fresh_server"], out["server_start_s"] = [], []
        for _ in range(repeat):
            srv = Server(root, warmup=True, port=port)
            try:
                out["server_start_s"].append(round(srv.start_s, 2))
                out["cold_fresh_server"].append(
                    round(time_to_map(page, srv.url + url("umap"), settle_s=SETTLE_S), 3))
                leave(page)
            finally:
                srv.stop()
        # a user on the Runs page of a fresh server clicks "Embedding explorer" in the sidebar
        out["cold_fresh_server_sidebar_click"] = []
        for _ in range(repeat):
            srv = Server(root, warmup=True, port=port)
            try:
                page.goto(srv.url + "/")
                page.get_by_role("heading", name="Runs", exact=True).wait_for(timeout=120_000)
                page.wait_for_timeout(SETTLE_S * 1000)
                t0 = time.perf_counter()
                page.get_by_role("link", name="Embedding explorer").click()
                page.wait_for_function(MAP_DRAWN, timeout=120_000, polling=50)
                out["cold_fresh_server_sidebar_click"].append(round(time.perf_counter() - t0, 3))
                leave(page)
            finally:
                srv.stop()
        # the same measurement on a minimal Streamlit app drawing one chart of as many points
        script = run.parent / "baseline_app.py"
        script.write_text(BASELINE_APP.format(n=out["points"] or 10_000))
        srv = Server(root, warmup=False, port=port, script=script)
        try:
            time_to_map(page, srv.url + "/")
            out["baseline_minimal_app_warm"] = round(time_to_map(page, srv.url + "/",
                                                                 settle_s=SETTLE_S), 3)
            leave(page)
        finally:
            srv.stop()
        if scratch:
            for method in ("pca", "umap"):
                for e in (1,):
                    projection_path(run, e, method).unlink(missing_ok=True)
            for method in ("pca", "umap"):
                srv = Server(root, warmup=False, port=port)
                try:
                    out[f"scratch_{method}_fresh_server"] = round(
                        time_to_map(page, srv.url + url(method)), 3)
                    leave(page)
                finally:
                    srv.stop()
        browser.close()
    return out


def bench_apptest(run: Path) -> dict:
    """Server-side only: the explorer's first script run in a fresh Python process."""
    code = f"""
import os, time, sys
sys.path.insert(0, {str(REPO)!r})
os.environ["DML_RUNS"] = {str(run.parent)!r}; os.environ["DML_NO_WARMUP"] = "1"
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(REPO / 'app' / 'main.py')!r}, default_timeout=600)
at.query_params["run"] = {run.name!r}
at.run(); at.switch_page("views/explorer.py").run()
assert at.get("plotly_chart"), [e.value for e in at.exception]
t1 = time.perf_counter()
at.run()
print(round(t1 - t0, 3), round(time.perf_counter() - t1, 3))
"""
    from dml.projection import precompute_projections
    precompute_projections(run, "best+last", ("pca", "umap"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    cold, warm = map(float, res.stdout.split()[-2:])
    return {"cold_script_s": cold, "warm_script_s": warm}


LABELS = {
    "first_visit_new_browser_profile": "first visit, browser with empty caches",
    "warm": "page loaded again, same server",
    "cold_fresh_server": "fresh server, explorer URL opened",
    "cold_fresh_server_sidebar_click": "fresh server, Runs page, click on the explorer",
    "baseline_minimal_app_warm": "floor: bare Streamlit page, one Scattergl of as many points",
    "scratch_pca_fresh_server": "fresh server, no cached map: PCA computed on the spot",
    "scratch_umap_fresh_server": "fresh server, no cached map: UMAP computed on the spot",
    "server_start_s": "(server start: launch to health check)",
    "precompute_s": "(precomputing both maps, as the trainer does)",
    "cold_script_s": "explorer script, first run in a fresh process",
    "warm_script_s": "explorer script, run again",
}


def report(res: dict, points: int) -> str:
    """The results as a markdown table (seconds: min / median / max over the repeats)."""
    n = res.get("points") or points
    lines = [f"Time to first map in the embedding explorer: {n:,} points drawn "
             f"({res['mode']}). Seconds from navigation (or click) until the WebGL map is "
             "drawn.", "", "| what | n | min | median | max |", "|---|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        if key in res:
            v = res[key] if isinstance(res[key], list) else [res[key]]
            lines.append(f"| {label} | {len(v)} | {min(v):.2f} | {float(np.median(v)):.2f} | "
                         f"{max(v):.2f} |")
    lines += ["", "Each run: " + "; ".join(f"{k} {res[k]}" for k in LABELS
                                          if isinstance(res.get(k), list))]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="an existing finished run (default: build a 10,000-point run)")
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=2, help="fresh servers for the cold number")
    ap.add_argument("--no-scratch", action="store_true", help="skip compute-from-scratch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = None
    if args.run:
        src = Path(args.run).resolve()
        tmp = Path(tempfile.mkdtemp(prefix="tango-bench-"))
        run = tmp / src.name
        shutil.copytree(src, run)          # the scratch step deletes cached maps: use a copy
    else:
        tmp = Path(tempfile.mkdtemp(prefix="tango-bench-"))
        run = make_bench_run(tmp, n=args.points)
    try:
        if browser_available():
            res = bench_browser(run, args.repeat, not args.no_scratch)
            mode = "headless Chromium, software WebGL"
        else:
            res = bench_apptest(run)
            mode = "apptest (no chromium: server-side script time only)"
        res["mode"] = mode
        print(json.dumps(res, indent=2) if args.json else report(res, args.points))
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
