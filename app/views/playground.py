"""Mixing playground (teaching): two images and lambda -> the mixed image, where input-, feature-
and embedding-level mixes land in a trained run's map, the soft label, how each loss's positive
and negative terms change with lambda, and Embedding Expansion points between a same-class pair."""

import numpy as np
import streamlit as st
import torch

from app import common, mixlab, plots
from app.images import to_display
from app.selection import class_label
from dml.projection import best_epoch, knn_place, pca_transform, real_points

st.title("Mixing playground")
st.caption("Mixup in metric learning (Metrix): a mix of an image of class A and one of class B "
           "with weight λ is a positive of A with weight λ and a negative with weight 1 − λ.")
root = common.runs_root()
runs, _ = common.list_runs_and_errors(root)
runs = [r for r in runs if r.checkpoint_path("best").is_file() and r.eval_epochs()]
if not runs:
    common.no_runs_offer(root, key="demo-play")
    st.stop()

c0, c00 = st.columns([3, 1])
run = common.pick_run("Trained run (its best checkpoint and map)", runs, key="pg-run",
                      container=c0)
cfg = run.config()
epoch = best_epoch(run) or run.eval_epochs()[-1]
has_umap = common.cached_projection(run, epoch, "umap") is not None
method = c00.radio("Map", ["pca", "umap"] if has_umap else ["pca"], format_func=str.upper,
                   horizontal=True, key="pg-method",
                   help="PCA places new points exactly; on UMAP they are placed at the "
                        "weighted mean of their 10 nearest real points (UMAP's own transform "
                        "initialisation), which is instant.")
if common.cached_projection(run, epoch, method) is None:
    common.compute_projection_with_progress(run, epoch, method)
proj = common.cached_projection(run, epoch, method)
pt = common.point_table(run, epoch, method)
model, _info = common.run_checkpoint(run, "best")
ds = common.run_dataset(cfg)
names = dict(ds.class_names)
from dml.data.transforms import make_transform  # noqa: E402

eval_tf = make_transform(ds, train=False)
train_labels = ds.train.labels.numpy()
classes = np.unique(train_labels)


def cname(c):
    return class_label(c, names)


def image_picker(col, label, key, default_class_pos):
    c = col.selectbox(f"{label}: class", classes, index=min(default_class_pos, len(classes) - 1),
                      format_func=cname, key=f"{key}-class")
    members = np.flatnonzero(train_labels == c)
    j = col.number_input(f"{label}: image of that class", 0, len(members) - 1, 0,
                         key=f"{key}-img-{c}")
    return int(c), int(members[j])


cols = st.columns(4)
ca, ia = image_picker(cols[0], "Image 1", "pg-a", 0)
cb, ib = image_picker(cols[1], "Image 2", "pg-b", 1)
lam = cols[2].slider("λ (weight of image 1)", 0.0, 1.0, 0.5, 0.05, key="pg-lam")
stage = cols[3].slider("Feature-level: mix after stage", 1, model.num_stages, model.num_stages,
                       key="pg-stage",
                       help=f"{model.num_stages} = the last feature map, before pooling")

imgs = ds.train.load(torch.tensor([ia, ib]))                  # uint8 (2, C, H, W)
x = eval_tf(imgs)                                             # normalised float
show = to_display(imgs.numpy(), 96)
mixed = to_display(mixlab.mix_images(imgs[0].numpy(), imgs[1].numpy(), lam)[None], 96)[0]
i1, i2, i3, i4 = st.columns([1, 1, 1, 2])
i1.image(show[0], caption=f"image 1 · class {cname(ca)}", width=110)
i2.image(mixed, caption=f"input-level mix, λ = {lam:.2f}", width=110)
i3.image(show[1], caption=f"image 2 · class {cname(cb)}", width=110)
with i4:
    st.caption("Soft label of the mix")
    label = mixlab.soft_label(lam, ca, cb)
    cmap = plots.class_colors(pt.label[pt.real])
    st.plotly_chart(plots.soft_label_figure({f"class {cname(k)}": v for k, v in label.items()},
                                            [cmap.get(int(k), "#888888") for k in label]),
                    key="pg-label", config={"displaylogo": False, "staticPlot": True})

# ---- where the mixes land
lams = np.round(np.linspace(0, 1, 21), 4)
grid = np.unique(np.append(lams, lam))
paths = mixlab.mix_embeddings(model, x[0:1], x[1:2], grid, stage=stage)
real = real_points(common.load_eval(run, epoch))
x_ref = np.concatenate(list(real.values()))
xy_ref = np.concatenate([proj[s] for s in real])


def place(e):
    e = np.asarray(e, np.float32)
    if method == "pca":
        return pca_transform(e, proj["pca_mean"], proj["pca_components"])
    return knn_place(e, x_ref, xy_ref)


with torch.no_grad():
    pair_emb = model(x).numpy()
ci = int(np.flatnonzero(np.isclose(grid, lam))[0])
placed = {lvl: place(paths[lvl]) for lvl in mixlab.LEVELS}
current = {lvl: placed[lvl][ci] for lvl in mixlab.LEVELS}

st.subheader("Where the mixes land")
e1, e2 = st.columns([1, 3])
show_ee = e1.toggle("Embedding Expansion between image 1 and a same-class partner", True,
                    key="pg-ee")
members_a = np.flatnonzero(train_labels == ca)
partner_pos = e1.number_input("partner: image of class " + cname(ca), 0, len(members_a) - 1,
                              min(1, len(members_a) - 1), key=f"pg-partner-{ca}")
ip = int(members_a[partner_pos])
n_ee = e1.slider("expansion points n", 1, 8, 2, key="pg-ee-n")
with torch.no_grad():
    partner_emb = model(eval_tf(ds.train.load(torch.tensor([ip])))).numpy()[0]
extra = {}
if show_ee:
    ee = mixlab.expansion_points(pair_emb[0], partner_emb, n_ee)
    extra[f"Embedding Expansion (n={n_ee})"] = place(np.vstack([pair_emb[0], ee, partner_emb]))
visible = pt.real & np.isin(pt.split, ["train", "test"])
fig = plots.playground_figure(pt, placed, current, place(pair_emb), extra, class_names=names,
                              visible=visible, height=560)
with e2:
    st.plotly_chart(fig, key="pg-map", config={"displaylogo": False, "scrollZoom": True})
st.caption("Lines: each level's mix as λ goes from 0 (image 2) to 1 (image 1); stars: the "
           "current λ. Input- and feature-level mixes pass through the network, so their paths "
           "bend; the embedding-level mix follows the (re-normalised) chord.")
sims = {lvl: float(np.dot(paths[lvl][ci], pair_emb[0])) for lvl in mixlab.LEVELS}
mc = st.columns(3)
for c, lvl in zip(mc, mixlab.LEVELS):
    c.metric(f"{lvl}-level mix: cosine to image 1", f"{sims[lvl]:.3f}")

# ---- loss terms against lambda
st.subheader("How each loss sees the mix")
st.caption(f"Anchor: the partner image (class {cname(ca)}, clean). Reference: the "
           "embedding-level mix of image 1 and image 2, soft target λ. Pair losses weigh its "
           "positive term by λ and its negative term by 1 − λ; proxy losses see the mix as "
           "the anchor, with proxies at the class means of the run's training embeddings.")
ev = common.load_eval(run, epoch)
tr_emb, tr_lab = ev["train_embeddings"].astype(np.float32), ev["train_labels"]
proxies = mixlab.class_proxies(tr_emb, tr_lab, classes)
pos = {int(c): i for i, c in enumerate(classes)}
terms = mixlab.loss_terms_vs_lambda(partner_emb, paths["embedding"], grid, pos[ca], pos[cb],
                                    len(classes), proxies=proxies)
st.plotly_chart(plots.loss_terms_figure(grid, mixlab.terms_for_plot(terms), current=lam),
                key="pg-terms", config={"displaylogo": False})
