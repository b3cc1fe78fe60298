"""Compare: overlay curves of several runs per evaluation (loss terms, Recall@K, MAP@R, NMI,
utilization) and a final table grouped by configuration with mean and spread over seeds."""

import math

import pandas as pd
import streamlit as st

from app import common, plots, tables

st.title("Compare runs")
root = common.runs_root()
runs, _ = common.list_runs_and_errors(root)
runs = [r for r in runs if r.metrics()]
if not runs:
    common.no_runs_offer(root, key="demo-compare")
    st.stop()

labels = {r.id: common.run_label(r) for r in runs}
by_id = {r.id: r for r in runs}
chosen = st.multiselect("Runs", list(by_id), default=list(by_id)[:12], format_func=labels.get,
                        key="cmp-runs")
if not chosen:
    st.info("Pick runs to compare.")
    st.stop()
records = {rid: by_id[rid].metrics() for rid in chosen}
keys = tables.metric_keys(records.values())
preferred = ["train.loss", "test.recall@1", "test.map@r", "test.nmi", "utilization",
             "val.recall@1"]
metrics = st.multiselect("Curves", keys, default=[k for k in preferred if k in keys],
                         format_func=tables.metric_label, key="cmp-metrics")

configs = {rid: by_id[rid].config() for rid in chosen}
diff = tables.differing_keys(list(configs.values()))
short = {rid: f"{configs[rid].get('name') or tables.config_label(configs[rid], diff)} "
              f"s{configs[rid]['train']['seed']}" for rid in chosen}
colors = {}
for rid in chosen:   # one colour per configuration, seeds share it
    key = tables.config_key(configs[rid])
    colors.setdefault(key, plots.PALETTE[len(colors) % len(plots.PALETTE)])

cols = st.columns(2)
for i, key in enumerate(metrics):
    series = []
    for rid in chosen:
        x, y = tables.metric_series(records[rid], key)
        if x:
            series.append({"name": short[rid], "x": x, "y": y, "group": rid,
                           "color": colors[tables.config_key(configs[rid])],
                           "dash": "dash" if key == "utilization_mixed" else None})
    with cols[i % 2]:
        st.plotly_chart(plots.curves_figure(series, title=tables.metric_label(key),
                                            ytitle=tables.metric_label(key)),
                        key=f"cmp-curve-{key}", config={"displaylogo": False})

# ---- final table
st.subheader("Final results by configuration")
st.caption("Test metrics of each run's checkpoint chosen on validation; mean ± standard deviation "
           "over seeds. A configuration whose interval (mean ± std) overlaps its baseline's (the "
           "same configuration without mixing) is marked *not significant*.")
final_metrics = [m for m in ("test.recall@1", "test.map@r", "test.nmi", "utilization")]
rows = []
for rid in chosen:
    st_ = by_id[rid].status()
    if st_.get("state") != "finished":
        continue
    best = st_.get("best") or {}
    flat = tables.flatten_record({"test": best.get("test", {}),
                                  "utilization": best.get("utilization")} if best else {})
    rows.append({"id": rid, "config": configs[rid], "values": flat})
if not rows:
    st.info("No finished runs among the chosen ones yet.")
    st.stop()
df = tables.group_runs(rows, final_metrics)
show = pd.DataFrame({"configuration": df["configuration"], "seeds": df["seeds"]})
for m in final_metrics:
    show[tables.metric_label(m)] = [
        "—" if math.isnan(a) else (f"{a:.4f}" if math.isnan(b) else f"{a:.4f} ± {b:.4f}")
        for a, b in zip(df[f"{m} mean"], df[f"{m} std"])]
    show[f"{tables.metric_label(m)}: vs baseline"] = df[f"{m} vs baseline"]
st.dataframe(show, hide_index=True, key="cmp-final")
ns = df[[f"{m} vs baseline" for m in final_metrics]].eq("not significant").any(axis=1)
if ns.any():
    st.warning("Not significant against the baseline (spread overlaps): "
               + "; ".join(df.loc[ns, "configuration"]))
if (df[[f"{m} vs baseline" for m in final_metrics]] == "needs >= 2 seeds").any().any():
    st.caption("Configurations with a single seed have no spread: train more seeds "
               "(`dml train ... --seed 1`) before reading a difference as a result.")
