"""Pure logic of the "Retrieval failures" page: what each query of an evaluation retrieves (from
the evaluation file's embeddings, ranked by ``dml.metrics.query_retrieval`` as the metrics rank
them), which queries to show in which order, the queries two runs disagree on, and the HTML of a
row of thumbnails. No Streamlit here; every function is unit-tested."""

from __future__ import annotations

import html
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dml.metrics import query_retrieval, reference_split, split_retrieval_args
from dml.runs import EVAL_SPLITS

K_MAX = 10                        # neighbours kept per query (the page shows up to this many)
PAGE = 20                         # query rows the page shows at first, and adds on demand
QUERY_SPLITS = ("test", "val")    # the splits whose queries the evaluation scores
REAL_SPLITS = EVAL_SPLITS
ORDERS = {"lowest": "lowest AP@R first", "highest": "highest AP@R first",
          "index": "query index"}
RIGHT, WRONG, QUERY = "#1a9850", "#d73027", "#4a5a7a"   # border colours


class NoRetrieval(ValueError):
    """An evaluation whose queries cannot be ranked; the message says why, in one line."""


def saved_splits(names: Iterable[str]) -> list[str]:
    """The real splits an evaluation file holds embeddings and labels of (``names``: its
    members)."""
    names = set(names)
    return [s for s in REAL_SPLITS if f"{s}_embeddings" in names and f"{s}_labels" in names]


def query_splits(names: Iterable[str]) -> list[str]:
    """The splits of an evaluation file whose queries can be ranked (test first)."""
    have = saved_splits(names)
    return [s for s in QUERY_SPLITS if s in have]


def read_retrieval_arrays(eval_file: str | os.PathLike, split: str
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(embeddings, labels) by split of the queries of ``split`` and of the split they are
    ranked against (``dml.metrics.reference_split``: the gallery of a query/gallery data
    set), read from an evaluation npz without its other members. ``NoRetrieval`` says what is
    missing: every embedding (``train.save_embeddings`` was none) or this split."""
    with np.load(eval_file, allow_pickle=False) as z:
        have = saved_splits(z.files)
        if not have:
            raise NoRetrieval("this evaluation has no saved embeddings "
                              "(train.save_embeddings was none)")
        if split not in have:
            raise NoRetrieval(f"this evaluation has no {split} split to rank (saved: "
                              f"{', '.join(have)})")
        wanted = {split, reference_split(split, have)}
        emb = {s: z[f"{s}_embeddings"] for s in wanted}
        labels = {s: z[f"{s}_labels"] for s in wanted}
    return emb, labels


def query_results(eval_file: str | os.PathLike, split: str = "test", k: int = K_MAX
                  ) -> dict[str, Any]:
    """What each query of ``split`` retrieves, as the evaluation ranks it: {"split",
    "ref_split" (the split the neighbours index), "labels" (m,), "ref_labels" (n,), and the
    per-query arrays of ``dml.metrics.QueryRetrieval``: "ap", "r", "valid", "top1",
    "neighbours" (m, k), "correct" (m, k)}. Only numpy arrays and strings (cacheable)."""
    emb, labels = read_retrieval_arrays(eval_file, split)
    ref = reference_split(split, emb)
    res = query_retrieval(**split_retrieval_args(emb, labels, split), k=k)
    return {"split": split, "ref_split": ref,
            "labels": np.asarray(labels[split], np.int64),
            "ref_labels": np.asarray(labels[ref], np.int64),
            "ap": res.ap, "r": res.r, "valid": res.valid, "top1": res.top1,
            "neighbours": res.neighbours, "correct": res.correct}


def _ordered(ids: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``ids`` sorted by ``key`` (ascending), equal keys by id."""
    return ids[np.lexsort((ids, key))]


def counted(res: Mapping[str, Any], classes: Sequence[int] | None = None) -> np.ndarray:
    """(m,) bool: the queries that count (R > 0) of the ``classes`` picked (None or empty:
    every class)."""
    keep = np.asarray(res["valid"], bool).copy()
    if classes is not None and len(classes):
        keep &= np.isin(res["labels"], np.asarray(list(classes), np.int64))
    return keep


def order_queries(res: Mapping[str, Any], classes: Sequence[int] | None = None,
                  order: str = "lowest", only_wrong: bool = False) -> np.ndarray:
    """The queries to list, in order: those that count (R > 0), of the ``classes`` picked
    (None or empty: every class), only those whose top-1 is wrong when ``only_wrong``; by
    AP@R ("lowest" or "highest" first, equal AP@R by query index) or by index ("index")."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    keep = counted(res, classes)
    if only_wrong:
        keep &= ~np.asarray(res["top1"], bool)
    ids = np.flatnonzero(keep)
    if order == "index":
        return ids
    ap = np.asarray(res["ap"], np.float64)[ids]
    return _ordered(ids, ap if order == "lowest" else -ap)


def comparison_problem(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """Why two runs' query results cannot be compared query by query (None: they can): the
    same split, ranked against the same kind of split, with the same labels in the same
    order."""
    if a["split"] != b["split"] or a["ref_split"] != b["ref_split"]:
        return (f"the runs rank different splits ({a['split']} against {a['ref_split']}, "
                f"{b['split']} against {b['ref_split']})")
    for key, what in (("labels", "queries"), ("ref_labels", "references")):
        if len(a[key]) != len(b[key]):
            return (f"their {a['split']} {what} differ: {len(a[key]):,} against "
                    f"{len(b[key]):,} images (another data set or split)")
        if not np.array_equal(a[key], b[key]):
            return f"their {a['split']} {what} have other labels (another data set or split)"
    return None


def disagreements(a: Mapping[str, Any], b: Mapping[str, Any],
                  classes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The queries two runs of the same test set disagree on at top-1: {"a_only": right for
    ``a``, wrong for ``b``; "b_only": the other way}, of the ``classes`` picked (None or
    empty: all), each ordered by how much more AP@R the right run has (the largest gap first,
    equal gaps by index). ValueError when the test sets differ (``comparison_problem``)."""
    problem = comparison_problem(a, b)
    if problem:
        raise ValueError(problem)
    keep = counted(a, classes) & counted(b, classes)
    ta, tb = np.asarray(a["top1"], bool), np.asarray(b["top1"], bool)
    gap = np.asarray(a["ap"], np.float64) - np.asarray(b["ap"], np.float64)
    a_only, b_only = np.flatnonzero(keep & ta & ~tb), np.flatnonzero(keep & tb & ~ta)
    return {"a_only": _ordered(a_only, -gap[a_only]), "b_only": _ordered(b_only, gap[b_only])}


def class_text(c: int, class_names: Mapping[int, str] | None = None) -> str:
    """A class as a thumbnail shows it: its name, or its id when it has none."""
    name = (class_names or {}).get(int(c))
    return str(int(c)) if name is None else str(name)


def neighbour_cells(res: Mapping[str, Any], q: int, k: int,
                    class_names: Mapping[int, str] | None = None,
                    images: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """The query ``q`` and its first ``k`` neighbours as thumbnail cells for ``strip_html``:
    {"src" (an image URI or None), "caption", "color", "title"}; the query's border is neutral,
    a neighbour's green when it has the query's class, red when not. ``images``: the query's
    image, then its neighbours' (None where there is none)."""
    labels, ref_labels = res["labels"], res["ref_labels"]
    nn = [int(j) for j in res["neighbours"][q][:k] if j >= 0]
    images = list(images) if images is not None else []
    images += [None] * (len(nn) + 1 - len(images))
    cells = [{"src": images[0], "caption": f"query · {class_text(labels[q], class_names)}",
              "color": QUERY,
              "title": f"{res['split']} #{q}: class {class_text(labels[q], class_names)}"}]
    for rank, (j, right) in enumerate(zip(nn, res["correct"][q]), 1):
        name = class_text(ref_labels[j], class_names)
        cells.append({"src": images[rank], "caption": f"{'✓' if right else '✗'} {name}",
                      "color": RIGHT if right else WRONG,
                      "title": f"{rank}. {res['ref_split']} #{j}: class {name} "
                               f"({'right' if right else 'wrong'})"})
    return cells


def strip_html(cells: Sequence[Mapping[str, Any]], size: int = 64) -> str:
    """One row of thumbnails (or, without an image, a box holding the caption) with coloured
    borders and captions, as HTML for ``st.html``; wraps onto more lines when narrow."""
    out = []
    for c in cells:
        caption = html.escape(str(c.get("caption", "")))
        title = html.escape(str(c.get("title", c.get("caption", ""))), quote=True)
        color = html.escape(str(c.get("color") or "#999999"), quote=True)
        border = f"border:3px solid {color};border-radius:4px;box-sizing:content-box"
        if c.get("src"):   # the image, its caption below
            src = html.escape(str(c["src"]), quote=True)
            body = (f'<img src="{src}" alt="{title}" style="width:{size}px;height:{size}px;'
                    f'{border};display:block;object-fit:contain;image-rendering:pixelated;'
                    'background:#fff"><figcaption style="font-size:11px;line-height:1.2;'
                    'margin-top:2px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis">'
                    f'{caption}</figcaption>')
        else:              # no image: the caption in the bordered box
            body = (f'<div style="width:{size}px;{border};padding:4px 0;font-size:12px;'
                    'text-align:center;white-space:nowrap;overflow:hidden;'
                    f'text-overflow:ellipsis;background:#f6f6f6">{caption}</div>')
        out.append(f'<figure class="rf-cell" title="{title}" style="margin:0;'
                   f'width:{size + 6}px">{body}</figure>')
    return ('<div class="rf-strip" style="display:flex;flex-wrap:wrap;gap:6px;'
            f'align-items:flex-start">{"".join(out)}</div>')
