"""Utilization (Metrix): how close the training set (with and without mixed points) comes to every
test example, per evaluation and as a distribution over test queries."""

import numpy as np
import streamlit as st

from app import common, plots, tables
from dml.projection import best_epoch

st.title("Utilization")
with st.expander("What is utilization?", expanded=False):
    st.markdown(r"""
Metrix (Venkataramanan et al., ICLR 2022) measures how well the training examples cover the
test examples in the embedding space:

$$u(Q, X) = \frac{1}{|Q|} \sum_{q \in Q} \min_{x \in X} \lVert f(q) - f(x) \rVert^2$$

with $Q$ the test (query) examples, $X$ the training examples and $f$ the embedding. **Lower is
better**: every test example has a training example nearby. Mixing is claimed to lower it by
filling the space between training classes; the *with mixed* variant adds the synthetic points
of the probe batch to $X$. Utilization mostly reflects how spread out the embeddings are (a
collapsed model has $u \approx 0$), so compare it only between runs of the same loss.
""")

root = common.runs_root()
runs = common.runs_with_evals(root)
runs = [r for r in runs if r.metrics()]
if not runs:
    common.no_runs_offer(root, key="demo-util")
    st.stop()
by_id = {r.id: r for r in runs}
labels = {r.id: common.run_label(r) for r in runs}
chosen = st.multiselect("Runs", list(by_id), default=list(by_id)[:6], format_func=labels.get,
                        key="util-runs")
if not chosen:
    st.stop()

series, rows = [], []
for i, rid in enumerate(chosen):
    recs = by_id[rid].metrics()
    color = plots.PALETTE[i % len(plots.PALETTE)]
    x, y = tables.metric_series(recs, "utilization")
    series.append({"name": labels[rid], "x": x, "y": y, "color": color, "group": rid})
    xm, ym = tables.metric_series(recs, "utilization_mixed")
    if xm:
        series.append({"name": labels[rid] + " (with mixed)", "x": xm, "y": ym, "color": color,
                       "dash": "dash", "group": rid})
    last = recs[-1] if recs else {}
    rows.append({"run": labels[rid], "epoch": last.get("epoch"),
                 "utilization": last.get("utilization"),
                 "with mixed points": last.get("utilization_mixed"),
                 "synthetic points": last.get("synthetic_points", 0)})
st.plotly_chart(plots.curves_figure(series, title="Utilization per evaluation (solid: training "
                                                  "set; dashed: with mixed points)",
                                    ytitle="u(test, train)"),
                key="util-curves", config={"displaylogo": False})
common.number_table(rows, "util-table", ("utilization", "with mixed points"))

st.subheader("Per-query nearest-training distances")
which = st.radio("Evaluation", ["best", "last"], horizontal=True, key="util-epoch",
                 help="best: the evaluation of the checkpoint chosen on validation")
with_mixed = st.toggle("Add the distances to training + mixed points", value=True,
                       key="util-mixed")


@st.cache_data(show_spinner=False, max_entries=64)
def distances(path: str, epoch: int, mtime: int, mixed: bool) -> np.ndarray:
    from dml.metrics import nearest_train_distances
    from dml.runs import Run
    ev = Run(path).load_eval(epoch)
    if not mixed:
        if "test_nn_distance" in ev:
            return ev["test_nn_distance"].astype(np.float64)
        return nearest_train_distances(ev["test_embeddings"].astype(np.float32),
                                       ev["train_embeddings"].astype(np.float32))
    if "synthetic_embeddings" not in ev:
        return np.zeros(0)
    X = np.concatenate([ev["train_embeddings"].astype(np.float32),
                        ev["synthetic_embeddings"].astype(np.float32)])
    return nearest_train_distances(ev["test_embeddings"].astype(np.float32), X)


groups, stats = {}, []
for rid in chosen:
    run = by_id[rid]
    epoch = best_epoch(run) if which == "best" else run.eval_epochs()[-1]
    mtime = run.eval_path(epoch).stat().st_mtime_ns
    for mixed in ((False, True) if with_mixed else (False,)):
        d = distances(str(run.path), epoch, mtime, mixed)
        if len(d):
            groups[f"{labels[rid]} · e{epoch}" + (" + mixed" if mixed else "")] = d
            stats.append({"run": labels[rid], "epoch": epoch,
                          "points": "train + mixed" if mixed else "train",
                          "mean (= utilization)": float(d.mean()),
                          "median": float(np.median(d)),
                          "90th percentile": float(np.quantile(d, 0.9))})
st.plotly_chart(plots.histogram_figure(groups, title="Squared distance of each test query to "
                                                     "its nearest training point",
                                       xtitle="min ||f(q) - f(x)||²"),
                key="util-hist", config={"displaylogo": False})
common.number_table(stats, "util-stats", ("mean (= utilization)", "median", "90th percentile"))
