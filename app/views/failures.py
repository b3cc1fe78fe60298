"""Retrieval failures: for a run and an evaluation, the queries with the lowest average precision
(AP@R, the per-query term of MAP@R), each with its nearest retrieved images marked right or wrong,
filterable by class, each linked to its place on the embedding explorer's map; and, for two runs
of the same test set, the queries one gets right at top-1 and the other wrong. Ranked from the
evaluation file's embeddings exactly as the metrics rank them (``app/failures.py``,
``dml.metrics.query_retrieval``); thumbnails from the run's data set, captions alone when it
cannot be loaded."""

import numpy as np
import streamlit as st

from app import common, failures, plots
from app.images import shrink
from app.selection import class_label, focus_param
from app.tables import value_text
from dml.runs import Run

PAGE = failures.PAGE
THUMB, THUMB_PAIR = 64, 38   # thumbnail side (px): one run, two runs side by side


@st.cache_data(show_spinner="Ranking every query of this evaluation…", max_entries=8)
def _results(path: str, epoch: int, split: str, mtime: int) -> dict:
    return failures.query_results(Run(path).eval_path(epoch), split)


def results(run: Run, epoch: int, split: str) -> dict:
    return _results(str(run.path), int(epoch), split, common.mtime(run.eval_path(epoch)))


@st.cache_data(show_spinner=False, max_entries=64)
def _members(path: str, epoch: int, mtime: int) -> list[str]:
    with np.load(Run(path).eval_path(epoch), allow_pickle=False) as z:
        return list(z.files)


def members(run: Run, epoch: int) -> list[str]:
    """The names of the arrays in an evaluation file (read from its index, not loaded)."""
    return _members(str(run.path), int(epoch), common.mtime(run.eval_path(epoch)))


def short_name(run: Run) -> str:
    s = common.safe_summary(run) or {}
    return str(s.get("name") or run.id)


class Thumbnails:
    """PNG URIs of a run's images, loaded for many rows at once; captions only (and one note)
    when the data set cannot be loaded."""

    def __init__(self, cfg: dict):
        self.cfg, self.uris, self.problem = cfg, {}, None

    def load(self, wanted: dict[str, set]) -> None:
        for split, index in wanted.items():
            index = sorted(i for i in index if (split, i) not in self.uris)
            if not index or self.problem:
                continue
            try:
                imgs = common.thumbnails(self.cfg, split, index, min_side=THUMB)
            except Exception as exc:   # the data set is missing or moved since training
                self.problem = " ".join(str(exc).split())[:300] or type(exc).__name__
                return
            for i, img in zip(index, imgs):   # at most 2x the shown size (sharp, not heavy)
                self.uris[(split, i)] = plots.png_data_uri(shrink(img, 2 * THUMB), colors=0)

    def row(self, res: dict, q: int, k: int) -> list:
        nn = [int(j) for j in res["neighbours"][q][:k] if j >= 0]
        return [self.uris.get((res["split"], q))] + [self.uris.get((res["ref_split"], j))
                                                      for j in nn]


def wanted_images(res: dict, queries, k: int) -> dict[str, set]:
    out: dict[str, set] = {res["split"]: set(), res["ref_split"]: set()}
    out[res["split"]].update(int(q) for q in queries)
    nn = res["neighbours"][np.asarray(queries, np.int64)][:, :k]
    out[res["ref_split"]].update(int(j) for j in nn.ravel() if j >= 0)
    return out


def query_head(res: dict, q: int, names: dict) -> str:
    right = "right" if res["top1"][q] else "wrong"
    return (f"**{res['split']} #{q}** · class {class_label(res['labels'][q], names)} · "
            f"AP@R {res['ap'][q]:.3f} (R = {int(res['r'][q]):,}) · top-1 {right}")


def map_link(container, run: Run, epoch: int, res: dict, q: int, label: str = "On the map"):
    container.page_link("views/explorer.py", label=label, icon=":material/scatter_plot:",
                        query_params={"run": run.id, "epoch": str(epoch),
                                      "focus": focus_param(res["split"], q)},
                        help="The embedding explorer at this evaluation, the query ringed with "
                             "its nearest neighbours")


def more_button(key: str, shown: int, total: int) -> None:
    if shown >= total:
        return

    def more():
        st.session_state[key] = shown + PAGE

    st.button(f"Show {min(PAGE, total - shown)} more (of {total - shown:,} not shown)",
              key=f"{key}-more", on_click=more)


# --------------------------------------------------------------------------- the page

st.title("Retrieval failures")
runs = common.evaluated_runs_or_offer("demo-failures")[1]
qp = st.query_params
top = st.columns([3, 2.2, 1.4])
run = common.pick_run("Run", runs, key="rf-run", container=top[0])
epoch = common.pick_epoch(run, top[1], key=f"rf-epoch-{run.id}")
have = failures.saved_splits(members(run, epoch))
splits = failures.query_splits(members(run, epoch))
if not have:
    st.error(f"Epoch {epoch} of this run has no saved embeddings (train.save_embeddings was "
             "none): there is nothing to rank.")
    st.stop()
if not splits:
    st.error(f"Epoch {epoch} of this run saved no test or validation split to rank (saved: "
             f"{', '.join(have)}).")
    st.stop()
split = top[2].radio("Queries", splits, horizontal=True, key=f"rf-split-{run.id}",
                     help="test: the evaluation's test queries (against the gallery where the "
                          "data set has one); val: leave-one-out on the validation split.")
try:
    res = results(run, epoch, split)
except failures.NoRetrieval as exc:
    st.error(f"Epoch {epoch}: {exc}.")
    st.stop()

cfg = run.config()
names = common.class_names(cfg, run=run)
modes = ["Lowest AP@R", "Where two runs differ"]
mode = st.radio("Show", modes, horizontal=True, key="rf-mode",
                index=1 if qp.get("vs") else 0, label_visibility="collapsed")
pair = mode == modes[1]

other = epoch_b = None
if pair:
    # runs of the same data set and split that saved this split's embeddings somewhere
    partners = [r for r in common.same_data_runs(run, runs)
                if any(split in failures.query_splits(members(r, e)) for e in r.eval_epochs())]
    if not partners:
        st.info("No other run of this data set and split with saved embeddings to compare "
                "with: train one (e.g. the baseline of the same seed) and it appears here.")
        st.stop()
    labels = {r.id: common.run_label(r) for r in partners}
    want = qp.get("vs") if qp.get("vs") in labels else common.default_partner(run, partners)
    ids_b = [r.id for r in partners]
    row = st.columns([3, 2.2, 1.4])
    vs_id = row[0].selectbox("Compare with", ids_b,
                             index=ids_b.index(want) if want in ids_b else 0,
                             key=f"rf-vs-{run.id}", format_func=labels.get,
                             help="Runs of the same data set and split, whose evaluations rank "
                                  "the same queries against the same references.")
    other = partners[ids_b.index(vs_id)]
    epoch_b = common.pick_epoch(other, row[1], key=f"rf-epoch-b-{other.id}",
                                label="Its evaluation (epoch)", want=epoch)

f1, f2, f3, f4 = st.columns([3, 1.6, 1.6, 1.6])
classes = f1.multiselect("Classes (of the query)", sorted(np.unique(res["labels"]).tolist()),
                         key=f"rf-classes-{run.id}-{split}",
                         format_func=lambda c: class_label(c, names),
                         help="Empty: every class.")
k = f4.slider("Neighbours shown", 1, failures.K_MAX, 8, key="rf-k")
ref_note = ("leave-one-out" if res["ref_split"] == split
            else f"against the {res['ref_split']} ({len(res['ref_labels']):,} images)")
thumbs = Thumbnails(cfg)


def image_note() -> None:
    if thumbs.problem:
        st.warning(f"The images of this run's data set cannot be loaded ({thumbs.problem}); "
                   "the rows show class names and right/wrong only.")


if not pair:
    order = f2.selectbox("Order", list(failures.ORDERS), format_func=failures.ORDERS.get,
                         key="rf-order")
    only_wrong = f3.toggle("Only top-1 wrong", key="rf-wrong")
    ids = failures.order_queries(res, classes, order, only_wrong)
    sel = failures.counted(res, classes)
    n_sel = int(sel.sum())
    m = next((r for r in run.metrics() if r.get("epoch") == epoch), {}).get(split, {})
    which = "of the classes picked" if classes else "of every query that counts"
    c = st.columns(4)
    c[0].metric("queries listed", f"{len(ids):,}", help=f"of {int(res['valid'].sum()):,} that "
                "count (a query counts when another image of its class is a reference)")
    c[1].metric("MAP@R", f"{np.mean(res['ap'][sel]):.3f}" if n_sel else "—",
                help=f"The mean AP@R {which}, from the saved (float16) embeddings; the "
                     f"evaluation recorded {value_text(m.get('map@r'), '{:.4f}')} for all")
    c[2].metric("Recall@1", f"{np.mean(res['top1'][sel]):.3f}" if n_sel else "—",
                help=f"The share {which} whose nearest reference has their class; recorded "
                     f"{value_text(m.get('recall@1'), '{:.4f}')} for all")
    c[3].metric("top-1 wrong", f"{int((sel & ~res['top1']).sum()):,}")
    st.caption(f"{split} queries of epoch {epoch}, {ref_note}; a row: the query, then its "
               f"{k} nearest images in the evaluation's embedding space, green border: same "
               "class, red: another class.")
    limit_key = f"rf-limit-{run.id}-{epoch}-{split}-{order}-{only_wrong}-{classes}"
    shown = ids[:st.session_state.get(limit_key, PAGE)]
    if not len(ids):
        st.info("No query matches these filters.")
    thumbs.load(wanted_images(res, shown, k))
    image_note()
    for q in shown.tolist():
        with st.container(border=True, key=f"rf-row-{q}"):
            head = st.columns([6, 1.2])
            head[0].markdown(query_head(res, q, names))
            map_link(head[1], run, epoch, res, q)
            st.html(failures.strip_html(
                failures.neighbour_cells(res, q, k, names, thumbs.row(res, q, k)), THUMB))
    more_button(limit_key, len(shown), len(ids))
    st.stop()

# ---- two runs
try:
    res_b = results(other, epoch_b, split)
except failures.NoRetrieval as exc:
    st.error(f"{short_name(other)}, epoch {epoch_b}: {exc}.")
    st.stop()
problem = failures.comparison_problem(res, res_b)
if problem:
    st.error(f"These two evaluations cannot be compared query by query: {problem}.")
    st.stop()

a, b = short_name(run), short_name(other)
diff = failures.disagreements(res, res_b, classes)
sel = failures.counted(res, classes) & failures.counted(res_b, classes)
c = st.columns(4)
c[0].metric(f"{a} right, {b} wrong", f"{len(diff['a_only']):,}")
c[1].metric(f"{b} right, {a} wrong", f"{len(diff['b_only']):,}")
for col, r_, who in ((c[2], res, a), (c[3], res_b, b)):
    col.metric(f"Recall@1 {who}", f"{np.mean(r_['top1'][sel]):.3f}" if sel.any() else "—")
sides = {"a_only": f"{a} right, {b} wrong ({len(diff['a_only']):,})",
         "b_only": f"{b} right, {a} wrong ({len(diff['b_only']):,})"}
side = st.radio("Queries", list(sides), format_func=sides.get, horizontal=True,
                key="rf-side", label_visibility="collapsed")
ids = diff[side]
st.caption(f"{split} queries at top-1 (epoch {epoch} of {a}, epoch {epoch_b} of {b}), "
           f"{ref_note}; largest AP@R gap first. Each row: the query, its {k} nearest images "
           f"in {a}'s embedding space (middle) and in {b}'s (right).")
limit_key = f"rf-limit-diff-{run.id}-{epoch}-{other.id}-{epoch_b}-{split}-{side}-{classes}"
shown = ids[:st.session_state.get(limit_key, PAGE)]
if not len(ids):
    st.info("No query of these classes is right for one run and wrong for the other.")
want_imgs = wanted_images(res, shown, k)
for s_, idx in wanted_images(res_b, shown, k).items():
    want_imgs.setdefault(s_, set()).update(idx)
thumbs.load(want_imgs)
image_note()
for q in shown.tolist():
    with st.container(border=True, key=f"rf-pair-{q}"):
        head = st.columns([5, 1.1, 1.1])
        head[0].markdown(f"**{split} #{q}** · class {class_label(res['labels'][q], names)} · "
                         f"AP@R {a} {res['ap'][q]:.3f}, {b} {res_b['ap'][q]:.3f}")
        map_link(head[1], run, epoch, res, q, label=f"{a} map")
        map_link(head[2], other, epoch_b, res_b, q, label=f"{b} map")
        query, left, right = st.columns([0.6, 4, 4])
        for col, r_, who in ((left, res, a), (right, res_b, b)):
            cells = failures.neighbour_cells(r_, q, k, names, thumbs.row(r_, q, k))
            col.caption(f"{who}: top-1 {'right' if r_['top1'][q] else 'wrong'}")
            col.html(failures.strip_html(cells[1:], THUMB_PAIR))
        query.caption("query")
        query.html(failures.strip_html(cells[:1], THUMB_PAIR))
more_button(limit_key, len(shown), len(ids))
