"""Through time: the embedding space of a run at every evaluation, aligned into one frame, so
that the play button (or the epoch slider) shows the same points moving, with the synthetic
points of each evaluation in its frame; optionally a second run of the same data set side by
side (e.g. the baseline of the same seed), aligned onto the first. The maps are
``dml.alignment``'s, cached in each run; a run still training gains frames as its evaluations
land."""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import common, plots, tables
from app.selection import class_label
from dml import alignment as al
from dml.projection import umap_available
from dml.runs import Run

TWEENS = 4                # in-between frames per pair of evaluations (the points glide)
TWEEN_MS = 70             # duration of one animation frame
HOLD = 6                  # an evaluation's frame is held this many frames when playing
WATCH_S = 5               # a training run is checked for new evaluations this often
SYN_COLOR = "#303030"

st.title("Through time")
root, runs = common.evaluated_runs_or_offer("demo-timeline")

qp = st.query_params
by_id = {r.id: r for r in runs}


top = st.columns([3, 3, 2])
run = common.pick_run("Run", runs, key="tl-run", container=top[0])
partners = common.same_data_runs(run, runs)
labels = {r.id: common.run_label(r) for r in [run, *partners]}
want = qp.get("vs") if qp.get("vs") in {r.id for r in partners} else \
    common.default_partner(run, partners)
options = [""] + [r.id for r in partners]
vs_id = top[1].selectbox("Side by side with", options, index=options.index(want or ""),
                         key=f"tl-vs-{run.id}",
                         format_func=lambda i: labels.get(i, "— (one run)"),
                         help="A run of the same data set and split (e.g. the baseline of the "
                              "same seed), aligned onto the first so the two panels compare.")
partner = by_id.get(vs_id) if vs_id else None
shown_runs = [run] + ([partner] if partner else [])

splits = [s for s in al.available_splits(run)
          if all(s in al.available_splits(r) for r in shown_runs[1:])]
if not splits:
    st.error("These evaluations have no saved embeddings of a common split "
             "(train.save_embeddings was none).")
    st.stop()


def has_synthetic(r: Run) -> bool:
    """Whether the run's last evaluation holds synthetic points (a mixing run)."""
    epochs = r.eval_epochs()
    try:
        with np.load(r.eval_path(epochs[-1]), allow_pickle=False) as z:
            return "synthetic_embeddings" in z.files
    except (OSError, ValueError, IndexError):
        return False


syn_runs = any(has_synthetic(r) for r in shown_runs)
default_split = qp.get("split") if qp.get("split") in splits else \
    ("train" if syn_runs and "train" in splits else "test" if "test" in splits else splits[0])
split = top[2].radio("Points", splits, index=splits.index(default_split), horizontal=True,
                     key=f"tl-split-{run.id}",
                     help="The real points drawn at every evaluation. Synthetic points are made "
                          "from training images: next to the train split they sit between "
                          "their parents' classes; the test split holds unseen classes.")

ctl = st.columns([2, 2, 3])
cached_umap = all(al.get_timeline(r.path, split, "umap", compute=False) is not None
                  for r in shown_runs)
method_q = (qp.get("method") or "").lower()
default_method = method_q if method_q in al.METHODS else ("umap" if cached_umap else "pca")
method = ctl[0].radio("Projection", list(al.METHODS), format_func=str.upper, horizontal=True,
                      index=list(al.METHODS).index(default_method),
                      key=f"tl-method-{run.id}-{split}",
                      help="UMAP: each evaluation fitted from the previous frame's layout, "
                           "then aligned to it (Procrustes); synthetic points placed by "
                           "transform. PCA: instant, linear; aligned the same way.")
smooth = ctl[1].toggle("Glide between evaluations", value=True, key="tl-smooth",
                       help=f"{TWEENS} in-between frames per step when playing (interpolated "
                            "positions; the evaluations themselves are the slider's stops).")
show_syn = ctl[2].toggle("Synthetic points", value=True, key="tl-syn",
                         disabled=not syn_runs,
                         help="The points the mixing strategy makes from the fixed probe batch "
                              "at each evaluation, placed in that evaluation's map.")


# --------------------------------------------------------------------------- computing

@st.cache_resource(show_spinner=False)
def _jobs() -> dict:
    """(run path, split) -> running UMAP timeline process, shared by every session, so two
    sessions opening the same run start one process."""
    return {"lock": threading.Lock()}


def umap_job(r: Run, split: str) -> dict:
    jobs = _jobs()
    key = (str(r.path), split)
    with jobs["lock"]:
        job = jobs.get(key)
        if job is None or job["proc"].poll() is not None:
            log = tempfile.NamedTemporaryFile(prefix="tango-timeline-", suffix=".log",
                                              delete=False)
            proc = subprocess.Popen(
                [sys.executable, "-m", "dml.alignment", str(r.path), "--split", split,
                 "--method", "umap", "--nice", "10"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"})
            job = jobs[key] = {"proc": proc, "log": log.name, "started": time.time()}
            log.close()
    return job


def last_line(path: str) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip() and "Warning" not in ln and not ln.startswith(" ")]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def ensure_timeline(r: Run, split: str, method: str) -> al.Timeline:
    """The run's timeline, computed or extended first when needed: PCA here (instant), UMAP in
    a low-priority process of its own (``python -m dml.alignment``), with its progress."""
    tl = al.get_timeline(r.path, split, method, compute=False)
    if tl is not None:
        return tl
    if method == "pca":
        with st.spinner(f"Aligning the PCA maps of {r.id}…"):
            return al.get_timeline(r.path, split, method)
    if not umap_available():
        raise al.AlignmentError("UMAP maps need umap-learn: pip install -e '.[app]'")
    old = al.load_timeline(r.path, split, method)
    what = f"extending the UMAP timeline of {r.id} ({len(old)} frame(s) cached)" if old \
        is not None else f"computing the UMAP timeline of {r.id}"
    with st.status(f"{what[0].upper()}{what[1:]}: one fit per evaluation (the first UMAP of a "
                   "process also loads or compiles numba code)…", expanded=True) as status:
        job = umap_job(r, split)
        line = status.empty()
        while job["proc"].poll() is None:
            line.write(f"{last_line(job['log']) or 'starting'} · "
                       f"{time.time() - job['started']:.0f} s")
            time.sleep(0.3)
        if job["proc"].returncode != 0:
            status.update(label="The UMAP timeline failed", state="error")
            raise al.AlignmentError(last_line(job["log"]) or "the UMAP process failed")
        status.update(label=f"UMAP timeline of {r.id} cached in the run directory "
                            f"({time.time() - job['started']:.0f} s)",
                      state="complete", expanded=False)
    tl = al.load_timeline(r.path, split, method)
    if tl is None:
        raise al.AlignmentError("the UMAP process wrote no timeline")
    return tl


try:
    timelines = [ensure_timeline(r, split, method) for r in shown_runs]
    if partner is not None:
        timelines[1] = al.align_to(timelines[0], timelines[1])
except al.AlignmentError as exc:
    st.error(f"No timeline: {exc}")
    st.stop()

if method == "pca" and not cached_umap and umap_available():
    def want_umap():
        st.session_state[f"tl-method-{run.id}-{split}"] = "umap"

    st.button("Compute the UMAP timeline (cached in the run directory)", key="tl-compute",
              on_click=want_umap,
              help="Seconds per evaluation; runs in a separate low-priority process.")

# --------------------------------------------------------------------------- the figure

names = common.class_names(run.config(), load=False, run=run)


records = {r.id: {rec.get("epoch"): rec for rec in r.metrics()} for r in shown_runs}


def metric_at(r: Run, epoch: int) -> str:
    r1 = (records[r.id].get(epoch) or {}).get("test", {}).get("recall@1")
    return "" if r1 is None else f" · test R@1 {tables.value_text(r1, '{:.3f}')}"


def frame_for(tl: al.Timeline, epoch: int) -> int:
    """The frame a panel shows at ``epoch``: its latest evaluation up to then (else its first)."""
    le = np.flatnonzero(tl.epochs <= epoch)
    return int(le[-1]) if len(le) else 0


all_epochs = sorted(set().union(*(tl.epochs.tolist() for tl in timelines)))
n_panels = len(timelines)
gap = 0.04
width = (1 - gap * (n_panels - 1)) / n_panels
domains = [(i * (width + gap), i * (width + gap) + width) for i in range(n_panels)]
colors = plots.class_colors(np.concatenate([tl.label for tl in timelines]))
order = {c: i for i, c in enumerate(colors)}
scale = plots.discrete_colorscale(list(colors.values()))
(x0, x1), (y0, y1) = timelines[0].bounds()
for tl in timelines[1:]:
    (a0, a1), (b0, b1) = tl.bounds()
    x0, x1, y0, y1 = min(x0, a0), max(x1, a1), min(y0, b0), max(y1, b1)


def panel_traces(k: int, tl: al.Timeline, pos: int, nxt: int | None = None, t: float = 0.0,
                 full: bool = False) -> list:
    """The synthetic (beneath) and real traces of panel k at frame ``pos`` (moving towards
    frame ``nxt`` by ``t`` in an in-between frame). ``full``: with styles (the first draw);
    animation frames only carry what changes."""
    xy = tl.frames[pos] if nxt is None or t == 0 else \
        (1 - t) * tl.frames[pos] + t * tl.frames[nxt]
    syn_pos = pos if nxt is None or t < 0.5 else nxt
    syn = tl.synthetic(int(tl.epochs[syn_pos]))
    sxy = syn["xy"] if show_syn else np.zeros((0, 2), np.float32)
    xa, ya = ("x", "y") if k == 0 else (f"x{k + 1}", f"y{k + 1}")
    sdata = np.column_stack([syn["parent_class"], np.nan_to_num(syn["weight"], nan=-1)]) \
        if len(sxy) else np.zeros((0, 3))
    syn_trace = dict(x=sxy[:, 0], y=sxy[:, 1], customdata=sdata.astype(np.float32))
    real_trace = dict(x=np.asarray(xy[:, 0], np.float32), y=np.asarray(xy[:, 1], np.float32))
    if not full:
        return [go.Scattergl(**syn_trace), go.Scattergl(**real_trace)]
    kinds = sorted(set(tl.syn_kind.tolist()))
    syn_name = "synthetic" + (f" ({', '.join(kinds)})" if kinds else "")
    cidx = np.array([order.get(int(c), 0) for c in tl.label], np.int32)
    return [
        go.Scattergl(**syn_trace, xaxis=xa, yaxis=ya, mode="markers", name=syn_name,
                     legendgroup="synthetic", showlegend=k == 0 and show_syn and syn_runs,
                     hovertemplate="synthetic: classes %{customdata[0]} × %{customdata[1]}"
                                   ", λ=%{customdata[2]:.2f}<extra></extra>",
                     marker=dict(symbol="x", size=6,
                                 color=SYN_COLOR, opacity=0.35, line=dict(width=0))),
        go.Scattergl(**real_trace, xaxis=xa, yaxis=ya, mode="markers",
                     name=f"{split} points", legendgroup="real", showlegend=k == 0,
                     customdata=np.column_stack([tl.index, tl.label]).astype(np.int32),
                     hovertemplate=f"{split} #%{{customdata[0]}}: class %{{customdata[1]}}"
                                   "<extra></extra>",
                     marker=dict(size=5, opacity=0.8, color=cidx, colorscale=scale, cmin=-0.5,
                                 cmax=len(colors) - 0.5, showscale=False, line=dict(width=0))),
    ]


def titles(epoch: int) -> list[dict]:
    out = []
    for k, (r, tl) in enumerate(zip(shown_runs, timelines)):
        pos = frame_for(tl, epoch)
        e = int(tl.epochs[pos])
        late = "" if e == epoch else f" (its evaluation of epoch {e})"
        head = labels[r.id] if len(labels[r.id]) <= 80 else labels[r.id][:78] + "…"
        out.append(dict(text=f"<b>{head}</b><br>epoch {epoch}{late}{metric_at(r, e)}",
                        x=sum(domains[k]) / 2, y=1.0, xref="paper", yref="paper",
                        xanchor="center", yanchor="bottom", showarrow=False,
                        font=dict(size=13)))
    return out


def frame_data(i: int, t: float = 0.0, full: bool = False) -> list:
    """Traces of every panel at step ``i`` of ``all_epochs`` (``t``: towards step i + 1)."""
    out = []
    for k, tl in enumerate(timelines):
        a = frame_for(tl, all_epochs[i])
        b = frame_for(tl, all_epochs[i + 1]) if t and i + 1 < len(all_epochs) else None
        out += panel_traces(k, tl, a, None if b == a else b, t, full)
    return out


start = len(all_epochs) - 1 if run.status().get("state") == "running" else 0
fig = go.Figure(data=frame_data(start, full=True))
frames, play = [], []
for i, e in enumerate(all_epochs):
    frames.append(go.Frame(name=f"e{e}", data=frame_data(i), layout=dict(annotations=titles(e))))
    play += [f"e{e}"] * (HOLD if i + 1 < len(all_epochs) else 1)
    if smooth and i + 1 < len(all_epochs):
        for s in range(1, TWEENS + 1):
            name = f"e{e}-{s}"
            frames.append(go.Frame(name=name, data=frame_data(i, s / (TWEENS + 1)),
                                   layout=dict(annotations=titles(e))))
            play.append(name)
fig.frames = frames
step_args = dict(mode="immediate", frame=dict(duration=0, redraw=True),
                 transition=dict(duration=0))
axis = dict(showticklabels=False, zeroline=False, showgrid=False, title=None)
layout = dict(
    height=640, margin=dict(l=10, r=10, t=70, b=10), dragmode="pan", uirevision="timeline",
    annotations=titles(all_epochs[start]), hovermode="closest",
    legend=dict(orientation="h", y=-0.02, yanchor="top", x=0, itemsizing="constant"),
    updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.1, xanchor="left",
                      yanchor="top", pad=dict(t=0, r=10), showactive=False, buttons=[
                          dict(label="▶ Play", method="animate",
                               args=[play, dict(mode="immediate", transition=dict(duration=0),
                                                frame=dict(duration=TWEEN_MS, redraw=True))]),
                          dict(label="❚❚ Pause", method="animate",
                               args=[[None], dict(mode="immediate", transition=dict(duration=0),
                                                  frame=dict(duration=0, redraw=False))])])],
    sliders=[dict(active=start, x=0.16, len=0.84, y=-0.06, yanchor="top", pad=dict(t=0),
                  currentvalue=dict(prefix="epoch ", font=dict(size=14)),
                  steps=[dict(label=str(e), method="animate", args=[[f"e{e}"], step_args])
                         for e in all_epochs])],
)
for k in range(n_panels):
    sx = "" if k == 0 else str(k + 1)
    layout[f"xaxis{sx}"] = dict(axis, domain=list(domains[k]), range=[x0, x1],
                                anchor=f"y{sx}")
    layout[f"yaxis{sx}"] = dict(axis, domain=[0, 1], range=[y0, y1], anchor=f"x{sx}",
                                scaleanchor=f"x{sx}")
fig.update_layout(**layout)

live = any(r.status().get("state") == "running" for r in shown_runs)
tl0 = timelines[0]
syn_note = ""
if syn_runs and show_syn:
    caps = [(int(tl.syn_offsets[-1]), int(tl.syn_total.sum())) for tl in timelines]
    if any(a < b for a, b in caps):
        syn_note = f" · at most {al.DEFAULT_MAX_SYNTHETIC:,} synthetic points per evaluation"
st.caption(
    f"{len(all_epochs)} evaluation(s): {', '.join(map(str, all_epochs))} · {tl0.n_points:,} "
    f"{split} points per frame"
    + (f" (a seeded sample capped at {al.DEFAULT_MAX_POINTS:,}: the same images at every "
       "evaluation and in both runs)" if tl0.n_points >= al.DEFAULT_MAX_POINTS else "")
    + syn_note + f" · {method.upper()} per evaluation, each frame aligned to the one before "
    "(Procrustes: rotation, scale, shift)"
    + (" · the second run aligned onto the first at each epoch, on the "
       f"{timelines[1].meta.get('shared_points', 0):,} points they share" if partner else "")
    + (". Synthetic points: grey crosses, beneath the real points." if syn_runs else "."))
if live:
    st.info("A run shown is still training: new evaluations add frames as they land (checked "
            f"every {WATCH_S} s; frames already cached are kept, only new ones are computed).")
st.plotly_chart(fig, key=f"tl-fig-{run.id}-{vs_id}-{split}-{method}-{smooth}-{show_syn}",
                config={"displaylogo": False, "scrollZoom": True})

if names and len(colors) <= plots.MAX_LEGEND_CLASSES:
    st.caption("Classes: " + " · ".join(
        f"<span style='color:{colors[c]}'>●</span> {class_label(c, names)}" for c in colors),
        unsafe_allow_html=True)

seen = {r.id: al.split_epochs(r, split) for r in shown_runs}


@st.fragment(run_every=WATCH_S if live else None)
def watch():
    """While a run trains: rerun the page when an evaluation landed (or a run finished)."""
    now = {r.id: al.split_epochs(r, split) for r in shown_runs}
    still = any(r.status().get("state") == "running" for r in shown_runs)
    cols = st.columns([1, 5])
    if cols[0].button("Refresh", key="tl-refresh", icon=":material/refresh:",
                      help="Read the runs' evaluations again"):
        st.rerun(scope="app")
    if now != seen or still != live:
        st.rerun(scope="app")


watch()
