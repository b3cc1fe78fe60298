"""Every page of the app under ``streamlit.testing.v1.AppTest``, against real runs made by the
trainer (``app_runs``), with assertions on what each page shows: tables, metrics, chart data."""
# ruff: noqa: F811  (the app_runs fixture is imported, then requested by name)

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app import common, jobs, selection, tables  # noqa: E402
from dml.projection import best_epoch, load_projection  # noqa: E402
from dml.runs import Run  # noqa: E402
from tests.test_app_fixtures import FAILED_ERROR, TINY, app_runs  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "app" / "main.py"
TIMEOUT = 120


# --------------------------------------------------------------------------- helpers

def open_app(root, monkeypatch, page: str | None = None, query: dict | None = None) -> AppTest:
    monkeypatch.setenv("DML_RUNS", str(root))
    monkeypatch.setenv("DML_NO_WARMUP", "1")
    at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def decode(a):
    """A plotly JSON array (plain list or plotly 6's base64 typed array) -> numpy."""
    if isinstance(a, dict) and "bdata" in a:
        arr = np.frombuffer(base64.b64decode(a["bdata"]), dtype=np.dtype(a["dtype"]))
        shape = a.get("shape")
        if isinstance(shape, str):
            shape = [int(v) for v in shape.split(",")]
        return arr.reshape(shape) if shape else arr
    return np.asarray(a if a is not None else [])


def point_ids(trace: dict) -> np.ndarray:
    """Point ids of a map trace (customdata, or its first column)."""
    cd = decode(trace["customdata"])
    return (cd[:, 0] if cd.ndim == 2 else cd).astype(int)


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly specs by chart key."""
    out = {}
    for c in at.get("plotly_chart"):
        out[c.key or c.proto.id] = json.loads(c.proto.spec)
    return out


def traces(spec: dict) -> dict[str, dict]:
    return {t.get("name"): t for t in spec["data"]}


def frame(at: AppTest, column: str):
    """The first table shown that has ``column``."""
    for d in at.dataframe:
        v = d.value
        if column in v.columns:
            return v
    raise AssertionError(f"no table with a {column!r} column among "
                         f"{[list(d.value.columns) for d in at.dataframe]}")


def assert_tables_show_missing_as_a_dash(at: AppTest) -> None:
    """Every table of the page draws a missing value as the em dash, never as "None"."""
    assert at.dataframe, "no table on the page"
    for d in at.dataframe:
        assert d.proto.placeholder == tables.MISSING == "—", d.proto.id
        for col in d.value.columns:
            if d.value[col].dtype == object:
                assert not d.value[col].isin(["None", "nan"]).any(), col


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def wait_for_jobs(root: Path, timeout: float = 240) -> list[dict]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        js = jobs.list_jobs(root)
        if js and all(j["state"] not in ("queued", "running") for j in js):
            return js
        time.sleep(0.5)
    raise AssertionError(f"jobs under {root} did not finish in {timeout}s: {jobs.list_jobs(root)}")


def run_by_mixing(manifest: dict, mixing: str, seed: int = 0) -> dict | None:
    return next((r for r in manifest["runs"] if r["mixing"] == mixing and r["seed"] == seed),
                None)


# --------------------------------------------------------------------------- runs

def test_runs_page_table_errors_and_form(app_runs, monkeypatch):
    at = open_app(app_runs["root"], monkeypatch)
    assert [t.value for t in at.title] == ["Runs"]
    df = frame(at, "run")
    assert set(df["run"]) == {r["id"] for r in app_runs["runs"]} | {app_runs["failed"]}
    for r in app_runs["runs"]:
        s = Run(r["path"]).summary()
        row = df[df["run"] == r["id"]].iloc[0]
        assert (row["dataset"], row["loss"], row["mixing"], row["seed"]) == \
            ("digits", r["loss"], r["mixing"], r["seed"])
        assert row["status"] == "finished" and row["progress"] == 1.0
        assert row["best epoch"] == s["best_epoch"]
        assert row["test R@1"] == pytest.approx(s["test"]["recall@1"])
        assert row["val MAP@R"] == pytest.approx(s["val"]["map@r"])
        assert row["time (s)"] == pytest.approx(s["elapsed_s"])
    assert df[df["run"] == app_runs["failed"]].iloc[0]["status"] == "failed"
    failed = df[df["run"] == app_runs["failed"]].iloc[0]       # no metrics: drawn as "—"
    assert math.isnan(failed["test R@1"]) and math.isnan(failed["best epoch"])
    assert_tables_show_missing_as_a_dash(at)
    assert any(FAILED_ERROR in e for e in errors(at))          # the failed run's error
    assert any("FloatingPointError" in c.value for c in at.code)   # and its traceback

    # the launch form lists the registries, and only strategies that support the loss
    from dml.data import list_datasets
    from dml.losses import list_losses
    from dml.mixing import supported_pairs
    assert at.selectbox(key="new-dataset").options == list_datasets()
    assert at.selectbox(key="new-loss").options == list_losses()
    for loss in ("contrastive", "proxy-anchor"):
        at.selectbox(key="new-loss").select(loss)
        rerun(at)
        opts = at.selectbox(key="new-mixing").options
        assert opts[0] == "none"
        assert set(opts) == {m for m, l in supported_pairs() if l == loss}
    # one input per loss hyperparameter, at the paper default
    from dml.losses import loss_defaults
    at.selectbox(key="new-loss").select("contrastive")
    rerun(at)
    for name, default in loss_defaults("contrastive").items():
        widget = at.text_input if isinstance(default, str) else at.number_input
        assert widget(key=f"lp-contrastive-{name}").value == default


def test_tables_fill_in_the_dash_on_a_streamlit_without_placeholder(app_runs, monkeypatch):
    monkeypatch.setattr(common, "_GRID_PLACEHOLDER", False)
    at = open_app(app_runs["root"], monkeypatch)
    df = frame(at, "run")
    failed = df[df["run"] == app_runs["failed"]].iloc[0]
    assert failed["test R@1"] == failed["best epoch"] == "—"
    assert not df.isin(["None", "nan"]).any().any()
    done = df[df["run"] == app_runs["runs"][0]["id"]].iloc[0]
    assert float(done["test R@1"]) == pytest.approx(
        Run(app_runs["runs"][0]["path"]).summary()["test"]["recall@1"])


def test_runs_page_launches_a_run_with_progress(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("DML_PRECOMPUTE", "pca")
    at = open_app(root, monkeypatch)
    at.text_input(key="new-name").input("from-the-form")
    at.number_input(key="new-epochs").set_value(1)
    at.text_area(key="new-extra").input("\n".join(TINY))
    at.button(key="launch").click()
    rerun(at)
    assert not errors(at), errors(at)
    js = wait_for_jobs(root)
    assert js[0]["state"] == "finished", js[0]
    rerun(at)
    df = frame(at, "run")
    assert list(df["name"]) == ["from-the-form"] and list(df["status"]) == ["finished"]
    assert df["test R@1"].iloc[0] > 0
    run = Run(js[0]["runs"][0]["run_dir"])
    assert run.config()["train"]["iterations_per_epoch"] == 5
    bars = [p for p in at.sidebar.get("progress")]
    assert bars and "done" in bars[0].proto.text


def test_running_runs_and_jobs_show_live_progress(app_runs, monkeypatch, tmp_path):
    from dml.atomic import atomic_write_json
    from dml.runs import RunWriter

    root = tmp_path / "runs"
    shutil.copytree(app_runs["runs"][0]["path"], root / "still-training")
    RunWriter(Run(root / "still-training")).set_status(   # pid: this (alive) process
        "running", progress={"epoch": 1, "epochs": 4, "step": 5, "steps": 20})
    atomic_write_json(root / ".jobs" / "j1.json", {
        "id": "j1", "title": "from the form", "state": "running", "pid": os.getpid(),
        "started_ts": time.time(), "current": 0, "phase": "training",
        "progress": {"epoch": 1, "epochs": 4, "step": 5, "steps": 20},
        "runs": [{"name": "n", "run_dir": str(root / "still-training")}]})
    at = open_app(root, monkeypatch)
    row = frame(at, "run").iloc[0]
    assert row["status"] == "running: epoch 1/4 (25%)" and row["progress"] == 0.25
    assert any("1 training, refreshing every 3 s" in c.value for c in at.caption)
    bars = [p.proto.text for p in at.sidebar.get("progress")]
    assert bars == ["from the form: run 1/1 n - epoch 1/4, step 5/20"]


def test_launch_form_rejects_a_bad_setting(tmp_path, monkeypatch):
    at = open_app(tmp_path / "runs", monkeypatch)
    at.text_area(key="new-extra").input("train.nonsense=3")
    at.button(key="launch").click()
    rerun(at)
    assert any("Cannot launch" in e and "nonsense" in e for e in errors(at))
    assert not jobs.list_jobs(tmp_path / "runs")


def test_first_start_offers_the_demo_set(tmp_path, monkeypatch):
    root = tmp_path / "empty"
    monkeypatch.setenv("DML_PRECOMPUTE", "pca")
    monkeypatch.setattr(jobs, "DEMO_OVERRIDES", ["data.name=digits", "train.seed=0"] + TINY)
    at = open_app(root, monkeypatch)
    assert any("No runs under" in i.value for i in at.info)
    expected, notes = jobs.demo_configs()
    assert [c["mixing"]["name"] for c in expected][0] == "none"
    at.button(key="demo-button").click()
    rerun(at)
    js = wait_for_jobs(root)
    assert js[0]["title"] == "demo set" and js[0]["state"] == "finished", js[0]
    rerun(at)
    df = frame(at, "run")
    assert sorted(df["mixing"]) == sorted(c["mixing"]["name"] for c in expected)
    assert set(df["status"]) == {"finished"}
    # every page now has something real to show
    at.switch_page("views/explorer.py").run()
    assert not at.exception and at.get("plotly_chart")


@pytest.mark.parametrize("page", ["compare", "explorer", "utilization", "playground",
                                  "failures"])
def test_every_page_offers_the_demo_set_when_there_are_no_runs(page, tmp_path, monkeypatch):
    at = open_app(tmp_path / "nothing", monkeypatch, page)
    assert any("No runs under" in i.value for i in at.info)
    assert any(b.label == "Train the demo set" for b in at.button)


# --------------------------------------------------------------------------- compare

def test_compare_page_curves_and_grouped_table(app_runs, monkeypatch):
    at = open_app(app_runs["root"], monkeypatch, "compare")
    ids = [r["id"] for r in app_runs["runs"]]
    assert set(at.multiselect(key="cmp-runs").value) == set(ids)   # the failed run has no curves
    specs = charts(at)
    for key in ("test.recall@1", "test.map@r", "utilization", "train.loss"):
        tr = specs[f"cmp-curve-{key}"]["data"]
        assert len(tr) == len(ids)
        got = sorted(tuple(np.round(decode(t["y"]), 6)) for t in tr)
        want = sorted(tuple(np.round(tables.metric_series(Run(r["path"]).metrics(), key)[1], 6))
                      for r in app_runs["runs"])
        assert got == want

    # legends: the run's name, which already says its seed, so the seed shows once
    names = sorted(t["name"] for t in specs["cmp-curve-test.recall@1"]["data"])
    assert names == sorted(f"t-{r['mixing']}-s{r['seed']}" for r in app_runs["runs"])
    assert_tables_show_missing_as_a_dash(at)

    df = frame(at, "configuration")
    by_mix = {}
    for r in app_runs["runs"]:
        best = Run(r["path"]).status()["best"]
        by_mix.setdefault(r["mixing"], []).append(best["test"]["recall@1"])
    assert len(df) == len(by_mix)
    col = "test Recall@1"
    for mixing, vals in by_mix.items():
        row = df[df["configuration"].str.contains(f"/ {mixing}")].iloc[0]
        if len(vals) > 1:
            assert row[col] == f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"
            assert row["seeds"] == "0, 1"
        else:
            assert row[col] == f"{vals[0]:.4f}"
    base = by_mix["none"]
    assert df[df["configuration"].str.contains("/ none")].iloc[0][f"{col}: vs baseline"] == \
        "baseline"
    if "metrix-embed" in by_mix:         # significant = the paired interval excludes 0
        from dml.stats import paired_interval, significant

        m, b = by_mix["metrix-embed"], base
        _, lo, hi = paired_interval(m, b)
        row = df[df["configuration"].str.contains("/ metrix-embed")].iloc[0]
        assert row[f"{col}: vs baseline"] == ("significant" if significant(lo, hi)
                                              else "not significant")
    if "embedding-expansion" in by_mix:   # multi-similarity has no baseline run here
        row = df[df["configuration"].str.contains("/ embedding-expansion")].iloc[0]
        assert row[f"{col}: vs baseline"] == "no baseline"
        assert row[tables.delta_label("test.recall@1")] == "no baseline"
    assert_paired_deltas(df, app_runs["runs"])


def assert_paired_deltas(df, runs) -> None:
    """The final table's paired differences of each mixing configuration to its baseline equal
    dml.stats.paired_interval over the seeds, from each run's status (its best test metrics)."""
    from dml.stats import paired_interval as paired_ci

    best = {}   # (loss, mixing) -> {seed: [test metrics of its runs]}
    for r in runs:
        test = Run(r["path"]).status()["best"]["test"]
        best.setdefault((r["loss"], r["mixing"]), {}).setdefault(r["seed"], []).append(test)
    checked = 0
    for (loss, mixing), per_seed in best.items():
        base = best.get((loss, "none"))
        if mixing == "none" or not base:
            continue
        row = df[df["configuration"].str.contains(f"/ {loss} / {mixing}")]
        assert len(row) == 1, (loss, mixing, list(df["configuration"]))
        seeds = sorted(set(per_seed) & set(base))
        assert len(seeds) >= 2
        for metric, label in (("recall@1", "ΔR@1"), ("map@r", "ΔMAP@R")):
            a = [float(np.mean([t[metric] for t in per_seed[s]])) for s in seeds]
            b = [float(np.mean([t[metric] for t in base[s]])) for s in seeds]
            mean, lo, hi = paired_ci(a, b)
            star = " *" if lo > 0 or hi < 0 else ""
            cell = row.iloc[0][f"{label} vs baseline [95% CI], paired by seed"]
            assert cell == f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}", (mixing, metric)
            checked += 1
    assert checked >= 2   # contrastive + metrix-embed against contrastive + none, two metrics
    base_rows = df[df["configuration"].str.contains("/ none")]
    assert set(base_rows["ΔR@1 vs baseline [95% CI], paired by seed"]) == {"baseline"}


def test_compare_page_selects_a_whole_grid(app_runs, monkeypatch, tmp_path):
    # a grid larger than the default selection: every fixture run three more times (same seeds)
    root = tmp_path / "grid"
    for r in app_runs["runs"]:
        for k in range(4):
            shutil.copytree(r["path"], root / f"{r['id']}-copy{k}")
    at = open_app(root, monkeypatch, "compare")
    n = len(app_runs["runs"]) * 4
    assert n > 12
    assert len(at.multiselect(key="cmp-runs").value) == 12
    button = at.button(key="cmp-all")
    assert button.label == f"Select all {n} runs" and not button.disabled
    button.click()
    rerun(at)
    assert sorted(at.multiselect(key="cmp-runs").value) == sorted(p.name for p in root.iterdir())
    assert at.button(key="cmp-all").disabled
    # a whole grid: one curve per configuration, the mean over its seeds with a ± sd band
    assert at.radio(key="cmp-per").value == "configuration"
    traces = charts(at)["cmp-curve-test.recall@1"]["data"]
    lines = [t for t in traces if not t["name"].endswith(" band")]
    per_config = {}
    for r in app_runs["runs"]:
        for k in range(4):
            xs, ys = tables.metric_series(Run(root / f"{r['id']}-copy{k}").metrics(),
                                          "test.recall@1")
            per_config.setdefault((r["loss"], r["mixing"]), []).append(ys)
    assert len(lines) == len(per_config)
    for (loss, mixing), curves in per_config.items():
        (line,) = [t for t in lines if f"/ {loss} / {mixing}" in t["name"]]
        assert line["name"].endswith(f"· {len(curves)} seed(s)")
        np.testing.assert_allclose(decode(line["y"]), np.mean(curves, axis=0), rtol=1e-9)
        (band,) = [t for t in traces if t["name"] == line["name"] + " band"]
        sd = np.std(curves, axis=0, ddof=1)
        np.testing.assert_allclose(decode(band["y"]),
                                   np.r_[np.mean(curves, 0) + sd, (np.mean(curves, 0) - sd)[::-1]],
                                   rtol=1e-9, atol=1e-12)
    at.radio(key="cmp-per").set_value("run")
    rerun(at)
    assert len(charts(at)["cmp-curve-test.recall@1"]["data"]) == n
    df = frame(at, "configuration")
    runs = [{**r, "path": str(root / f"{r['id']}-copy{k}")} for r in app_runs["runs"]
            for k in range(4)]
    assert_paired_deltas(df, runs)
    assert set(df["seeds"]) <= {"0, 1", "0"}
    # a selection the user trimmed stays trimmed
    at.multiselect(key="cmp-runs").set_value(sorted(at.multiselect(key="cmp-runs").value)[:3])
    rerun(at)
    assert len(at.multiselect(key="cmp-runs").value) == 3


# --------------------------------------------------------------------------- explorer

def _explorer(app_runs, monkeypatch, run_id):
    return open_app(app_runs["root"], monkeypatch, "explorer", query={"run": run_id})


def _map(at):
    key, spec = next((k, s) for k, s in charts(at).items() if k.startswith("map-"))
    return key, spec


def test_explorer_shows_the_cached_umap_map(app_runs, monkeypatch):
    rid = app_runs["umap_run"]
    run = Run(Path(app_runs["root"]) / rid)
    epoch = best_epoch(run)

    loads = []

    def no_loading(cfg):
        loads.append(cfg)
        raise RuntimeError("the first map must not wait for the data set")

    # a fresh server: no data set loaded yet; the map must not load one for the class names
    monkeypatch.setattr(common, "_CLASS_NAMES", {})
    monkeypatch.setattr(common, "run_dataset", no_loading)
    at = _explorer(app_runs, monkeypatch, rid)
    assert not loads
    assert at.radio(key=f"ex-method-{rid}").value == "umap"
    key, spec = _map(at)
    # ...yet the legend names the classes at once, from the run's classes.json (trainer-written)
    names = run.class_names()
    assert names and any(str(v) != str(c) for c, v in names.items())
    chips = {t["name"] for t in spec["data"] if t.get("legendgroup") == "classes"}
    assert chips and any(chip.endswith(")") for chip in chips)
    assert {f"class {selection.class_label(c, names)}" for c in names} >= chips
    ev = run.load_eval(epoch)
    proj = load_projection(run.path, epoch, "umap")
    tr = traces(spec)
    data_traces = [t for t in spec["data"] if len(decode(t["x"])) > 1]
    assert {t["name"] for t in data_traces} == {"train", "test", "synthetic"}
    assert all(t["type"] == "scattergl" for t in data_traces)      # WebGL for the points
    assert len(decode(tr["train"]["x"])) == len(ev["train_embeddings"])
    assert len(decode(tr["test"]["x"])) == len(ev["test_embeddings"])
    assert "val" not in tr                                      # default: train and test
    np.testing.assert_allclose(decode(tr["train"]["x"]), np.round(proj["train"][:, 0], 4),
                               atol=1e-3)
    syn = tr["synthetic"]
    assert len(decode(syn["x"])) == len(ev["synthetic_embeddings"])
    assert syn["marker"]["symbol"] == "x-thin-open"
    assert "λ=" in syn["text"][0] and "×" in syn["text"][0]
    metrics = {m.label: m.value for m in at.metric}
    rec = next(r for r in run.metrics() if r["epoch"] == epoch)
    assert metrics["test Recall@1"] == f"{rec['test']['recall@1']:.3f}"
    assert metrics["points shown"] == f"{len(decode(tr['train']['x'])) + len(decode(tr['test']['x'])) + len(decode(syn['x'])):,}"


def test_explorer_selection_shows_thumbnails_and_neighbours(app_runs, monkeypatch):
    rid = app_runs["umap_run"]
    at = _explorer(app_runs, monkeypatch, rid)
    key, spec = _map(at)
    tr = traces(spec)
    picked = [int(i) for i in point_ids(tr["test"])[:3]] + \
             [int(i) for i in point_ids(tr["synthetic"])[:2]]
    at.session_state[key] = {"selection": {
        "points": [{"customdata": i, "curve_number": 0, "point_index": 0} for i in picked],
        "point_indices": [0], "box": [], "lasso": []}}
    rerun(at)
    assert any(s.value == f"{len(picked)} selected point(s)" for s in at.subheader)
    imgs = at.get("image")
    assert imgs, "no thumbnails"
    test_grid, syn_grid = imgs[0], imgs[1]          # one grid per split of the selection
    assert len(test_grid.value) == 3 and len(syn_grid.value) == 2
    assert all(c.startswith("#") and "class" in c for c in test_grid.captions)
    assert all("×" in c and "λ=" in c for c in syn_grid.captions)
    assert any(m.value.startswith("**synthetic** (2)") for m in at.markdown)
    # nearest neighbours: one query row per selected point with k training images each
    k = at.slider(key="ex-k").value
    neighbour_caps = [c for im in imgs[2:] for c in im.captions]
    assert sum(c.startswith("query: ") for c in neighbour_caps) == len(picked)
    assert sum("d=" in c for c in neighbour_caps) == len(picked) * k

    # the thumbnails loaded the data set; from then on the map's legend chips and the class
    # picker give the data set's class names too (the fixture's split relabels: id 2 is digit 4)
    run = Run(Path(app_runs["root"]) / rid)
    names = common.class_names(run.config(), load=False)
    assert names and any(str(v) != str(c) for c, v in names.items())
    rerun(at)
    _, spec = _map(at)
    epoch = best_epoch(run)
    pt = selection.build_point_table(run.load_eval(epoch),
                                     load_projection(run.path, epoch, "umap"))
    shown = sorted({int(c) for c in pt.label[np.isin(pt.split, ["train", "test"])]})
    chips = {t["name"] for t in spec["data"] if t.get("legendgroup") == "classes"}
    assert chips == {f"class {selection.class_label(c, names)}" for c in shown}
    assert any(f"({names[c]})" in chip for c in shown for chip in chips)
    picker = at.multiselect(key=f"ex-classes-{rid}-{epoch}")
    assert picker.options == [selection.class_label(c, names)
                              for c in sorted({int(c) for c in pt.label[pt.real]})]


def test_explorer_box_selection_and_class_isolation(app_runs, monkeypatch):
    rid = app_runs["umap_run"]
    at = _explorer(app_runs, monkeypatch, rid)
    key, spec = _map(at)
    tr = traces(spec)
    x, y = decode(tr["train"]["x"]), decode(tr["train"]["y"])
    box = {"x": [float(np.quantile(x, 0.2)), float(np.quantile(x, 0.6))],
           "y": [float(y.min()), float(y.max())]}
    at.session_state[key] = {"selection": {"points": [], "point_indices": [], "box": [box],
                                           "lasso": []}}
    rerun(at)
    run = Run(Path(app_runs["root"]) / rid)
    epoch = best_epoch(run)
    pt = selection.build_point_table(run.load_eval(epoch), load_projection(run.path, epoch,
                                                                           "umap"))
    vis = selection.visible_mask(pt, ["train", "test"], None, True)
    inside = selection.ids_from_shapes({"selection": {"box": [box]}}, pt, vis)
    assert len(inside) > 0
    assert any(s.value == f"{len(inside)} selected point(s)" for s in at.subheader)

    # isolate two classes: only their points and the synthetic points between them remain
    classes = sorted({int(c) for c in pt.label[pt.split == "train"]})[:2]
    at2 = _explorer(app_runs, monkeypatch, rid)
    at2.multiselect(key=f"ex-classes-{rid}-{epoch}").set_value(classes)
    rerun(at2)
    _, spec2 = _map(at2)
    tr2 = traces(spec2)
    shown = np.concatenate([point_ids(tr2[n]) for n in ("train", "test", "synthetic")
                            if n in tr2])
    assert set(pt.label[shown[pt.real[shown]]]) <= set(classes)
    syn = shown[~pt.real[shown]]
    assert np.isin(pt.parents[syn], classes).all()
    assert len(shown) == int(selection.visible_mask(pt, ["train", "test"], classes, True).sum())


def test_explorer_pca_and_compute_fallback(app_runs, monkeypatch, tmp_path):
    # a copy of a run without a cached UMAP map: PCA first, then the UMAP computed on request
    src = next(r for r in app_runs["runs"] if r["id"] != app_runs["umap_run"])
    root = tmp_path / "runs"
    shutil.copytree(src["path"], root / src["id"])
    run = Run(root / src["id"])
    epoch = best_epoch(run)
    at = open_app(root, monkeypatch, "explorer")
    assert any("not cached" in i.value for i in at.info)
    _, spec = _map(at)
    pca = load_projection(run.path, epoch, "pca")
    np.testing.assert_allclose(decode(traces(spec)["train"]["y"]), np.round(pca["train"][:, 1], 4),
                               atol=1e-3)
    at.button(key="ex-compute").click()
    rerun(at)
    proj = load_projection(run.path, epoch, "umap")
    assert proj is not None, "UMAP map was not cached in the run directory"
    assert at.radio(key=f"ex-method-{src['id']}").value == "umap"
    _, spec = _map(at)
    np.testing.assert_allclose(decode(traces(spec)["test"]["x"]), np.round(proj["test"][:, 0], 4),
                               atol=1e-3)


# --------------------------------------------------------------------------- utilization

def test_utilization_page(app_runs, monkeypatch):
    at = open_app(app_runs["root"], monkeypatch, "utilization")
    chosen = at.multiselect(key="util-runs").value
    assert len(chosen) == len(app_runs["runs"])
    curves = charts(at)["util-curves"]["data"]
    solid = [t for t in curves if not (t.get("line") or {}).get("dash")]
    dashed = [t for t in curves if (t.get("line") or {}).get("dash") == "dash"]
    assert len(solid) == len(chosen)
    with_syn = [r for r in app_runs["runs"] if r["mixing"] != "none"]
    assert len(dashed) == len(with_syn)
    want = sorted(tuple(np.round(tables.metric_series(Run(r["path"]).metrics(),
                                                      "utilization")[1], 8))
                  for r in app_runs["runs"])
    assert sorted(tuple(np.round(decode(t["y"]), 8)) for t in solid) == want
    table = frame(at, "with mixed points")
    last = {Run(r["path"]).metrics()[-1]["utilization"] for r in app_runs["runs"]}
    assert set(np.round(table["utilization"], 10)) == set(np.round(list(last), 10))
    hist = charts(at)["util-hist"]["data"]
    assert len(hist) == len(chosen) + len(with_syn)
    stats = frame(at, "mean (= utilization)")
    # the mean of the per-query distances is the utilization of that evaluation
    for r in app_runs["runs"]:
        run = Run(r["path"])
        rec = next(m for m in run.metrics() if m["epoch"] == best_epoch(run))
        row = stats[(stats["points"] == "train")].reset_index()
        assert np.isclose(row["mean (= utilization)"], rec["utilization"], rtol=1e-4).any()
    assert_tables_show_missing_as_a_dash(at)
    # a run without mixing has no "with mixed points" value: a missing cell, drawn as "—"
    baseline = Run(run_by_mixing(app_runs, "none")["path"])
    row = table[table["run"] == common.run_label(baseline)].iloc[0]
    assert math.isnan(row["with mixed points"])
    at.toggle(key="util-mixed").set_value(False)
    rerun(at)
    assert len(charts(at)["util-hist"]["data"]) == len(chosen)


# --------------------------------------------------------------------------- playground

def test_playground_page(app_runs, monkeypatch):
    from dml.losses import list_losses

    rid = app_runs["umap_run"]
    at = open_app(app_runs["root"], monkeypatch, "playground", query={"run": rid})
    at.slider(key="pg-lam").set_value(1.0)
    rerun(at)
    m = {x.label: x.value for x in at.metric}
    for lvl in ("input", "feature", "embedding"):   # lambda = 1 is image 1 itself
        assert m[f"{lvl}-level mix: cosine to image 1"] == "1.000"
    at.slider(key="pg-lam").set_value(0.3)
    rerun(at)
    specs = charts(at)
    label = specs["pg-label"]["data"][0]
    assert np.allclose(sorted(decode(label["y"])), [0.3, 0.7])
    tr = traces(specs["pg-map"])
    for lvl in ("input", "feature", "embedding"):
        assert len(decode(tr[f"{lvl}-level mix"]["x"])) == 21   # lambda = 0, 0.05, ..., 1
    assert len(decode(tr["the pair"]["x"])) == 2
    assert len(decode(tr["Embedding Expansion (n=2)"]["x"])) == 4   # pair + 2 expansion points
    # the map's classes carry the data set's names (the fixture's split: id 2 is the digit 4)
    from app.images import load_run_dataset
    names = load_run_dataset(Run(Path(app_runs["root"]) / rid).config()).class_names
    chips = [n for n, t in tr.items() if t.get("legendgroup") == "classes"]
    assert chips and all(n == f"class {selection.class_label(int(n.split()[1]), names)}"
                         for n in chips)
    assert "class 2 (4)" in chips
    terms = specs["pg-terms"]
    titles = [a["text"] for a in terms["layout"]["annotations"]]
    assert titles == list_losses()
    # contrastive: the positive term is weighted by lambda, so it vanishes at lambda = 0
    cons = [t for t in terms["data"] if t.get("xaxis") in (None, "x") and t["name"] == "pos"]
    assert cons and decode(cons[0]["y"])[0] == pytest.approx(0.0, abs=1e-7)
    assert decode(cons[0]["x"])[0] == 0.0


# --------------------------------------------------------------------------- inspector

def test_inspector_run_checkpoint_and_embedding(app_runs, monkeypatch):
    from dml.models import parameter_counts
    from dml.checkpoints import load_checkpoint

    rid = app_runs["runs"][0]["id"]
    at = open_app(app_runs["root"], monkeypatch, "inspector", query={"run": rid})
    run = Run(Path(app_runs["root"]) / rid)
    model, info = load_checkpoint(run.checkpoint_path("best"))
    m = {x.label: x.value for x in at.metric}
    assert m["parameters"] == f"{parameter_counts(model)['total']:,}"
    assert m["epoch"] == str(info["epoch"]) and m["embedding dim"] == "16"
    params = frame(at, "part")
    assert dict(zip(params["part"], params["parameters"])) == parameter_counts(model)
    assert len(frame(at, "shape")) == model.num_stages + 1
    assert any("EmbeddingNet" in c.value for c in at.code)
    met = frame(at, "split")
    assert met[met["split"] == "test"]["recall@1"].iloc[0] == \
        pytest.approx(info["best"]["test"]["recall@1"])
    assert_tables_show_missing_as_a_dash(at)
    at.selectbox(key="ck-split").select("train")
    at.button(key="ck-embed").click()
    rerun(at)
    m = {x.label: x.value for x in at.metric}
    assert "recall@1" in m and "map@r" in m
    # the map names the data set's classes (the fixture's training ids 0, 1, 2: digits 0, 1, 4)
    chips = {t["name"] for t in charts(at)["ck-map"]["data"] if t.get("legendgroup") == "classes"}
    assert {"class 0", "class 1", "class 2 (4)"} == chips


def _upload(at, files):
    at.radio(key="ck-source").set_value("upload files")
    rerun(at)
    at.get("file_uploader")[0].set_value(files)
    rerun(at)
    return at


def test_inspector_refuses_pickles_and_corrupt_files(app_runs, monkeypatch, tmp_path):
    import pickle

    at = open_app(app_runs["root"], monkeypatch, "inspector")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _upload(at, [("model.pt", pickle.dumps({"w": Evil()}, protocol=2), "application/octet-stream")])
    assert any(e.startswith("Refused") and "pickle" in e for e in errors(at)), errors(at)
    assert not marker.exists(), "a pickle was executed"

    run = Run(Path(app_runs["root"]) / app_runs["runs"][0]["id"])
    weights = bytearray(run.checkpoint_path("best").read_bytes())
    side = (run.path / "checkpoints" / "best.json").read_bytes()
    weights[-5] ^= 0xFF
    at = open_app(app_runs["root"], monkeypatch, "inspector")
    _upload(at, [("best.safetensors", bytes(weights), "application/octet-stream"),
                 ("best.json", side, "application/json")])
    assert any(e.startswith("Refused") and "checksum" in e for e in errors(at)), errors(at)

    at = open_app(app_runs["root"], monkeypatch, "inspector")
    _upload(at, [("w.safetensors", run.checkpoint_path("best").read_bytes(),
                  "application/octet-stream")])
    assert any(e.startswith("Refused") and "side file" in e for e in errors(at)), errors(at)

    at = open_app(app_runs["root"], monkeypatch, "inspector")
    _upload(at, [("best.safetensors", run.checkpoint_path("best").read_bytes(),
                  "application/octet-stream"), ("best.json", side, "application/json")])
    assert not errors(at)
    assert {x.label for x in at.metric} >= {"parameters", "epoch"}
    assert not math.isnan(float(next(x.value for x in at.metric if x.label == "epoch")))


def test_a_server_listening_on_every_interface_without_asking_says_so(app_runs, monkeypatch):
    """`streamlit run app/main.py` from another folder reads no config: no server.address, so
    every interface; the sidebar says so (`dml app` and the repository's config set localhost)."""
    at = open_app(app_runs["root"], monkeypatch)
    assert not any("every network interface" in w.value for w in at.sidebar.warning)
    import streamlit

    real = streamlit.get_option
    monkeypatch.setattr(streamlit, "get_option",
                        lambda key: None if key == "server.address" else real(key))
    at = open_app(app_runs["root"], monkeypatch)
    assert any("every network interface" in w.value for w in at.sidebar.warning)
