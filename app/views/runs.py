"""Runs: the table of runs under the root (live while any trains), failed runs' errors, the
runs that cannot be read (with the file and the error), and a form that launches a new run (any
data set, loss, strategy and parameters)."""

import streamlit as st

from app import common, forms, jobs, tables
from dml.runs import Run, RunFormatError, summarize_runs

st.title("Runs")
root = common.runs_root()
first_summaries, first_unreadable = summarize_runs(root)

if not first_summaries and not first_unreadable:
    common.no_runs_offer(root)

UNREADABLE_LINES = 10    # listed in the warning; the expander's table has them all


def show_unreadable(unreadable: list[RunFormatError]) -> None:
    """A warning naming each run that cannot be read, its file and the error, and a table."""
    if not unreadable:
        return
    lines = [f"- `{tables.unreadable_text(e)}`" for e in unreadable[:UNREADABLE_LINES]]
    if len(unreadable) > UNREADABLE_LINES:
        lines.append(f"- … and {len(unreadable) - UNREADABLE_LINES} more (table below)")
    st.warning(f"{len(unreadable)} run folder(s) under `{root}` cannot be read and are left out "
               "of the table; fix or remove the file named:\n" + "\n".join(lines))
    with st.expander(f"Unreadable runs ({len(unreadable)})", expanded=False):
        common.dataframe(tables.unreadable_table(unreadable), hide_index=True,
                         key="runs-unreadable")


def traceback_of(run_id: str) -> str | None:
    try:
        return Run(root / run_id).status().get("traceback")
    except (OSError, RunFormatError):
        return None


def show_table():
    summaries, unreadable = summarize_runs(root)
    if not summaries:
        show_unreadable(unreadable)
        return
    df = tables.runs_table(summaries)
    n_run = sum(s["state"] == "running" for s in summaries)
    n_maps = sum(bool((s.get("maps") or {}).get("alive")) for s in summaries)
    if (n_run + n_maps > 0) != any_running:   # a run started or ended: switch the refresh rate
        st.rerun(scope="app")
    busy = [f"{n_run} training"] * bool(n_run) + [f"{n_maps} making maps"] * bool(n_maps)
    st.caption(f"{len(df)} run(s) under `{root}`" + (f" · {', '.join(busy)}, refreshing every "
                                                      f"3 s" if busy else ""))
    common.dataframe(
        df.drop(columns=["error"]), hide_index=True, key="runs-table",
        column_config={
            "name": st.column_config.TextColumn("name", width="medium"),
            "seed": st.column_config.NumberColumn("seed", width=45),
            "best epoch": st.column_config.NumberColumn("best epoch", width=60),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, width=90,
                                                        max_value=1.0, format="percent"),
            **{c: st.column_config.NumberColumn(c, format="%.3f", width=70)
               for c in ("val R@1", "val MAP@R", "test R@1", "test MAP@R", "test NMI")},
            "time (s)": st.column_config.NumberColumn("time (s)", format="%.0f", width=60),
        })
    show_unreadable(unreadable)
    failed = [s for s in summaries if s["state"] in ("failed", "interrupted") and s.get("error")]
    for s in failed:
        with st.expander(f"⚠️ {s['id']}: {s['state']}", expanded=s["state"] == "failed"):
            st.error(s["error"])
            tb = traceback_of(s["id"])
            if tb:
                st.code(tb, language="text")


# live while anything trains (runs started from the CLI too); otherwise a slow poll for new runs
any_running = any(s.get("state") == "running" or (s.get("maps") or {}).get("alive")
                  for s in first_summaries)
st.fragment(run_every=3 if any_running else 15)(show_table)()

# --------------------------------------------------------------------------- job queue
QUEUE_TEXT = ("At most {n} training job(s) run at once, {t} thread(s) each ({source}; "
              "`DML_MAX_JOBS`, `DML_JOB_THREADS` or `dml app --max-jobs` change it), so that "
              "jobs do not fight over the {c} core(s) this server is given; the others wait "
              "here in order and start when one ends. Queued jobs live in this app server: if "
              "it stops, they are lost and must be launched again (running jobs keep going).")


def show_jobs():
    """Running and queued jobs of this root; a queued one can be cancelled before it starts."""
    active = jobs.list_jobs(root, active_only=True)
    if not active:
        return
    lim = jobs.job_queue().limits()
    st.subheader("Training jobs")
    st.caption(QUEUE_TEXT.format(n=lim["max_jobs"], t=lim["threads"], source=lim["source"],
                                 c=lim["cores"]))
    for w in lim["warnings"]:
        st.warning(w)
    started = [j for j in active if j.get("pid") or j.get("state") == "running"]
    waiting = sorted((j for j in active if j not in started),
                     key=lambda j: (j.get("position") or 10**9, j.get("queued_ts", 0)))
    for j in sorted(started, key=lambda j: j.get("launched_ts", j.get("started_ts", 0))):
        frac, text = jobs.job_progress(j)
        st.progress(frac, text=text + (f" · {j['threads']} thread(s)" if j.get("threads") else ""))
    for j in waiting:
        c1, c2 = st.columns([6, 1])
        pos = j.get("position")
        c1.markdown(f"**queued**{f' #{pos}' if pos else ''} · {j.get('title', 'job')} · "
                    f"{len(j.get('runs', []))} run(s) · submitted {j.get('started', '')}"
                    + ("" if pos else " (waits in another app server)"))
        if pos and c2.button("Cancel", key=f"cancel-{j['id']}",
                             help="Remove it from the queue: it never starts."):
            st.session_state["launch-note"] = (
                f"Cancelled job {j['id']}; it did not start." if jobs.cancel_job(j["path"])
                else f"Job {j['id']} was no longer waiting (it started or ended): not cancelled.")
            st.rerun(scope="app")


any_jobs = bool(jobs.list_jobs(root, active_only=True))
st.fragment(run_every=2 if any_jobs else None)(show_jobs)()

# --------------------------------------------------------------------------- launch form
st.subheader("Launch a run")
from dml.data import list_datasets  # noqa: E402
from dml.losses import loss_defaults, list_losses  # noqa: E402
from dml.mixing import mixing_params  # noqa: E402

c1, c2, c3 = st.columns(3)
dataset = c1.selectbox("Data set", list_datasets(), key="new-dataset")
loss = c2.selectbox("Loss", list_losses(), key="new-loss")
strategy = c3.selectbox("Mixing strategy", forms.strategies_for(loss), key="new-mixing",
                        help="Only strategies that support the chosen loss are listed.")
c4, c5, c6 = st.columns(3)
epochs = c4.number_input("Epochs", 1, 500, 8, key="new-epochs")
seed = c5.number_input("Seed", 0, 10_000, 0, key="new-seed")
name = c6.text_input("Name (optional)", key="new-name")


def param_inputs(defaults: dict, prefix: str) -> dict:
    values = {}
    cols = st.columns(4)
    for i, (k, d) in enumerate(defaults.items()):
        col = cols[i % 4]
        key = f"{prefix}-{k}"
        if isinstance(d, bool):
            values[k] = col.checkbox(k, d, key=key)
        elif isinstance(d, int):
            values[k] = int(col.number_input(k, value=d, step=1, key=key))
        elif isinstance(d, float):
            values[k] = float(col.number_input(k, value=d, format="%.4g", key=key))
        else:
            text = col.text_input(k, "" if d is None else str(d), key=key,
                                  help="JSON or plain text; empty = None")
            values[k] = forms.parse_param(text, d)
    return values


with st.expander("Parameters", expanded=False):
    st.caption(f"{loss} (defaults from its paper)")
    loss_vals = param_inputs(loss_defaults(loss), f"lp-{loss}")
    mp = mixing_params(strategy)
    if mp:
        st.caption(f"{strategy}")
        mix_vals = param_inputs(mp, f"mp-{strategy}")
    else:
        mix_vals = {}
    data_root = st.text_input("Data root (optional)", key="new-root",
                              help="Folder of the data set's files; digits needs none.")
    extra = st.text_area("Other settings, one `section.key=value` per line", key="new-extra",
                         placeholder="train.lr=3e-4\nmodel.embedding_dim=32")

if st.button("Launch", type="primary", key="launch"):
    try:
        cfg = forms.build_config(
            dataset, loss, strategy, forms.changed_params(loss_vals, loss_defaults(loss)),
            forms.changed_params(mix_vals, mp), epochs=epochs, seed=seed, name=name or None,
            data_root=data_root or None, extra=extra.splitlines())
    except Exception as exc:   # config errors name the bad key and the valid choices
        st.error(f"Cannot launch: {exc}")
    else:
        job = jobs.start_job(root, [cfg], title=name or f"{dataset} {loss} {strategy}")
        st.session_state["last_job"] = job["path"]
        st.session_state["launch-note"] = (
            f"Started (job {job['id']}); progress in the sidebar and the table above."
            if job.get("pid") else
            f"Queued (job {job['id']}, position {job.get('position', '?')}): it starts when a "
            "running job ends; see Training jobs above.")
        st.rerun()
note = st.session_state.pop("launch-note", None)
if note:
    st.success(note)


def _set_max_jobs():
    jobs.job_queue().set_max_jobs(st.session_state.get("max-jobs"))


with st.expander("Job queue", expanded=False):
    limits = jobs.job_queue().limits()
    st.caption(QUEUE_TEXT.format(n=limits["max_jobs"], t=limits["threads"],
                                 source=limits["source"], c=limits["cores"]))
    st.number_input("Jobs at once", 1, 256, limits["max_jobs"], key="max-jobs",
                    on_change=_set_max_jobs,
                    help="For this app server (every session), until it restarts; each job then "
                         "gets cores // jobs threads unless its settings name train.threads.")
