"""Time to first map in the embedding explorer, in a real browser, at 10k, 50k and 100k points.

    python benchmarks/bench_app_map.py                          # 10k, 50k, 100k real points
    python benchmarks/bench_app_map.py --sizes 100000 --repeat 3 --no-scratch
    python benchmarks/bench_app_map.py --run data/runs/<id> --repeat 3

For each size it builds a finished run in a temporary folder (through dml.runs.RunWriter, the
trainer's writer): ``n`` real points (60% train / 40% test, 100 classes, ``--dim``-dimensional
float16 embeddings clustered by class on the unit sphere, as the trainer stores them) and 2,048
synthetic ones (Metrix-style mixes of a 64-image probe batch), so 12k / 52k / 102k points in all.
Its maps are then precomputed as the trainer leaves them (``dml.projection``: UMAP fitted on at
most 10,000 points, the rest placed with ``transform``; the seconds per 10k points placed are
reported). Measured in one Chromium tab, from navigation until the map is drawn (WebGL canvas,
and the density image where the map has one), after the tab has been idle for a second; the tab
leaves the app before each server stops, so that it cannot reconnect to the next one and warm it:

* first_visit_new_browser_profile (first size only): a browser with empty caches;
* warm: the page loaded again on the same server (--repeat times);
* cold_fresh_server: a freshly started server process (maps cached on disk), the browser
  having seen the app before;
* cold_fresh_server_sidebar_click (first size only): on a fresh server, the Runs page shown,
  a second later a click on "Embedding explorer";
* baseline_minimal_app_warm: a bare Streamlit script drawing one Scattergl of as many points
  (what drawing every point exactly costs this machine and browser);
* scratch_{pca,umap}_fresh_server: a fresh server with no cached map: computed on the spot
  (UMAP in the app's worker process, which loads numba's compiled code from its disk cache).

Where the time goes, for the fresh-server visits: the explorer script's own steps (the server
runs with ``DML_MAP_TIMINGS=1``: point table, figure, chart sent), the size of the largest
websocket message (the map) and the browser's drawing after it arrived.

Without Chromium / Playwright it falls back to timing the explorer page's first script run with
AppTest in a fresh process (server side only). The numbers are printed (Markdown, or --json);
nothing is written except into the temporary folder. This machine's CPUs may be shared: run it
on an otherwise idle machine, and read single numbers with care.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
SIZES = (10_000, 50_000, 100_000)
SYNTHETIC = 2048
# the map is drawn: Plotly has drawn its WebGL canvas, and the density image where it has one
MAP_DRAWN = """() => {
  const g = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
  if (!(g && g._fullData && g._fullData.length && g.querySelector('canvas'))) return false;
  const imgs = (g.layout && g.layout.images) || [];
  return !imgs.length || !!g.querySelector('.imagelayer image, .layer-below image');
}"""


def make_bench_run(root: Path, n: int = 10_000, dim: int = 64, classes: int = 100,
                   synthetic: int = SYNTHETIC, seed: int = 0, run_id: str | None = None) -> Path:
    """A finished run directory (written through dml.runs.RunWriter, the trainer's writer) whose
    best evaluation holds ``n`` real points (60% train / 40% test, clustered by class on the unit
    sphere, float16 as the trainer saves them) and ``synthetic`` Metrix-style mixes of
    probe-batch pairs. The run id is ``bench-10k`` for 10,000 points, etc."""
    from dml.config import RunConfig
    from dml.runs import RunWriter

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def clustered(y):   # in chunks: 100k x 512 at once would take 400 MB of float64
        out = np.empty((len(y), dim), np.float16)
        for s in range(0, len(y), 16_384):
            part = y[s:s + 16_384]
            noise = rng.standard_normal((len(part), dim), dtype=np.float32)
            out[s:s + 16_384] = unit(centres[part] + 0.6 * noise)
        return out

    n_train = int(n * 0.6)
    ytr = rng.integers(0, classes // 2, n_train)
    yte = rng.integers(classes // 2, classes, n - n_train)
    tr, te = clustered(ytr), clustered(yte)
    probe = rng.choice(n_train, 64, replace=False)
    parents = rng.integers(0, 64, (synthetic, 2))
    lam = rng.beta(2, 2, synthetic)
    a = tr[probe[parents[:, 0]]].astype(np.float32)
    b = tr[probe[parents[:, 1]]].astype(np.float32)
    syn = unit(lam[:, None] * a + (1 - lam[:, None]) * b)
    rid = run_id or (f"bench-{n // 1000}k" if n % 1000 == 0 else f"bench-{n}")
    cfg = RunConfig().with_overrides([f"name={rid}", "mixing.name=none"]).to_dict()
    w = RunWriter.create(root, cfg, run_id=rid)
    w.save_eval(1, train_embeddings=tr, train_labels=ytr, test_embeddings=te, test_labels=yte,
                synthetic_embeddings=syn.astype(np.float32),
                synthetic_parents=parents, synthetic_weight=lam.astype(np.float32),
                synthetic_kind=np.array(["metrix-embed"] * synthetic),
                synthetic_top_classes=np.stack([ytr[probe[parents[:, 0]]],
                                                ytr[probe[parents[:, 1]]]], 1),
                synthetic_membership=np.zeros((synthetic, 2), np.float32),
                synthetic_hardest=np.zeros(synthetic, bool), probe_index=probe,
                probe_labels=ytr[probe])
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
    """`python -m dml.launch` in a new process (its own session, stopped by its pid), with
    DML_MAP_TIMINGS=1 so that the explorer prints what its steps cost (:meth:`timings`)."""

    def __init__(self, root: Path, warmup: bool, port: int | None = None,
                 script: Path | None = None):
        self.port = port or _free_port()
        env = dict(os.environ, DML_MAP_TIMINGS="1")
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

    def timings(self) -> dict | None:
        """The explorer's step times of its last completed script run (seconds from the
        script's start), or None."""
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode(errors="replace").splitlines()
                 if ln.startswith("explorer timings ")]
        return json.loads(lines[-1][len("explorer timings "):]) if lines else None

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


class Frames:
    """Sizes and arrival times of the websocket messages a page receives."""

    def __init__(self, page):
        self.frames: list[tuple[float, int]] = []
        page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda payload: self.frames.append((time.perf_counter(),
                                                                 len(payload)))))

    def largest_since(self, t0: float) -> tuple[float, int] | None:
        after = [f for f in self.frames if f[0] >= t0]
        return max(after, key=lambda f: f[1]) if after else None


def time_to_map(page, url: str, timeout_ms: float = 900_000, settle_s: float = 0.0,
                frames: Frames | None = None, detail: dict | None = None) -> float:
    """Seconds from navigation to the drawn map, after ``settle_s`` seconds of letting the page
    finish what it was doing (a user does not reload the instant a map appears). With
    ``frames``, ``detail`` receives the largest message's size (MB) and the seconds from its
    arrival to the drawn map."""
    if settle_s:
        page.wait_for_timeout(settle_s * 1000)
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function(MAP_DRAWN, timeout=timeout_ms, polling=50)
    t1 = time.perf_counter()
    if frames is not None and detail is not None:
        big = frames.largest_since(t0)
        if big:
            detail.update(payload_mb=round(big[1] / 1e6, 2),
                          draw_after_payload_s=round(t1 - big[0], 3))
    return t1 - t0


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


def precompute(run: Path) -> dict:
    """Both maps, as the trainer leaves them; what UMAP cost (fit, transform per 10k points)."""
    from dml.projection import load_projection, precompute_projections

    t = time.perf_counter()
    precompute_projections(run, "best+last", ("pca", "umap"))
    out = {"precompute_s": round(time.perf_counter() - t, 2)}
    meta = (load_projection(run, 1, "umap") or {}).get("meta", {})
    for k in ("fit_points", "fit_s", "transform_points", "transform_s", "transform_s_per_10k"):
        if meta.get(k) is not None:
            out[f"umap_{k}"] = meta[k]
    pca = (load_projection(run, 1, "pca") or {}).get("meta", {})
    if pca.get("seconds") is not None:
        out["pca_s"] = pca["seconds"]
    return out


def count_points(run: Path) -> int:
    """Real and synthetic points of a run's best evaluation."""
    from dml.projection import best_epoch
    from dml.runs import Run

    r = Run(run)
    with np.load(r.eval_path(best_epoch(r)), allow_pickle=False) as z:
        return sum(len(z[k]) for k in z.files
                   if k.endswith("_labels") and k != "probe_labels") \
            + (len(z["synthetic_parents"]) if "synthetic_parents" in z.files else 0)


def _median(xs):
    return round(float(np.median(xs)), 3) if xs else None


def bench_browser(run: Path, repeat: int, scratch: bool, page, port: int,
                  first: bool = False) -> dict:
    """One run's numbers, in the given Chromium page; servers are restarted on the same port so
    the browser's cache of Streamlit's static files stays valid."""
    from dml.projection import projection_path

    root, rid = run.parent, run.name
    url = lambda m: f"/explorer?run={rid}&method={m}"  # noqa: E731
    out: dict = {"points": None, **precompute(run)}
    frames = Frames(page)

    srv = Server(root, warmup=True, port=port)
    try:
        t = round(time_to_map(page, srv.url + url("umap")), 3)
        if first:
            out["first_visit_new_browser_profile"] = t
        out["warm"] = [round(time_to_map(page, srv.url + url("umap"), settle_s=SETTLE_S), 3)
                       for _ in range(max(2, repeat))]
        out["points"] = page.evaluate(
            "() => document.querySelector('.js-plotly-plot')._fullData"
            ".reduce((n, t) => n + ((t.x && t.x.length > 2) ? t.x.length : 0), 0)")
        out["rendering"] = page.evaluate(
            "() => (document.querySelector('.js-plotly-plot').layout.meta || {}).rendering")
        leave(page)
    finally:
        srv.stop()
    out["cold_fresh_server"], out["server_start_s"], details, steps = [], [], [], []
    for _ in range(repeat):
        srv = Server(root, warmup=True, port=port)
        try:
            out["server_start_s"].append(round(srv.start_s, 2))
            d: dict = {}
            out["cold_fresh_server"].append(
                round(time_to_map(page, srv.url + url("umap"), settle_s=SETTLE_S,
                                  frames=frames, detail=d), 3))
            details.append(d)
            steps.append(srv.timings() or {})
            leave(page)
        finally:
            srv.stop()
    for k in ("payload_mb", "draw_after_payload_s"):
        out[k] = _median([d[k] for d in details if k in d])
    for k in ("point table", "figure", "chart sent"):
        out[f"script_{k.replace(' ', '_')}_s"] = _median([s[k] for s in steps if k in s])
    if first:   # a user on the Runs page of a fresh server clicks "Embedding explorer"
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
    # what drawing every point exactly costs: a minimal Streamlit app, one chart of as many
    script = run.parent / "baseline_app.py"
    out["points_in_run"] = count_points(run)
    script.write_text(BASELINE_APP.format(n=out["points_in_run"]))
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
            projection_path(run, 1, method).unlink(missing_ok=True)
        for method in ("pca", "umap"):
            srv = Server(root, warmup=False, port=port)
            try:
                out[f"scratch_{method}_fresh_server"] = round(
                    time_to_map(page, srv.url + url(method), settle_s=SETTLE_S), 3)
                leave(page)
            finally:
                srv.stop()
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
    out = precompute(run)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    cold, warm = map(float, res.stdout.split()[-2:])
    out.update(cold_script_s=cold, warm_script_s=warm)
    return out


LABELS = {
    "first_visit_new_browser_profile": "first visit, browser with empty caches",
    "warm": "page loaded again, same server",
    "cold_fresh_server": "**fresh server, explorer URL opened (maps cached)**",
    "cold_fresh_server_sidebar_click": "fresh server, Runs page, click on the explorer",
    "baseline_minimal_app_warm": "for scale: bare Streamlit page, one Scattergl of every point",
    "scratch_pca_fresh_server": "fresh server, no cached map: PCA computed on the spot",
    "scratch_umap_fresh_server": "fresh server, no cached map: UMAP computed on the spot",
    "server_start_s": "(server start: launch to health check)",
    "cold_script_s": "explorer script, first run in a fresh process",
    "warm_script_s": "explorer script, run again",
}
COSTS = {
    "script_point_table_s": "explorer script: point table ready (s from its start)",
    "script_figure_s": "explorer script: figure built",
    "script_chart_sent_s": "explorer script: chart handed to Streamlit",
    "payload_mb": "largest websocket message (the map), MB",
    "draw_after_payload_s": "browser: from that message to the drawn map (s)",
    "precompute_s": "precomputing both maps, as the trainer does (s)",
    "pca_s": "PCA (s)",
    "umap_fit_s": "UMAP fit (s)",
    "umap_fit_points": "UMAP fitted on (points)",
    "umap_transform_s_per_10k": "UMAP transform, s per 10k points placed",
    "umap_transform_points": "UMAP points placed with transform",
}


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        spread = f" ({min(v):.2f}–{max(v):.2f})" if len(v) > 1 else ""
        return f"{float(np.median(v)):.2f}" + spread
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def report(results: dict[str, dict], command: str) -> str:
    """All sizes as one markdown table (seconds: median, with min–max over the repeats)."""
    names = list(results)
    mode = next(iter(results.values())).get("mode", "")
    lines = ["Time to first map in the embedding explorer "
             f"({mode}): seconds from navigation (or click) until the map is drawn; median "
             "(min–max) over the repeats.", "",
             "| what | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label, key):
        if any(key in r for r in results.values()):
            lines.append(f"| {label} | " + " | ".join(_cell(results[n].get(key)) for n in names)
                         + " |")

    row("points in the run", "points_in_run")
    row("markers drawn (the rest: density image)", "points")
    row("rendering", "rendering")
    for key, label in LABELS.items():
        row(label, key)
    lines += ["", "What it costs:", "", "| what | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for key, label in COSTS.items():
        row(label, key)
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="an existing finished run (instead of the generated ones)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="real points of each generated run (each also has 2,048 synthetic)")
    ap.add_argument("--points", type=int, help="one generated run of this many real points")
    ap.add_argument("--dim", type=int, default=512, help="embedding dimension of the runs")
    ap.add_argument("--repeat", type=int, default=2, help="fresh servers per size")
    ap.add_argument("--no-scratch", action="store_true", help="skip compute-from-scratch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_app_map.py",
                          *(sys.argv[1:] if argv is None else argv)])

    tmp = Path(tempfile.mkdtemp(prefix="tango-bench-"))
    try:
        if args.run:
            src = Path(args.run).resolve()
            runs = [tmp / src.name]
            shutil.copytree(src, runs[0])   # the scratch step deletes cached maps: use a copy
        else:
            sizes = [args.points] if args.points else [int(v) for v in args.sizes.split(",")]
            runs = []
        results: dict[str, dict] = {}
        use_browser = browser_available()
        mode = ("headless Chromium, software WebGL" if use_browser
                else "apptest (no chromium: server-side script time only)")
        if use_browser:
            from playwright.sync_api import sync_playwright

            pw = sync_playwright().start()
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            port = _free_port()
        try:
            todo = runs if args.run else sizes
            for i, item in enumerate(todo):
                if args.run:
                    run = item
                else:   # one run at a time, deleted after (100k x 512: 100 MB)
                    run = make_bench_run(tmp / f"r{item}", n=item, dim=args.dim)
                name = (f"{run.name}" if args.run else
                        f"{(item + SYNTHETIC) / 1000:.0f}k ({item:,} real)")
                print(f"{name}: measuring…", file=sys.stderr, flush=True)
                res = (bench_browser(run, args.repeat, not args.no_scratch, page, port,
                                     first=i == 0) if use_browser else bench_apptest(run))
                res["mode"] = mode
                results[name] = res
                if not args.run:
                    shutil.rmtree(run.parent, ignore_errors=True)
        finally:
            if use_browser:
                browser.close()
                pw.stop()
        print(json.dumps(results, indent=2) if args.json else report(results, command))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
