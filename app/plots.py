"""Pure Plotly figure builders of the app (WebGL scatter for maps). No Streamlit here.

Maps of many points (``map_figure``): up to :data:`EXACT_MAX_POINTS` visible real points every
point is a WebGL marker. Above that, the browser would spend seconds drawing them (100k points:
2.2 s for Plotly alone in headless Chromium, ~0.5 s per zoom or pan frame, 3.5 MB sent), so the
real points become a class-coloured density image of all of them (a PNG drawn under the axes, in
data coordinates; ~0.2 MB) with a fixed random sample of :data:`SAMPLE_POINTS` of them drawn
exactly on top, for hover, zoom detail and lasso; a selection is resolved on the server from its
lasso / box over every point. Synthetic points are always exact: small thin crosses, fainter the
more there are, so that the real points beneath stay readable.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly import colors as pcolors
from plotly.subplots import make_subplots

from app.selection import PointTable, class_label, describe_points

PALETTE = pcolors.qualitative.Plotly + pcolors.qualitative.Dark24 + pcolors.qualitative.Light24
SPLIT_SYMBOLS = {"train": "circle", "val": "square", "test": "diamond", "gallery": "triangle-up"}
SYNTHETIC_SYMBOL = "x-thin-open"
SYNTHETIC_COLOR = "#222222"
MAX_LEGEND_CLASSES = 24
# Real points get hover texts with class names (one Python string each) only on maps this small;
# larger maps hover with numbers made in the browser, and name their classes in the legend.
MAX_NAMED_HOVER_POINTS = 2000
# Level of detail: maps of more visible real points than this draw a density image of them all
# and an exact sample of SAMPLE_POINTS on top (see the module doc).
EXACT_MAX_POINTS = 20_000
SAMPLE_POINTS = 8_000
DENSITY_PIXELS = 900           # the density image's long side (about the plot's width)


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


# --------------------------------------------------------------------------- level of detail

def _rgb(color: str) -> tuple[int, int, int]:
    if color.startswith("#"):
        return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))      # type: ignore[return-value]
    v = [int(float(c)) for c in color[color.index("(") + 1:color.index(")")].split(",")[:3]]
    return v[0], v[1], v[2]


def sample_ids(ids: np.ndarray, n_points: int, k: int, seed: int = 0) -> np.ndarray:
    """A fixed random sample (sorted) of at most ``k`` of ``ids`` (rows of a table of
    ``n_points``): every row has one random priority, and the ``k`` of highest priority among
    ``ids`` are kept, so a point sampled stays sampled when filters add or remove others."""
    ids = np.asarray(ids)
    if len(ids) <= k:
        return ids
    prio = np.random.default_rng([seed, n_points]).random(n_points)[ids]
    return np.sort(ids[np.argpartition(prio, k - 1)[:k]])


def _blur(a: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] / 4 blur along both image axes (a point spreads over 3 x 3 pixels)."""
    out = a * 0.5
    out[1:] += a[:-1] * 0.25
    out[:-1] += a[1:] * 0.25
    b = out * 0.5
    b[:, 1:] += out[:, :-1] * 0.25
    b[:, :-1] += out[:, 1:] * 0.25
    return b


def density_image(xy: np.ndarray, rgb: np.ndarray, bounds: tuple[float, float, float, float],
                  pixels: int = DENSITY_PIXELS, point_alpha: float = 0.55,
                  passes: int = 2) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGBA uint8 image (H, W, 4) of points ``xy`` (n, 2) of colours ``rgb`` (n, 3) inside
    ``bounds`` (x0, x1, y0, y1), row 0 at the top, long side ``pixels``: each point a small
    blurred dot (``passes`` [1, 2, 1] blurs), the colour of a pixel the mean colour of the points
    covering it, its opacity that of overlapping markers of opacity ``point_alpha`` each."""
    x0, x1, y0, y1 = bounds
    w_span, h_span = max(x1 - x0, 1e-9), max(y1 - y0, 1e-9)
    if w_span >= h_span:
        w, h = pixels, max(8, int(round(pixels * h_span / w_span)))
    else:
        w, h = max(8, int(round(pixels * w_span / h_span))), pixels
    ix = np.clip(((xy[:, 0] - x0) / w_span * w).astype(np.int64), 0, w - 1)
    iy = np.clip(((y1 - xy[:, 1]) / h_span * h).astype(np.int64), 0, h - 1)
    flat = iy * w + ix
    count = np.bincount(flat, minlength=w * h).astype(np.float32).reshape(h, w)
    sums = [np.bincount(flat, weights=rgb[:, c], minlength=w * h).astype(np.float32)
            .reshape(h, w) for c in range(3)]
    for _ in range(passes):
        count = _blur(count)
        sums = [_blur(c) for c in sums]
    dot = np.zeros((5, 5), np.float32)
    dot[2, 2] = 1.0
    for _ in range(passes):
        dot = _blur(dot)
    peak = float(dot[2, 2])                            # one point's weight at its centre
    alpha = 1.0 - (1.0 - point_alpha) ** (count / peak)
    safe = np.maximum(count, 1e-12)
    img = np.zeros((h, w, 4), np.uint8)
    for c in range(3):
        img[..., c] = np.clip(sums[c] / safe, 0, 255).astype(np.uint8)
    img[..., 3] = np.clip(alpha * 255, 0, 255).astype(np.uint8)
    img[count < 1e-4 * peak] = 0
    return img, (w, h)


def png_data_uri(img: np.ndarray, colors: int = 256) -> str:
    """A uint8 image (H, W, 4) RGBA, (H, W, 3) RGB or (H, W) grey as a PNG data URI, quantised
    to ``colors`` colours (with alpha) when more and ``colors`` is not 0 (a 900 px density
    image of 100 classes: 160 KB instead of 770 KB, in 20 ms)."""
    from PIL import Image

    img = np.ascontiguousarray(img, np.uint8)
    im = Image.fromarray(img, "RGBA" if img.ndim == 3 and img.shape[2] == 4 else None)
    if colors:
        try:
            im = im.quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
        except (ValueError, AttributeError):   # an older Pillow: the full image
            pass
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bounds(xy: np.ndarray, pad: float = 0.03) -> tuple[float, float, float, float]:
    lo, hi = xy.min(axis=0).astype(float), xy.max(axis=0).astype(float)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - span * pad, hi + span * pad
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def pile_opacity(xy: np.ndarray, bounds: tuple[float, float, float, float] | None = None,
                 cells: int = 160, alone: float = 0.8, pile: float = 0.5) -> np.ndarray:
    """Per-point opacity (n,) of markers at ``xy`` (n, 2) such that a point alone is drawn at
    ``alone`` and a pile of overlapping ones (sharing a cell of a ``cells``-wide grid over
    ``bounds``, about a marker wide on a plot) adds up to ``pile`` at most: m markers of opacity
    a cover 1 - (1 - a)^m, so a = 1 - (1 - pile)^(1/m)."""
    if not len(xy):
        return np.zeros(0, np.float32)
    x0, x1, y0, y1 = bounds or _bounds(xy)
    size = max(x1 - x0, y1 - y0, 1e-9) / cells
    gx = np.floor((xy[:, 0] - x0) / size).astype(np.int64)
    gy = np.floor((xy[:, 1] - y0) / size).astype(np.int64)
    _, inverse, counts = np.unique(gx * (cells * 4 + 7) + gy, return_inverse=True,
                                   return_counts=True)
    m = counts[inverse.ravel()].astype(np.float64)
    a = np.where(m <= 1, alone, 1.0 - (1.0 - pile) ** (1.0 / m))
    return np.minimum(a, alone).astype(np.float32)


def synthetic_marker(xy: np.ndarray, marker_size: int = 6,
                     bounds: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """Synthetic points: thin dark crosses (outlines only) whose opacity falls where they pile
    up (:func:`pile_opacity`: one alone at 0.8, a pile of any size at most 0.5 in all), so the
    real points under them stay readable however many synthetic points land on a cluster."""
    return dict(size=marker_size + 1, symbol=SYNTHETIC_SYMBOL, color=SYNTHETIC_COLOR,
                opacity=np.round(pile_opacity(xy, bounds), 3),
                line=dict(width=1.2, color=SYNTHETIC_COLOR))


def map_figure(pt: PointTable, visible: np.ndarray | None = None,
               class_names: Mapping[int, str] | None = None, title: str | None = None,
               height: int = 600, marker_size: int = 6,
               exact_max: int | None = None) -> tuple[go.Figure, list[np.ndarray]]:
    """The embedding map: one WebGL trace per split (real points coloured by class, one marker
    shape per split) and one for synthetic points (thin dark crosses, hover: kind, parents'
    classes, lambda). Every point carries its id in ``customdata`` (the first column for real
    points). ``class_names`` name the classes in the legend chips and the synthetic points'
    hover, and in the real points' hover on maps of at most ``MAX_NAMED_HOVER_POINTS`` real
    points (larger ones hover with class ids, made in the browser at no cost here).

    Level of detail: with more than ``exact_max`` (default :data:`EXACT_MAX_POINTS`) visible
    real points, those are drawn as a density image of them all plus a fixed sample of
    :data:`SAMPLE_POINTS` exact markers (the split traces then hold the sample only).
    ``fig.layout.meta`` says which: ``{"rendering": "points" | "density", "real": n,
    "drawn": markers drawn}``. Returns (figure, ids per trace)."""
    visible = np.ones(len(pt), bool) if visible is None else visible
    exact_max = EXACT_MAX_POINTS if exact_max is None else exact_max
    real_vis = visible & pt.real
    n_real = int(real_vis.sum())
    dense = n_real > exact_max
    drawn = real_vis
    if dense:
        drawn = np.zeros(len(pt), bool)
        drawn[sample_ids(np.flatnonzero(real_vis), len(pt), min(SAMPLE_POINTS, exact_max))] = True
    shown = sorted({int(c) for c in pt.label[real_vis]})
    named = {c: str(class_names[c]) for c in shown
             if class_names and c in class_names and str(class_names[c]) != str(c)}
    named_hover = bool(named) and int(drawn.sum()) <= MAX_NAMED_HOVER_POINTS
    colors = class_colors(pt.label[pt.real]) if len(pt) else {}
    order = {c: i for i, c in enumerate(colors)}           # class id -> colour index
    scale = discrete_colorscale(list(colors.values()))
    if len(pt) and colors:
        keys = np.fromiter(order.keys(), np.int64, len(order))
        pos = np.clip(np.searchsorted(keys, pt.label), 0, len(keys) - 1)
        color_index = np.where(keys[pos] == pt.label, pos, 0).astype(np.int32)
    else:
        color_index = np.zeros(len(pt), np.int32)
    fig = go.Figure()
    trace_ids: list[np.ndarray] = []
    legend_entries: list[tuple[str, str, str]] = []
    if dense:   # every visible real point, as an image under the markers
        ids = np.flatnonzero(real_vis)
        vis_xy = pt.xy[visible]
        x0, x1, y0, y1 = _bounds(vis_xy)
        palette = np.array([_rgb(c) for c in colors.values()], np.float32)
        img, _ = density_image(pt.xy[ids], palette[color_index[ids]], (x0, x1, y0, y1))
        fig.add_layout_image(source=png_data_uri(img), xref="x", yref="y", x=x0, y=y1,
                             sizex=x1 - x0, sizey=y1 - y0, sizing="stretch", layer="below",
                             opacity=1.0)
        # an invisible frame of the image's corners: autorange covers the whole image
        fig.add_trace(go.Scattergl(x=[x0, x1], y=[y0, y1], mode="markers", hoverinfo="skip",
                                   marker=dict(size=1, opacity=0), showlegend=False,
                                   name="extent"))
        trace_ids.append(np.zeros(0, np.int64))
    for split, symbol in SPLIT_SYMBOLS.items():
        ids = np.flatnonzero(drawn & (pt.split == split))
        if not len(ids):
            continue
        n_split = int((real_vis & (pt.split == split)).sum())
        if named_hover:    # hover text per point
            hover = dict(customdata=ids, text=np.array(describe_points(pt, ids, class_names)),
                         hovertemplate="%{text}<extra></extra>")
        else:              # compact: (id, index, class) as numbers, the text made in the browser
            hover = dict(customdata=np.stack([ids, pt.index[ids], pt.label[ids]], 1)
                         .astype(np.int32),
                         hovertemplate=f"{split} #%{{customdata[1]}}: class %{{customdata[2]}}"
                                       "<extra></extra>")
        marker = dict(size=marker_size, symbol=symbol, opacity=0.8,
                      color=color_index[ids].astype(np.uint8 if len(colors) <= 256 else np.int32),
                      colorscale=scale, cmin=-0.5, cmax=len(colors) - 0.5, showscale=False,
                      line=dict(width=0))
        if dense:          # the sample: smaller, over the image
            marker.update(size=max(3, marker_size - 2), opacity=0.9)
        fig.add_trace(go.Scattergl(
            x=pt.xy[ids, 0], y=pt.xy[ids, 1], mode="markers",
            name=split, legendgroup=split, showlegend=False, **hover, marker=marker))
        trace_ids.append(ids)
        legend_entries.append((split, f"{split} ({n_split:,})", symbol))
    syn = np.flatnonzero(visible & (pt.split == "synthetic"))
    if len(syn):
        fig.add_trace(go.Scattergl(
            x=pt.xy[syn, 0], y=pt.xy[syn, 1], mode="markers",
            name="synthetic", customdata=syn, legendgroup="synthetic", showlegend=False,
            text=np.array(describe_points(pt, syn, class_names)),
            hovertemplate="%{text}<extra></extra>",
            marker=synthetic_marker(pt.xy[syn], marker_size, _bounds(pt.xy[visible]))))
        trace_ids.append(syn)
        legend_entries.append(("synthetic", f"synthetic ({len(syn):,})", SYNTHETIC_SYMBOL))
    # legend chips without data (plain SVG traces: they cost the WebGL renderer nothing)
    for group, name, symbol in legend_entries:   # grey: the marker shape of each split
        chip = dict(size=9, symbol=symbol, color="#888888")
        if group == "synthetic":
            chip.update(color=SYNTHETIC_COLOR, line=dict(width=1.5, color=SYNTHETIC_COLOR))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 legendgroup=group, hoverinfo="skip", marker=chip))
    if 0 < len(shown) <= MAX_LEGEND_CLASSES:   # one legend chip per class (no data)
        for c in shown:
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=f"class {class_label(c, named)}",
                marker=dict(size=9, color=colors[c], symbol="circle"), hoverinfo="skip",
                legendgroup="classes", showlegend=True))
    _layout(fig, title, height, dragmode="lasso", uirevision="map",
            legend=dict(itemsizing="constant", y=0.94, yanchor="top"),
            xaxis=dict(showticklabels=False, title=None, zeroline=False),
            yaxis=dict(showticklabels=False, title=None, zeroline=False, scaleanchor="x"),
            meta={"rendering": "density" if dense else "points", "real": n_real,
                  "drawn": int(drawn.sum()) + len(syn)})
    if dense:
        fig.add_annotation(text=f"{n_real:,} points: density of all, "
                                f"{int(drawn.sum()):,} drawn exactly (hover, lasso selects all)",
                           xref="paper", yref="paper", x=0, y=1, xanchor="left",
                           yanchor="bottom", showarrow=False, font=dict(size=11, color="#666"))
    return fig, trace_ids


FOCUS_COLOR = "#111111"
RIGHT_COLOR, WRONG_COLOR = "#1a9850", "#d73027"


def add_focus(fig: go.Figure, pt: PointTable, focus: int, neighbours: Sequence[int] = (),
              class_names: Mapping[int, str] | None = None) -> go.Figure:
    """Rings on a map (``map_figure``'s): a large dark one on the point ``focus`` (an id of
    ``pt``) and smaller ones on its ``neighbours`` (ids, nearest first), green where one has
    the focus' class, red where not; SVG traces over the WebGL markers, each point's id in
    ``customdata`` (a selection over them selects the points)."""
    nb = np.asarray(list(neighbours), np.int64)
    if len(nb):
        right = pt.label[nb] == pt.label[focus]
        text = [f"{rank}. {d} ({'right' if r else 'wrong'})" for rank, (d, r) in
                enumerate(zip(describe_points(pt, nb, class_names), right), 1)]
        fig.add_trace(go.Scatter(
            x=pt.xy[nb, 0], y=pt.xy[nb, 1], mode="markers", customdata=nb, text=text,
            hovertemplate="%{text}<extra></extra>",
            name=f"its {len(nb)} nearest (green right, red wrong)",
            marker=dict(size=15, symbol="circle-open", line=dict(width=2.5),
                        color=np.where(right, RIGHT_COLOR, WRONG_COLOR).tolist())))
    fig.add_trace(go.Scatter(
        x=pt.xy[[focus], 0], y=pt.xy[[focus], 1], mode="markers", customdata=[focus],
        text=describe_points(pt, np.array([focus]), class_names),
        hovertemplate="focus: %{text}<extra></extra>", name="focus",
        marker=dict(size=24, symbol="circle-open", color=FOCUS_COLOR, line=dict(width=3.5))))
    return fig


def with_alpha(color: str, alpha: float) -> str:
    """A plotly colour ('#636efa', 'rgb(...)' or 'rgba(...)') as 'rgba(r, g, b, alpha)'."""
    r, g, b = _rgb(color)
    return f"rgba({r}, {g}, {b}, {alpha:g})"


def color_key_html(entries: Sequence[tuple[str, str]]) -> str:
    """A colour key shared by several charts: one swatch and label per (colour, label), in
    columns that wrap (labels HTML-escaped)."""
    import html

    items = "".join(
        f'<div style="display:flex;align-items:center;gap:6px;min-width:0">'
        f'<span style="flex:none;width:22px;height:4px;border-radius:2px;background:{c}"></span>'
        f'<span style="font-size:0.8rem;overflow:hidden;text-overflow:ellipsis;'
        f'white-space:nowrap" title="{html.escape(label)}">{html.escape(label)}</span></div>'
        for c, label in entries)
    return ('<div style="display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));'
            f'gap:2px 18px;margin:4px 0 10px 0">{items}</div>')


def curves_figure(series: Sequence[Mapping[str, Any]], title: str | None = None,
                  ytitle: str | None = None, xtitle: str = "epoch", height: int = 340,
                  legend: bool = True) -> go.Figure:
    """Line chart; each series: {'name', 'x', 'y', optional 'dash', 'color', 'group', 'band'}
    ('band': (low, high) per x, drawn as a shaded area under the line, named '<name> band').
    ``legend``: False when the page shows one key for every chart; above 12 lines the hover
    shows the nearest line only (a unified hover of hundreds of runs covers the chart)."""
    fig = go.Figure()
    for s in series:
        if s.get("band") is not None:
            lo, hi = (list(v) for v in s["band"])
            fig.add_trace(go.Scatter(x=list(s["x"]) + list(s["x"])[::-1], y=hi + lo[::-1],
                                     fill="toself", mode="lines", line=dict(width=0),
                                     fillcolor=with_alpha(s.get("color") or PALETTE[0], 0.18),
                                     name=f"{s['name']} band", legendgroup=s.get("group"),
                                     showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=list(s["x"]), y=list(s["y"]), mode="lines+markers",
                                 name=s["name"], legendgroup=s.get("group"),
                                 line=dict(dash=s.get("dash"), color=s.get("color"))))
    _layout(fig, title, height, xaxis_title=xtitle, yaxis_title=ytitle,
            hovermode="x unified" if len(series) <= 12 else "closest", showlegend=legend)
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
    for tr in fig.data:   # the points (not the legend chips, nor a density image's frame)
        if tr.name in SPLIT_SYMBOLS or tr.name == "synthetic":
            tr.marker.opacity = 0.25
    for im in fig.layout.images:
        im.opacity = 0.35
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
