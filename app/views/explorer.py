"""Embedding explorer: one run, one evaluation; UMAP (fitted on the real points, or a subsample
of them for large runs, the rest and the synthetic points placed with ``transform``) or PCA;
select points to see their images and nearest neighbours.

Large runs: the map is drawn from a light table (labels and map coordinates; the embeddings are
read only when points are selected, for their neighbours), kept once per server process and
evaluation file; above ``plots.EXACT_MAX_POINTS`` visible points it is a density image with an
exact sample on top (see ``app/plots.py``), and a lasso or box selects every point inside it.
``DML_MAP_TIMINGS=1`` prints what each step of the page cost to the server's stderr.
"""

import json
import os
import sys
import time

import numpy as np
import streamlit as st

from app import common, plots, selection
from app.tables import value_text
from dml.projection import ProjectionError, best_epoch, load_projection, projection_path
from dml.runs import Run

_T0 = time.perf_counter()
TIMINGS: dict[str, float] = {}


def mark(step: str) -> None:
    TIMINGS[step] = round(time.perf_counter() - _T0, 3)


# Kept once per server process (not copied per rerun, as st.cache_data would: a pickle of 100k
# points with their embeddings cost 0.3 s per rerun); the table is only read here.
@st.cache_resource(show_spinner=False, max_entries=8)
def _map_table(path: str, epoch: int, method: str, eval_mtime: int, proj_mtime: int):
    proj = load_projection(path, epoch, method)
    if proj is None:
        return None
    return selection.build_point_table(selection.read_map_arrays(Run(path).eval_path(epoch)),
                                       proj)


def map_table(run, epoch: int, method: str):
    return _map_table(str(run.path), int(epoch), method, common.mtime(run.eval_path(epoch)),
                      common.mtime(projection_path(run.path, epoch, method)))


@st.cache_resource(show_spinner="Reading the embeddings…", max_entries=2)
def _embeddings(path: str, epoch: int, method: str, eval_mtime: int, proj_mtime: int):
    pt = _map_table(path, epoch, method, eval_mtime, proj_mtime)
    return selection.read_point_embeddings(Run(path).eval_path(epoch), pt)


def embeddings(run, epoch: int, method: str):
    return _embeddings(str(run.path), int(epoch), method, common.mtime(run.eval_path(epoch)),
                       common.mtime(projection_path(run.path, epoch, method)))


@st.cache_resource(show_spinner=False, max_entries=4)
def _synthetic_images(path: str, epoch: int, eval_mtime: int):
    with np.load(Run(path).eval_path(epoch), allow_pickle=False) as z:
        return z["synthetic_images"] if "synthetic_images" in z.files else None


st.title("Embedding explorer")
root = common.runs_root()
runs = common.runs_with_evals(root)
if not runs:
    common.no_runs_offer(root, key="demo-explorer")
    st.stop()

# Layout first: an empty map frame goes out at once, so the browser loads its plotting code
# while the server reads the evaluation; the real map replaces it in the same slot.
head, notes, filters_box, metrics_box = (st.container() for _ in range(4))
map_slot = st.empty()
map_slot.plotly_chart(plots.placeholder_figure(620), key="loading-map",
                      config={"staticPlot": True, "displayModeBar": False})

qp = st.query_params
top = head.columns([3, 2, 1.3])
run = common.pick_run("Run", runs, key="ex-run", container=top[0])
epochs = run.eval_epochs()
best = best_epoch(run) or epochs[-1]
want = int(qp["epoch"]) if qp.get("epoch", "").isdigit() and int(qp["epoch"]) in epochs else best
if len(epochs) > 1:
    epoch = top[1].select_slider("Evaluation (epoch)", options=epochs, value=want,
                                 key=f"ex-epoch-{run.id}",
                                 help=f"best on validation: epoch {best}")
else:
    epoch = epochs[0]
    top[1].markdown(f"Evaluation: epoch **{epoch}** (the only one)")

cached = {m: common.cached_projection(run, epoch, m) is not None for m in ("umap", "pca")}
default_method = (qp.get("method") or ("umap" if cached["umap"] else "pca")).lower()
method_key, auto_key = f"ex-method-{run.id}", f"ex-method-auto-{run.id}"
arrived = st.session_state.pop(f"map-arrived-{run.id}", None)   # common.watch_background_map
if arrived:
    st.toast(f"The {arrived[0].upper()} map of epoch {arrived[1]} arrived from the background",
             icon=":material/check_circle:")
    if arrived[0] == "umap" and st.session_state.get(auto_key, True):
        st.session_state[method_key] = "umap"
if method_key not in st.session_state:   # PCA only because UMAP is missing: switch when it lands
    st.session_state[auto_key] = default_method == "pca" and not qp.get("method")
initial = {} if method_key in st.session_state else {"index": int(default_method != "umap")}
method = top[2].radio("Projection", ["umap", "pca"], format_func=str.upper, horizontal=True,
                      key=method_key, **initial,
                      on_change=lambda: st.session_state.update({auto_key: False}),
                      help="UMAP: fitted on the real points, synthetic points placed by "
                           "transform. PCA: instant, linear.")
# maps on their way from the run's background process (PCA, milliseconds, is made here)
coming = {"umap": common.background_map(run, epoch, "umap"), "pca": None}

if not cached[method] and coming[method] and not st.session_state.get(f"ex-here-{run.id}"):
    with notes:   # the run's background map process will make it: wait for it, or make it here
        common.watch_background_map(run, epoch, method, coming[method])
        st.button("Compute it here instead", key="ex-compute-here",
                  on_click=lambda: st.session_state.update({f"ex-here-{run.id}": True}))
    map_slot.empty()
    st.stop()
elif not cached[method]:   # not precomputed: compute now (with progress) and cache it
    try:
        with notes:
            common.compute_projection_with_progress(run, epoch, method)
    except ProjectionError as exc:
        map_slot.error(f"No map for this evaluation: {exc}")
        st.stop()
elif method == "pca" and not cached["umap"] and coming["umap"]:
    with notes:
        common.watch_background_map(run, epoch, "umap", coming["umap"])
elif method == "pca" and not cached["umap"]:
    notes.info("The UMAP map of this evaluation is not cached yet (runs trained from the app, or "
            "with `python -m dml.projection RUN`, have it). Showing PCA meanwhile.")

    def want_umap():
        st.session_state[f"ex-method-{run.id}"] = "umap"

    notes.button("Compute the UMAP map (cached in the run directory)", key="ex-compute",
                 on_click=want_umap)

mark("projections found")
pt = map_table(run, epoch, method)
mark("point table")
if pt is None or not len(pt):
    map_slot.error("This evaluation has no saved embeddings (train.save_embeddings was "
                   "false).")
    st.stop()

# class names from the run directory, or if it has none (runs of older versions) only when this
# server has loaded the data set already: loading it would delay the first map by seconds
cfg = run.config()
known_names = common.class_names(cfg, load=False, run=run)

# ---- filters
have_splits = [s for s in ("train", "val", "test", "gallery") if (pt.split == s).any()]
n_syn = int((pt.split == "synthetic").sum())
f1, f2, f3 = filters_box.columns([2, 1, 3])
splits = f1.pills("Points", have_splits, selection_mode="multi",
                  default=[s for s in ("train", "test") if s in have_splits] or have_splits,
                  key=f"ex-splits-{run.id}")
show_syn = f2.toggle(f"synthetic ({n_syn})", value=n_syn > 0, disabled=n_syn == 0,
                     key=f"ex-syn-{run.id}")
all_classes = np.unique(pt.label[pt.real]).tolist()
picked = f3.multiselect("Isolate classes (synthetic points between them stay)", all_classes,
                        key=f"ex-classes-{run.id}-{epoch}",
                        format_func=lambda c: selection.class_label(c, known_names),
                        help="Empty: all classes. Synthetic points are kept when both of "
                             "their parents' classes are picked.")
visible = selection.visible_mask(pt, splits or [], picked or None, show_syn)

meta = common.cached_projection(run, epoch, method) or {}
m = next((r for r in run.metrics() if r.get("epoch") == epoch), {})
cols = metrics_box.columns(5)
cols[0].metric("points shown", f"{int(visible.sum()):,}")
cols[1].metric("test Recall@1", value_text(m.get("test", {}).get("recall@1"), "{:.3f}"))
cols[2].metric("test MAP@R", value_text(m.get("test", {}).get("map@r"), "{:.3f}"))
cols[3].metric("utilization", value_text(m.get("utilization"), "{:.4f}"))
cols[4].metric("with mixed", value_text(m.get("utilization_mixed"), "{:.4f}"))

mark("filters")
fig, trace_ids = plots.map_figure(pt, visible, class_names=known_names, height=620)
dense = (fig.layout.meta or {}).get("rendering") == "density"
mark("figure")

# ---- focus: ?focus=test:123 (the Retrieval failures page links here) rings that point and its
# nearest references as the evaluation ranks them (test queries: against the gallery, if any);
# with nothing selected on the map, the focus is the selection shown below it
focus = selection.parse_focus(qp.get("focus"))
focus_id = None if focus is None else selection.focus_point(pt, *focus)
if focus is not None and focus_id is None:
    notes.warning(f"The focus point {focus[0]} #{focus[1]} is not on this map.")
elif focus_id is not None:
    from app.failures import K_MAX
    from dml.metrics import reference_split

    focus_nn = selection.neighbours_of_selection(
        pt, np.array([focus_id]), k=K_MAX, among=(reference_split(focus[0], have_splits),),
        emb=embeddings(run, epoch, method))[0]["neighbours"]
    plots.add_focus(fig, pt, focus_id, focus_nn, known_names)
    notes.caption(f"Ringed: {selection.describe_point(pt, focus_id, known_names)} and its "
                  f"{len(focus_nn)} nearest (green: its class, red: another).")
sel_key = f"map-{run.id}-{epoch}-{method}-{'-'.join(splits or [])}-{show_syn}-" \
          f"{'-'.join(map(str, picked))}"
event = map_slot.plotly_chart(fig, key=sel_key, on_select="rerun",
                             selection_mode=("box", "lasso"),
                             config={"displaylogo": False, "scrollZoom": True})
mark("chart sent")
info = meta.get("meta", {})
fitted = info.get("fit_points")
n_real_all = int(pt.real.sum())
st.caption(f"{method.upper()} of epoch {epoch}"
           + (f" · computed in {info.get('seconds')} s, cached in the run directory"
              if info.get("seconds") is not None else "")
           + (f" · fitted on {fitted:,} of {n_real_all:,} real points, the others placed by "
              "transform" if method == "umap" and fitted and fitted < n_real_all else "")
           + (f" · {int(visible.sum()):,} points: a density image of all of them with an exact "
              f"sample of {plots.SAMPLE_POINTS:,} on top (hover, zoom); a lasso or box selects "
              "every point inside it" if dense else "")
           + " · drag (lasso) or switch to box select in the toolbar to pick points.")

if dense:   # the traces hold a sample: the shapes select every visible point
    ids = selection.ids_from_shapes(event, pt, visible)
    if not len(ids):
        ids = selection.ids_from_event(event, trace_ids)
else:
    ids = selection.ids_from_event(event, trace_ids)
    if not len(ids):
        ids = selection.ids_from_shapes(event, pt, visible)
ids = ids[visible[ids]] if len(ids) else ids
if not len(ids) and focus_id is not None:   # the focus (see above) stands for a selection
    ids = np.array([focus_id])
mark("selection")
if os.environ.get("DML_MAP_TIMINGS"):
    print("explorer timings " + json.dumps({"run": run.id, "points": len(pt), **TIMINGS,
                                            "rendering": (fig.layout.meta or {})
                                            .get("rendering")}),
          file=sys.stderr, flush=True)

# ---- the selection
if not len(ids):
    st.info("Select points on the map (lasso or box) to see their images and their nearest "
            "neighbours in the original embedding space.")
    st.stop()

PER_SPLIT, MAX_QUERIES = 24, 6
counts = {s: int((pt.split[ids] == s).sum()) for s in ("train", "val", "test", "gallery",
                                                      "synthetic")}
st.subheader(f"{len(ids)} selected point(s)")
st.caption(" · ".join(f"{k}: {v}" for k, v in counts.items() if v)
           + (f" (thumbnails of the first {PER_SPLIT} of each)"
              if max(counts.values()) > PER_SPLIT else ""))
groups = {s: ids[pt.split[ids] == s][:PER_SPLIT] for s, n in counts.items() if n}
shown = np.concatenate(list(groups.values()))


def point_images(point_ids):
    """uint8 display images of points: real points from the data set, synthetic points as their
    mixed image (input-level mixing) or their two parents side by side."""
    out = [None] * len(point_ids)
    for split in ("train", "val", "test", "gallery"):
        rows = [j for j, i in enumerate(point_ids) if pt.split[i] == split]
        if rows:
            imgs = common.thumbnails(cfg, split, pt.index[[point_ids[j] for j in rows]])
            for j, img in zip(rows, imgs):
                out[j] = img
    syn_rows = [j for j, i in enumerate(point_ids) if pt.split[i] == "synthetic"]
    if syn_rows:
        syn_images = _synthetic_images(str(run.path), int(epoch),
                                       common.mtime(run.eval_path(epoch)))
        for j in syn_rows:
            i = point_ids[j]
            if syn_images is not None:
                from app.images import to_display
                from dml.data.transforms import denormalize
                ds = common.run_dataset(cfg)
                k = int(pt.index[i])
                out[j] = to_display(denormalize(syn_images[k:k + 1], ds.mean, ds.std))[0]
            elif (pt.parent_index[i] >= 0).all():
                a, b = common.thumbnails(cfg, "train", pt.parent_index[i])
                sep = np.full_like(a[:, :4], 255)
                out[j] = np.concatenate([a, sep, b], axis=1)
    return out


try:
    images = point_images(shown)
except Exception as exc:   # e.g. the data set's files moved since training
    st.warning(f"Cannot load the images of this run's data set: {exc}")
    images = [None] * len(shown)
names = common.class_names(cfg, run=run)
by_id = dict(zip(shown.tolist(), images))
for split, members in groups.items():
    good = [(by_id[int(i)], selection.short_caption(pt, int(i), names)) for i in members
            if by_id.get(int(i)) is not None]
    if good:
        kinds = ", ".join(sorted(set(pt.kind[members]))) if split == "synthetic" else ""
        st.markdown(f"**{split}** ({counts[split]})"
                    + (f" — {kinds}: the mixed image, or its two parents side by side; "
                       "captions give the parents' classes and λ" if split == "synthetic"
                       else ""))
        wide = split == "synthetic" and _synthetic_images(
            str(run.path), int(epoch), common.mtime(run.eval_path(epoch))) is None
        st.image([g[0] for g in good], caption=[g[1] for g in good], width=120 if wide else 72)

st.subheader("Nearest training neighbours (original embedding space)")
k = st.slider("neighbours per point", 1, 10, 5, key="ex-k")
nbrs = selection.neighbours_of_selection(pt, ids[:MAX_QUERIES], k=k, among=("train",),
                                        emb=embeddings(run, epoch, method))
for row in nbrs:
    q = row["id"]
    cols = st.columns([1.3] + [1] * k)
    qimg = point_images([q])[0]
    if qimg is not None:
        cols[0].image(qimg, caption="query: " + selection.describe_point(pt, q, names), width=72)
    else:
        cols[0].write("query: " + selection.describe_point(pt, q, names))
    if row["neighbours"]:
        try:
            nimgs = common.thumbnails(cfg, "train", pt.index[row["neighbours"]])
        except Exception:   # the data set's files moved (warned above): captions only
            nimgs = [None] * len(row["neighbours"])
        for c, n, d, img in zip(cols[1:], row["neighbours"], row["distances"], nimgs):
            same = "✓" if pt.label[n] == pt.label[q] else "✗"
            caption = (f"{same} class {selection.class_label(pt.label[n], names)} "
                       f"· d={d:.3f}")
            if img is None:
                c.caption(caption)
            else:
                c.image(img, caption=caption, width=72)
if len(ids) > MAX_QUERIES:
    st.caption(f"Neighbours shown for the first {MAX_QUERIES} selected points.")
