"""Pure Plotly figure builders of the app (WebGL scatter for maps). No Streamlit here."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly import colors as pcolors
from plotly.subplots import make_subplots

from app.selection import PointTable, class_label, describe_points

PALETTE = pcolors.qualitative.Plotly + pcolors.qualitative.Dark24 + pcolors.qualitative.Light24
SPLIT_SYMBOLS = {"train": "circle", "val": "square", "test": "diamond", "gallery": "triangle-up"}
SYNTHETIC_SYMBOL = "x"
SYNTHETIC_COLOR = "#222222"
MAX_LEGEND_CLASSES = 24
# Real points get hover texts with class names (one Python string each) only on maps this small;
# larger maps hover with numbers made in the browser, and name their classes in the legend.
MAX_NAMED_HOVER_POINTS = 2000


def class_colors(classes: Iterable[int]) -> dict[int, str]:
    """A stable colour per class id (sorted order, palette cycled)."""
    return {int(c): PALETTE[i % len(PALETTE)] for i, c in enumerate(sorted({int(c) for c in classes}))}


def discrete_colorscale(colors: Sequence[str]) -> list[list]:
    """A step colour scale: value i (0..K-1, with cmin=-0.5, cmax=K-0.5) -> colors[i]. Numeric
    colours validate and serialise far faster than one colour string per point."""
    k = max(1, len(colors))
    out = []
    for i, c in enumerate(colors):
        out += [[i / k, c], [(i + 1) / k, c]]
    return out or [[0, "#888888"], [1, "#888888"]]


def _layout(fig: go.Figure, title: str | None = None, height: int = 560, **kw) -> go.Figure:
    kw.setdefault("legend", dict(itemsizing="constant"))
    if title is not None:   # no empty title object: older Streamlit themes print "undefined"
        kw["title"] = title
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40 if title else 30, b=10), **kw)
    return fig


def placeholder_figure(height: int = 600, text: str = "loading the map…") -> go.Figure:
    """An empty map frame shown while the real map is prepared."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=16, color="#888888"))
    return _layout(fig, None, height, xaxis=dict(visible=False), yaxis=dict(visible=False))


def map_figure(pt: PointTable, visible: np.ndarray | None = None,
               class_names: Mapping[int, str] | None = None, title: str | None = None,
               height: int = 600, marker_size: int = 6) -> tuple[go.Figure, list[np.ndarray]]:
    """The embedding map: one WebGL trace per split (real points coloured by class, one marker
    shape per split) and one for synthetic points (dark crosses, hover: kind, parents' classes,
    lambda). Every point carries its id in ``customdata`` (the first column for real points).
    ``class_names`` name the classes in the legend chips and the synthetic points' hover, and
    in the real points' hover on maps of at most ``MAX_NAMED_HOVER_POINTS`` real points (larger
    ones hover with class ids, made in the browser at no cost here).
    Returns (figure, ids per trace)."""
    visible = np.ones(len(pt), bool) if visible is None else visible
    shown = sorted({int(c) for c in pt.label[visible & pt.real]})
    named = {c: str(class_names[c]) for c in shown
             if class_names and c in class_names and str(class_names[c]) != str(c)}
    named_hover = bool(named) and int((visible & pt.real).sum()) <= MAX_NAMED_HOVER_POINTS
    colors = class_colors(pt.label[pt.real]) if len(pt) else {}
    order = {c: i for i, c in enumerate(colors)}           # class id -> colour index
    scale = discrete_colorscale(list(colors.values()))
    color_index = np.array([order.get(int(c), 0) for c in pt.label], np.int32) if len(pt) \
        else np.zeros(0, np.int32)
    fig = go.Figure()
    trace_ids: list[np.ndarray] = []
    legend_entries: list[tuple[str, str, str]] = []
    for split, symbol in SPLIT_SYMBOLS.items():
        ids = np.flatnonzero(visible & (pt.split == split))
        if not len(ids):
            continue
        if named_hover:    # hover text per point
            hover = dict(customdata=ids, text=np.array(describe_points(pt, ids, class_names)),
                         hovertemplate="%{text}<extra></extra>")
        else:              # compact: (id, index, class) as numbers, the text made in the browser
            hover = dict(customdata=np.stack([ids, pt.index[ids], pt.label[ids]], 1)
                         .astype(np.int32),
                         hovertemplate=f"{split} #%{{customdata[1]}}: class %{{customdata[2]}}"
                                       "<extra></extra>")
        fig.add_trace(go.Scattergl(
            x=np.round(pt.xy[ids, 0], 4), y=np.round(pt.xy[ids, 1], 4), mode="markers",
            name=split, legendgroup=split, showlegend=False, **hover,
            marker=dict(size=marker_size, symbol=symbol, opacity=0.8,
                        color=color_index[ids], colorscale=scale, cmin=-0.5,
                        cmax=len(colors) - 0.5, showscale=False, line=dict(width=0))))
        trace_ids.append(ids)
        legend_entries.append((split, f"{split} ({len(ids):,})", symbol))
    syn = np.flatnonzero(visible & (pt.split == "synthetic"))
    if len(syn):
        fig.add_trace(go.Scattergl(
            x=np.round(pt.xy[syn, 0], 4), y=np.round(pt.xy[syn, 1], 4), mode="markers",
            name="synthetic", customdata=syn, legendgroup="synthetic", showlegend=False,
            text=np.array(describe_points(pt, syn, class_names)),
            hovertemplate="%{text}<extra></extra>",
            marker=dict(size=marker_size + 1, symbol=SYNTHETIC_SYMBOL, color=SYNTHETIC_COLOR,
                        opacity=0.7)))
        trace_ids.append(syn)
        legend_entries.append(("synthetic", f"synthetic ({len(syn):,})", SYNTHETIC_SYMBOL))
    # legend chips without data (plain SVG traces: they cost the WebGL renderer nothing)
    for group, name, symbol in legend_entries:   # grey: the marker shape of each split
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                   legendgroup=group, hoverinfo="skip",
                                   marker=dict(size=9, symbol=symbol,
                                               color=SYNTHETIC_COLOR if group == "synthetic"
                                               else "#888888")))
    if 0 < len(shown) <= MAX_LEGEND_CLASSES:   # one legend chip per class (no data)
        for c in shown:
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=f"class {class_label(c, named)}",
                marker=dict(size=9, color=colors[c], symbol="circle"), hoverinfo="skip",
                legendgroup="classes", showlegend=True))
    _layout(fig, title, height, dragmode="lasso", uirevision="map",
            legend=dict(itemsizing="constant", y=0.94, yanchor="top"),
            xaxis=dict(showticklabels=False, title=None, zeroline=False),
            yaxis=dict(showticklabels=False, title=None, zeroline=False, scaleanchor="x"))
    return fig, trace_ids


def curves_figure(series: Sequence[Mapping[str, Any]], title: str | None = None,
                  ytitle: str | None = None, xtitle: str = "epoch", height: int = 340) -> go.Figure:
    """Line chart; each series: {'name', 'x', 'y', optional 'dash', 'color', 'group'}."""
    fig = go.Figure()
    for s in series:
        fig.add_trace(go.Scatter(x=list(s["x"]), y=list(s["y"]), mode="lines+markers",
                                 name=s["name"], legendgroup=s.get("group"),
                                 line=dict(dash=s.get("dash"), color=s.get("color"))))
    _layout(fig, title, height, xaxis_title=xtitle, yaxis_title=ytitle, hovermode="x unified")
    xs = [x for s in series for x in s["x"]]
    if xs and max(xs) - min(xs) <= 20 and all(float(x).is_integer() for x in xs):
        fig.update_xaxes(dtick=1)              # whole epochs
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0),
                      margin=dict(b=10))
    return fig


def histogram_figure(groups: Mapping[str, np.ndarray], title: str | None = None,
                     xtitle: str | None = None, bins: int = 40, height: int = 340) -> go.Figure:
    """Overlaid histograms (probability density) of several value sets, shared bins."""
    vals = [np.asarray(v, float) for v in groups.values() if len(v)]
    fig = go.Figure()
    if vals:
        lo = min(float(v.min()) for v in vals)
        hi = max(float(v.max()) for v in vals)
        size = (hi - lo) / bins if hi > lo else 1.0
        for name, v in groups.items():
            if len(v):
                fig.add_trace(go.Histogram(x=np.asarray(v, float), name=name, opacity=0.55,
                                           histnorm="probability density",
                                           xbins=dict(start=lo, end=hi + size, size=size)))
    return _layout(fig, title, height, barmode="overlay", xaxis_title=xtitle,
                   yaxis_title="density")


def soft_label_figure(label: Mapping[str, float], colors: Sequence[str] | None = None,
                      height: int = 220) -> go.Figure:
    """Bar chart of a soft label (class -> membership), bars in the classes' map colours."""
    fig = go.Figure(go.Bar(x=list(label.keys()), y=list(label.values()),
                           text=[f"{v:.2f}" for v in label.values()], textposition="auto",
                           marker_color=list(colors or PALETTE[:len(label)])))
    return _layout(fig, None, height, yaxis=dict(range=[0, 1], title="membership"))


def loss_terms_figure(lams: np.ndarray, terms: Mapping[str, Mapping[str, np.ndarray]],
                      current: float | None = None, cols: int = 4,
                      height_per_row: int = 230) -> go.Figure:
    """Small multiples: for each loss, its positive and negative terms against lambda."""
    names = list(terms)
    rows = max(1, -(-len(names) // cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.06,
                        vertical_spacing=0.16)
    term_colors = {"pos": PALETTE[0], "neg": PALETTE[1], "ap": PALETTE[0], "an": PALETTE[1],
                   "pos_sim": PALETTE[0], "ce": PALETTE[1], "total": PALETTE[2]}
    term_dash = {"ap": "dot", "an": "dot", "pos_sim": "dash", "ce": "dash"}
    seen: set[str] = set()
    for i, loss in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        for j, (tname, values) in enumerate(terms[loss].items()):
            fig.add_trace(go.Scatter(x=lams, y=values, mode="lines", name=tname,
                                     legendgroup=tname, showlegend=tname not in seen,
                                     line=dict(color=term_colors.get(tname, PALETTE[3 + j]),
                                               dash=term_dash.get(tname))),
                          row=r, col=c)
            seen.add(tname)
        if current is not None:
            fig.add_vline(x=current, line_dash="dot", line_color="grey", row=r, col=c)
    fig.update_xaxes(title_text="λ", range=[0, 1])
    return _layout(fig, None, rows * height_per_row + 40)


def playground_figure(background: PointTable, paths: Mapping[str, np.ndarray],
                      current: Mapping[str, np.ndarray], pair: np.ndarray,
                      extra: Mapping[str, np.ndarray] | None = None,
                      class_names: Mapping[int, str] | None = None,
                      visible: np.ndarray | None = None, height: int = 560) -> go.Figure:
    """A run's map (real points, faint) with the path of each mixing level as lambda goes from 0
    to 1, the mixes at the current lambda (stars), the pair (large circles) and optional extra
    points (e.g. Embedding Expansion points)."""
    fig, _ = map_figure(background, visible, class_names=class_names, height=height,
                        marker_size=5)
    for tr in fig.data:
        if tr.x is not None and len(tr.x) and tr.x[0] is not None:
            tr.marker.opacity = 0.25
    level_colors = {"input": "#d62728", "feature": "#9467bd", "embedding": "#ff7f0e"}
    for i, (level, xy) in enumerate(paths.items()):
        color = level_colors.get(level, PALETTE[(i + 3) % len(PALETTE)])
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="lines", name=f"{level}-level mix",
                                 line=dict(color=color, width=3), legendgroup=level))
        if level in current:
            p = current[level]
            fig.add_trace(go.Scatter(x=[p[0]], y=[p[1]], mode="markers", showlegend=False,
                                     legendgroup=level, hovertext=f"{level}-level mix",
                                     marker=dict(symbol="star", size=18, color=color,
                                                 line=dict(width=1, color="black"))))
    fig.add_trace(go.Scatter(x=pair[:, 0], y=pair[:, 1], mode="markers+text", name="the pair",
                             text=["image 1", "image 2"][:len(pair)], textposition="top center",
                             marker=dict(size=16, color="white", line=dict(width=3, color="black"))))
    for name, xy in (extra or {}).items():
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers+lines", name=name,
                                 marker=dict(symbol="diamond", size=11, color="#2ca02c",
                                             line=dict(width=1, color="black")),
                                 line=dict(color="#2ca02c", dash="dot")))
    fig.update_layout(dragmode="pan")
    return fig
