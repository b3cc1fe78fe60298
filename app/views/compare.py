"""Compare: overlay curves of several runs per evaluation (loss terms, Recall@K, MAP@R, NMI,
utilization) and a final table grouped by configuration with mean and spread over seeds and the
paired difference (by seed) to each configuration's baseline."""

import streamlit as st

from app import common, plots, tables
from dml.runs import RunFormatError, iter_runs

st.title("Compare runs")
root = common.runs_root()

# every file each run needs, read once; a run that cannot be read is left out with a note
runs, summaries, all_records, all_configs, statuses, skipped = [], {}, {}, {}, {}, []
for r in iter_runs(root):
    if isinstance(r, RunFormatError):
        skipped.append(r)
        continue
    try:
        s, ms, cfg, stat = r.summary(), r.metrics(), r.config(), r.status()
    except RunFormatError as exc:
        exc.run = exc.run or r.path
        skipped.append(exc)
        continue
    except OSError:          # removed while listing
        continue
    if ms:
        runs.append(r)
        summaries[r.id], all_records[r.id], all_configs[r.id], statuses[r.id] = s, ms, cfg, stat
if skipped:
    shown = "; ".join(f"`{tables.unreadable_text(e)}`" for e in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    st.warning(f"Left out {len(skipped)} run(s) that cannot be read (the Runs page lists "
               f"them): {shown}{more}")
if not runs:
    common.no_runs_offer(root, key="demo-compare")
    st.stop()

labels = {r.id: common.run_label(r, summaries[r.id]) for r in runs}
by_id = {r.id: r for r in runs}
DEFAULT_RUNS = 12


def select_all():
    st.session_state["cmp-runs"] = list(by_id)
    st.session_state["cmp-per"] = "configuration"   # a whole grid: one curve per configuration


# the selection lives in the session (no widget default, so "select all" can set it); runs that
# vanished from the root are dropped from it
st.session_state["cmp-runs"] = [rid for rid in st.session_state.get(
    "cmp-runs", list(by_id)[:DEFAULT_RUNS]) if rid in by_id]
pick, everything = st.columns([5, 1], vertical_alignment="bottom")
chosen = pick.multiselect("Runs", list(by_id), format_func=labels.get, key="cmp-runs")
everything.button(f"Select all {len(by_id)} runs", key="cmp-all", on_click=select_all,
                  disabled=len(chosen) == len(by_id),
                  help="A whole benchmark grid: every run with metrics under the runs root.")
if not chosen:
    st.info("Pick runs to compare.")
    st.stop()
records = {rid: all_records[rid] for rid in chosen}
keys = tables.metric_keys(records.values())
preferred = ["train.loss", "test.recall@1", "test.map@r", "test.nmi", "utilization",
             "val.recall@1"]
metrics = st.multiselect("Curves", keys, default=[k for k in preferred if k in keys],
                         format_func=tables.metric_label, key="cmp-metrics")

configs = {rid: all_configs[rid] for rid in chosen}
diff = tables.differing_keys(list(configs.values()))
short = {rid: tables.curve_label(configs[rid], diff) for rid in chosen}
groups: dict[str, list[str]] = {}   # configuration -> its chosen runs (seeds)
for rid in chosen:
    groups.setdefault(tables.config_key(configs[rid]), []).append(rid)
colors = {key: plots.PALETTE[i % len(plots.PALETTE)] for i, key in enumerate(groups)}
first = {} if "cmp-per" in st.session_state else {"index": int(len(chosen) > DEFAULT_RUNS)}
per = st.radio("Curves per", ["run", "configuration"], horizontal=True, key="cmp-per", **first,
               help="configuration: the mean over its selected seeds, with a band of ± one "
                    "standard deviation (one curve per configuration of a whole grid)")
if per == "configuration":   # one key for every chart: the same colour is the same config
    names = {key: f"{tables.config_label(configs[rids[0]], diff)} · {len(rids)} seed(s)"
             for key, rids in groups.items()}
    st.markdown(plots.color_key_html([(colors[k], names[k]) for k in groups]),
                unsafe_allow_html=True)

cols = st.columns(2)
for i, key in enumerate(metrics):
    dash = "dash" if key == "utilization_mixed" else None
    series = []
    if per == "configuration":
        for ck, rids in groups.items():
            x, mean, sd, _ = tables.mean_series(tables.metric_series(records[r], key)
                                                for r in rids)
            if x:
                series.append({"name": names[ck], "x": x, "y": mean, "group": ck,
                               "color": colors[ck], "dash": dash,
                               "band": ([m - s for m, s in zip(mean, sd)],
                                        [m + s for m, s in zip(mean, sd)])
                               if len(rids) > 1 else None})
    else:
        for rid in chosen:
            x, y = tables.metric_series(records[rid], key)
            if x:
                series.append({"name": short[rid], "x": x, "y": y, "group": rid,
                               "color": colors[tables.config_key(configs[rid])], "dash": dash})
    with cols[i % 2]:
        st.plotly_chart(plots.curves_figure(series, title=tables.metric_label(key),
                                            ytitle=tables.metric_label(key),
                                            legend=per == "run"),
                        key=f"cmp-curve-{key}", config={"displaylogo": False})

# ---- final table
st.subheader("Final results by configuration")
st.caption("Test metrics of each run's checkpoint chosen on validation; mean ± standard deviation "
           "over seeds. **Δ vs baseline, paired by seed**: the mean difference to the same "
           "configuration without mixing, run against run of the same seed, with its 95% "
           "t-interval over the seed pairs (the statistic of the benchmark report, "
           "`dml bench`); `*` marks an interval that excludes 0. The *vs baseline* columns say "
           "the same for every metric: *significant* when the paired interval excludes 0.")
final_metrics = ["test.recall@1", "test.map@r", "test.nmi", "utilization"]
paired_metrics = ["test.recall@1", "test.map@r"]
rows = []
for rid in chosen:
    st_ = statuses[rid]
    if st_.get("state") != "finished":
        continue
    best = st_.get("best") or {}
    flat = tables.flatten_record({"test": best.get("test", {}),
                                  "utilization": best.get("utilization")} if best else {})
    rows.append({"id": rid, "config": configs[rid], "values": flat})
if not rows:
    st.info("No finished runs among the chosen ones yet.")
    st.stop()
df = tables.group_runs(rows, final_metrics, paired=paired_metrics)
common.dataframe(tables.final_table(df, final_metrics, paired_metrics), hide_index=True,
                 key="cmp-final")
ns = df[[f"{m} vs baseline" for m in final_metrics]].eq("not significant").any(axis=1)
if ns.any():
    st.warning("Not significant against the baseline (the paired 95% interval contains 0): "
               + "; ".join(df.loc[ns, "configuration"]))
if (df[[f"{m} vs baseline" for m in final_metrics]] == "needs >= 2 seeds").any().any():
    st.caption("Configurations with a single seed have no spread and no paired interval: train "
               "more seeds (`dml train ... --seed 1`) before reading a difference as a result.")
