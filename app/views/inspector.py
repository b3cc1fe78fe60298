"""Checkpoint inspector: open a run's checkpoint or upload one (safetensors + JSON side file);
show its config, architecture, parameter counts and metrics; embed a data set with it. Nothing
is ever unpickled: foreign, corrupt or pickled files are refused with the reason, and so is a
checkpoint whose weights or embeddings are not finite (its side file's metrics would be a lie).

Uploads are read from memory; only for loading are they written, under fixed names, to a private
temporary folder that is removed right after (the loaded model is cached by the files' digest)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app import common, plots
from dml.checkpoints import CheckpointError, load_checkpoint

st.title("Checkpoint inspector")
root = common.runs_root()
runs, _ = common.list_runs_and_errors(root)
with_ckpt = [r for r in runs if r.checkpoint_path("best").is_file()
             or r.checkpoint_path("last").is_file()]
source = st.radio("Checkpoint", ["from a run", "upload files"], horizontal=True,
                  index=0 if with_ckpt else 1, key="ck-source")


@st.cache_resource(show_spinner="Loading the checkpoint…", max_entries=8)
def load(digest: str, weights: str | None, _upload: dict | None = None):
    """(model, side file) or the refusal message. ``digest`` keys the cache on the files'
    contents; a run's checkpoint is read from ``weights``, an upload from ``_upload``
    (:func:`common.checkpoint_uploads`). A model whose embeddings are not finite is refused."""
    try:
        model, info = (load_checkpoint(weights) if _upload is None
                       else common.load_uploaded_checkpoint(_upload))
    except CheckpointError as exc:      # (one line for st.error)
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    problem = common.checkpoint_problem(model, info)
    return problem if problem else (model, info)


def digest_of(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p and Path(p).is_file():
            h.update(Path(p).read_bytes())
    return h.hexdigest()


if source == "from a run":
    if not with_ckpt:
        st.info(f"No run under `{root}` has a checkpoint yet.")
        st.stop()
    c1, c2 = st.columns([3, 1])
    run = common.pick_run("Run", with_ckpt, key="ck-run", container=c1)
    tags = [t for t in ("best", "last") if run.checkpoint_path(t).is_file()]
    tag = c2.radio("Which", tags, horizontal=True, key="ck-tag")
    weights = run.checkpoint_path(tag)
    digest = digest_of(weights, weights.with_suffix(".json"))
    result = load(digest, str(weights))
else:
    files = st.file_uploader(
        "A Tango checkpoint: the `.safetensors` weights and their `.json` side file", key="ck-up",
        accept_multiple_files=True,
        help="Read as safetensors + JSON only; pickles (torch.save .pt/.pth/.ckpt) are refused, "
             "never loaded. Kept in memory; on disk only while loading, in a private temporary "
             "folder removed right after.")
    if not files:
        st.info("Upload the two files of a checkpoint (e.g. `checkpoints/best.safetensors` and "
                "`checkpoints/best.json` of a run).")
        st.stop()
    try:
        upload = common.checkpoint_uploads(files)
    except common.UploadError as exc:
        st.error(f"Refused: {exc}")
        st.stop()
    digest = upload["digest"]
    result = load(digest, None, upload)

if isinstance(result, str):
    st.error(f"Refused: {result}")
    st.caption("Tango opens only its own checkpoints: safetensors weights plus a JSON side "
               "file naming the architecture, whose weights and embeddings are finite. No code "
               "from a checkpoint is ever executed.")
    st.stop()
model, info = result

from dml.models import describe_stages, parameter_counts  # noqa: E402

counts = parameter_counts(model)
m = info["model"]
cols = st.columns(5)
cols[0].metric("parameters", f"{counts['total']:,}")
cols[1].metric("epoch", info.get("epoch"))
cols[2].metric("step", info.get("step"))
cols[3].metric("embedding dim", m["embedding_dim"])
cols[4].metric("input", f"{m['in_channels']}×{m['image_size']}×{m['image_size']}")

best = info.get("best") or {}
if best:
    st.subheader("Metrics (checkpoint chosen on validation)")
    mrows = [{"split": split, **{k: v for k, v in best.get(split, {}).items()}}
             for split in ("val", "test") if best.get(split)]
    common.dataframe(pd.DataFrame(mrows), hide_index=True, key="ck-metrics")
    if best.get("utilization") is not None:
        st.caption(f"utilization {best['utilization']:.5f} · selected on "
                   f"{best.get('selected_on', 'validation')} at epoch {best.get('epoch')}")

left, right = st.columns(2)
with left:
    st.subheader("Parameters")
    common.dataframe(pd.DataFrame([{"part": k, "parameters": v} for k, v in counts.items()]),
                     hide_index=True, key="ck-params")
    st.subheader("Stages (shape after each)")
    stages = describe_stages(model, m["in_channels"], m["image_size"])
    common.dataframe(pd.DataFrame([{"stage": s["stage"], "name": s["name"],
                                    "shape": "×".join(map(str, s["shape"])),
                                    "values": s.get("numel")} for s in stages]),
                     hide_index=True, key="ck-stages")
with right:
    st.subheader("Architecture")
    st.code(str(model), language="text")
with st.expander("Config", expanded=False):
    st.json(info.get("config") or {})

# ---- export (dml export)
st.subheader("Export")
if source != "from a run":
    st.caption("Exports are made from a run (its checkpoints and evaluations): choose "
               "*from a run* above, or use `dml export RUN --format ...`.")
else:
    from dml.export import FORMATS, export_run, zip_folder  # noqa: E402

    x1, x2, x3 = st.columns([2, 1, 1])
    fmt = x1.selectbox("Format", list(FORMATS), format_func=lambda f: f"{f} — {FORMATS[f]}",
                       key="ck-export-format")
    ex_epoch, ex_split = tag, "test"
    if fmt == "projector":
        ev_epochs = run.eval_epochs()
        if ev_epochs:
            own = info.get("epoch")
            ex_epoch = x2.selectbox("Evaluation (epoch)", ev_epochs,
                                    index=ev_epochs.index(own) if own in ev_epochs
                                    else len(ev_epochs) - 1, key="ck-export-epoch")
            ex_split = x3.selectbox("Points", ["test", "train", "val", "all"],
                                    key="ck-export-split",
                                    help="the real points of that split (all: every split); "
                                         "the mixing strategy's synthetic points are added")
        else:
            x2.caption("This run saved no evaluations (train.save_embeddings).")
    else:
        x2.caption(f"the **{tag}** checkpoint (epoch {info.get('epoch')}); checked against the "
                   f"PyTorch model before the download is offered")
    ex_key = f"{run.id}|{tag}|{fmt}|{ex_epoch}|{ex_split}"
    if st.button("Prepare the export", key="ck-export"):
        import tempfile

        name = f"{run.id}-{fmt}-" + (f"epoch{ex_epoch:04d}-{ex_split}"
                                     if isinstance(ex_epoch, int) else tag)
        with st.spinner("Exporting…"):
            try:
                with tempfile.TemporaryDirectory(prefix="tango-export-") as tmp:
                    res = export_run(run, fmt, Path(tmp) / name, epoch=ex_epoch,
                                     split=ex_split)
                    data = zip_folder(res.path)
            except Exception as exc:   # ExportError, CheckpointError, RunFormatError, I/O
                st.session_state["ck-export-result"] = {
                    "key": ex_key, "error": (str(exc).splitlines() or [type(exc).__name__])[0]}
            else:
                st.session_state["ck-export-result"] = {
                    "key": ex_key, "name": f"{name}.zip", "data": data, "check": res.check,
                    "notes": res.notes, "files": res.files}
    done = st.session_state.get("ck-export-result")
    if done and done.get("key") == ex_key:
        if "error" in done:
            st.error(f"Export failed: {done['error']}")
        else:
            st.success(done["check"])
            for note in done["notes"]:
                st.info(note)
            st.download_button(f"Download {done['name']} ({len(done['data']) / 1e6:.1f} MB: "
                               f"{', '.join(done['files'])})", done["data"],
                               file_name=done["name"], mime="application/zip",
                               key="ck-export-download")

# ---- embed a data set
st.subheader("Embed a data set with this checkpoint")
from dml.data import list_datasets  # noqa: E402

cfg_data = (info.get("config") or {}).get("data", {})
names = list_datasets()
c1, c2, c3 = st.columns(3)
ds_name = c1.selectbox("Data set", names, index=names.index(cfg_data.get("name"))
                       if cfg_data.get("name") in names else 0, key="ck-ds")
split = c2.selectbox("Split", ["test", "val", "train"], key="ck-split")
limit = c3.number_input("At most images", 100, 20000, 2000, step=100, key="ck-limit")
ds_root = st.text_input("Data root (optional)", value=cfg_data.get("root") or "",
                        key="ck-root") if ds_name != "digits" else None


@st.cache_data(show_spinner="Embedding…", max_entries=16)
def embed_dataset(digest: str, _model, _info: dict, name: str, root: str | None, split: str,
                  limit: int, same_split_as: str):
    """Embeddings, labels, metrics and class names of a data set's split under the checkpoint
    loaded above (``digest`` names it: the cached model itself is not hashed)."""
    import torch

    from dml.data import load_dataset
    from dml.data.registry import dataset_for_config
    from dml.data.transforms import make_transform
    from dml.evaluation import embed, evaluate_embeddings

    model, info = _model, _info
    mm = info["model"]
    cd = json.loads(same_split_as)
    if cd.get("name") == name:   # the run's own data set: the very same splits
        ds = dataset_for_config(cd, root=root or None, image_size=mm["image_size"])
    else:
        ds = load_dataset(name, root or None, image_size=mm["image_size"])
    if ds.channels != mm["in_channels"]:
        raise ValueError(f"{name} has {ds.channels}-channel images; this model takes "
                         f"{mm['in_channels']}")
    sp = getattr(ds, split)
    if sp is None:
        raise ValueError(f"{name} has no {split} split")
    if len(sp) > limit:
        g = torch.Generator().manual_seed(0)
        sp = sp.subset(torch.randperm(len(sp), generator=g)[:limit].sort().values)
    emb = embed(model, sp, make_transform(ds, train=False), torch.device("cpu"))
    labels = sp.labels.numpy()
    metrics = evaluate_embeddings({"test": emb}, {"test": labels}, clustering=False)["test"]
    return emb, labels, metrics, dict(ds.class_names)


if st.button("Embed", key="ck-embed", type="primary"):
    st.session_state["ck-embed-on"] = True
if st.session_state.get("ck-embed-on"):
    try:
        emb, labels, metrics, names = embed_dataset(
            digest, model, info, ds_name, ds_root, split, int(limit), json.dumps(cfg_data))
    except Exception as exc:
        st.error(f"Cannot embed {ds_name}/{split}: {exc}")
    else:
        mc = st.columns(len(metrics))
        for c, (k, v) in zip(mc, metrics.items()):
            c.metric(k, f"{v:.3f}")
        from app.selection import build_point_table
        from dml.projection import fit_pca, pca_transform
        mean, comps = fit_pca(emb)
        pt = build_point_table({f"{split}_embeddings": emb, f"{split}_labels": labels},
                               {split: pca_transform(emb, mean, comps)})
        fig, _ = plots.map_figure(pt, class_names=names, height=480,
                                  title=f"PCA of {len(emb):,} {ds_name} {split} embeddings")
        st.plotly_chart(fig, key="ck-map", config={"displaylogo": False})
        st.caption(f"{len(np.unique(labels))} classes · embeddings {emb.shape[1]}-d")
