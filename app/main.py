"""Tango app entry point: ``streamlit run app/main.py`` (or ``dml app``).

Sets up the page, the sidebar (runs root, training jobs) and the navigation; the pages live in
``app/views/``. UMAP maps are computed in a separate low-priority process, started (and its numba
code compiled) once the app has been quiet for a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `streamlit run app/main.py` without `pip install -e .`
    sys.path.insert(0, str(REPO))

from dml.projection import configure_numba_cache  # noqa: E402

configure_numba_cache()

import streamlit as st  # noqa: E402

from app import common  # noqa: E402
from app.projection_worker import note_activity, start_warmup  # noqa: E402

st.set_page_config(page_title="Tango · mixing in metric learning", page_icon=":material/join_inner:",
                   layout="wide", initial_sidebar_state="expanded")

VIEWS = Path(__file__).parent / "views"
pages = [
    st.Page(str(VIEWS / "runs.py"), title="Runs", icon=":material/table_rows:", default=True),
    st.Page(str(VIEWS / "compare.py"), title="Compare", icon=":material/monitoring:"),
    st.Page(str(VIEWS / "explorer.py"), title="Embedding explorer", icon=":material/scatter_plot:"),
    st.Page(str(VIEWS / "timeline.py"), title="Through time", icon=":material/animation:"),
    st.Page(str(VIEWS / "failures.py"), title="Retrieval failures", icon=":material/rule:"),
    st.Page(str(VIEWS / "utilization.py"), title="Utilization", icon=":material/straighten:"),
    st.Page(str(VIEWS / "playground.py"), title="Mixing playground", icon=":material/science:"),
    st.Page(str(VIEWS / "inspector.py"), title="Checkpoint inspector", icon=":material/search:"),
]
page = st.navigation(pages)

with st.sidebar:
    st.markdown("### :material/join_inner: Tango")
    st.caption("Mixup for deep metric learning: train, compare, look inside.")
    if common.ROOT_KEY not in st.session_state:
        st.session_state[common.ROOT_KEY] = common.default_runs_root()
    st.text_input("Runs root", key=common.ROOT_KEY,
                  help="Folder holding run directories (default $DML_RUNS or data/runs).")
    root = common.runs_root()
    if not root.is_dir():
        st.caption(f"`{root}` does not exist yet; it is created by the first run.")
    common.jobs_panel(root)
    if not st.get_option("server.address"):   # `streamlit run` from outside the repository
        st.warning("This server listens on every network interface, and the app launches "
                   "training and accepts uploads: streamlit_config.toml was not read (it is "
                   "read from the repository root). Start it with `dml app` (this machine "
                   "only), or pass `--server.address=localhost`.", icon=":material/public:")

# The worker that computes UMAP maps starts warmed once the app has been quiet for a few seconds
# (every page run counts, marked here since a page may end in st.stop()), so that its compiling
# competes with no page being drawn; it runs at low priority, and no cached map waits for it.
note_activity()
start_warmup(delay=3.0, idle=5.0)

page.run()
