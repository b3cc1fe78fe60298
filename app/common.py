"""Streamlit glue shared by the pages: the runs root, run pickers, cached loaders (arrays with
``st.cache_data``, data sets and models with ``st.cache_resource``), the jobs panel and the
first-start demo offer. The logic itself lives in the pure modules (tables, selection, plots,
images, jobs, mixlab) and in ``dml``."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import streamlit as st

from app import jobs, tables
from dml.runs import DEFAULT_RUNS_ROOT, Run, RunFormatError, iter_runs

ROOT_KEY = "runs_root"


# --------------------------------------------------------------------------- runs root

def default_runs_root() -> str:
    return os.environ.get("DML_RUNS") or DEFAULT_RUNS_ROOT


def runs_root() -> Path:
    return Path(st.session_state.get(ROOT_KEY) or default_runs_root()).expanduser()


def list_runs_and_errors(root: Path) -> tuple[list[Run], list[str]]:
    runs, errors = [], []
    for r in iter_runs(root):
        (runs if isinstance(r, Run) else errors).append(r if isinstance(r, Run) else str(r))
    return runs, errors


def safe_summary(run: Run) -> dict[str, Any] | None:
    try:
        return run.summary()
    except (OSError, ValueError, KeyError, RunFormatError):
        return None


def run_label(run: Run, summary: dict[str, Any] | None = None) -> str:
    s = summary or safe_summary(run) or {}
    if not s:
        return run.id
    head = s.get("name") or run.id
    state = "" if s.get("state") == "finished" else f" [{s.get('state')}]"
    what = f"{s['dataset']}/{s['loss']}/{s['mixing']}"
    if not tables.has_seed_marker(head, s.get("seed")):   # the seed once: 't-none-s1 · ...'
        what = tables.seed_label(what, s.get("seed"))
    return f"{head} · {what}{state}"


def pick_run(label: str, runs: list[Run], key: str, default_id: str | None = None,
             container=st) -> Run | None:
    if not runs:
        return None
    ids = [r.id for r in runs]
    labels = {r.id: run_label(r) for r in runs}
    want = default_id or st.query_params.get("run")
    index = ids.index(want) if want in ids else 0
    rid = container.selectbox(label, ids, index=index, key=key, format_func=labels.get)
    return runs[ids.index(rid)]


def runs_with_evals(root: Path) -> list[Run]:
    runs, _ = list_runs_and_errors(root)
    return [r for r in runs if r.eval_epochs()]


def data_key(run: Run) -> tuple:
    """What makes two runs' evaluations comparable image by image: the data set and its split."""
    d = dict(run.config().get("data", {}))
    d["split_version"] = d.get("split_version") or 1   # written before split versions: 1
    return tuple(str(d.get(k)) for k in ("name", "split", "split_seed", "split_version",
                                          "val_classes", "image_size"))


def same_data_runs(run: Run, runs: list[Run]) -> list[Run]:
    """The other runs of ``runs`` of the same data set and split as ``run`` (``data_key``)."""
    key = data_key(run)
    return [r for r in runs if r.id != run.id and data_key(r) == key]


def _essentials(run: Run) -> dict:
    c = run.config()
    return {"loss": c.get("loss", {}).get("name"), "mixing": c.get("mixing", {}).get("name"),
            "seed": c.get("train", {}).get("seed")}


def default_partner(run: Run, candidates: list[Run]) -> str | None:
    """The same loss and seed on the other side of mixing: a mixing run's baseline (or, for a
    baseline, the first mixing run of that loss and seed)."""
    me = _essentials(run)
    for c in candidates:
        e = _essentials(c)
        if e["loss"] == me["loss"] and e["seed"] == me["seed"] and \
                (e["mixing"] == "none") != (me["mixing"] == "none"):
            return c.id
    return None


def pick_epoch(run: Run, container, key: str, label: str = "Evaluation (epoch)",
               want: int | None = None) -> int:
    """An evaluation epoch of ``run``: a slider over its evaluations (one only: said in
    text), set at ``want``, else the ``epoch`` query parameter, else the best epoch."""
    from dml.projection import best_epoch

    epochs = run.eval_epochs()
    best = best_epoch(run) or epochs[-1]
    q = st.query_params.get("epoch", "")
    if want not in epochs:
        want = int(q) if q.isdigit() and int(q) in epochs else best
    if len(epochs) == 1:
        container.markdown(f"{label}: **{epochs[0]}** (the only one)")
        return epochs[0]
    return container.select_slider(label, options=epochs, value=want, key=key,
                                   help=f"best on validation: epoch {best}")


# --------------------------------------------------------------------------- tables

_GRID_PLACEHOLDER = "placeholder" in inspect.signature(st.dataframe).parameters


def dataframe(data, **kwargs):
    """``st.dataframe`` for every table of the app: a missing value shows as ``tables.MISSING``
    (an em dash), never as "None". The grid draws the placeholder itself, so numbers keep their
    column formats and sort as numbers; a Streamlit without ``placeholder`` gets the table with
    its missing cells filled in as text instead."""
    if _GRID_PLACEHOLDER:
        return st.dataframe(data, placeholder=tables.MISSING, **kwargs)
    import pandas as pd

    df = pd.DataFrame(data)
    filled = tables.fill_missing(df)
    text = [c for c in df.columns if filled[c].dtype != df[c].dtype]
    if kwargs.get("column_config"):   # number formats do not apply to a column made text
        kwargs["column_config"] = {k: v for k, v in kwargs["column_config"].items()
                                   if k not in text}
    return st.dataframe(filled, **kwargs)


def number_table(rows, key: str, columns, fmt: str = "%.5f"):
    """A table of records (index hidden) whose ``columns`` show numbers in the ``fmt`` format."""
    import pandas as pd

    return dataframe(pd.DataFrame(rows), hide_index=True, key=key,
                     column_config={c: st.column_config.NumberColumn(c, format=fmt)
                                    for c in columns})


# --------------------------------------------------------------------------- cached loaders

def mtime(p: Path) -> int:
    """A file's modification time in ns (0 when it is missing): the cache key of what the
    pages read from it."""
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=32)
def _load_eval(path: str, epoch: int, mtime: int) -> dict[str, np.ndarray]:
    return Run(path).load_eval(epoch)


def load_eval(run: Run, epoch: int) -> dict[str, np.ndarray]:
    return _load_eval(str(run.path), int(epoch), mtime(run.eval_path(epoch)))


@st.cache_data(show_spinner=False, max_entries=32)
def _load_projection(path: str, epoch: int, method: str, mtime: int):
    from dml.projection import load_projection
    return load_projection(path, epoch, method)


def cached_projection(run: Run, epoch: int, method: str):
    """The cached projection of an evaluation or None (never computes)."""
    from dml.projection import projection_path
    return _load_projection(str(run.path), int(epoch), method,
                            mtime(projection_path(run.path, epoch, method)))


def compute_projection_with_progress(run: Run, epoch: int, method: str):
    """Compute + cache a projection, showing what happens. PCA is instant and computed here; UMAP
    (seconds to a minute) in the app's projection worker process, so this server stays
    responsive for every other page and session meanwhile."""
    from app.projection_worker import projection_worker, warmup_state
    from dml.projection import get_projection

    if method == "pca":
        proj = get_projection(run.path, epoch, method, ev=load_eval(run, epoch))
        _load_projection.clear()
        return proj
    warm = warmup_state()
    note = "" if warm.get("state") == "warm" else \
        " (the first UMAP of a new server also compiles numba code: up to a minute)"
    with st.status(f"Computing the {method.upper()} map of epoch {epoch}{note}…",
                   expanded=True) as status:
        task = projection_worker().submit(run.path, epoch, method)
        line = status.empty()
        while not task.done():
            line.write(f"{task.message or 'starting'} · {time.time() - task.started:.0f} s")
            time.sleep(0.25)
        task.result()          # a ProjectionError when it failed
        line.write(f"done in {time.time() - task.started:.1f} s")
        status.update(label=f"{method.upper()} map computed and cached in the run directory",
                      state="complete", expanded=False)
    _load_projection.clear()
    return cached_projection(run, epoch, method)


def background_map(run: Run, epoch: int, method: str) -> dict[str, Any] | None:
    """The run's background map status (``dml.maps``) when that process is alive and will
    still make this map; None otherwise (made, failed, never asked for, or its process gone)."""
    from dml.maps import maps_status

    bg = maps_status(run.path)
    if not bg or not bg.get("alive") or f"{method}:{int(epoch)}" not in bg.get("todo", ()):
        return None
    return None if f"{method}:{int(epoch)}" in (bg.get("done") or []) else bg


def background_map_text(bg: dict[str, Any], epoch: int, method: str) -> str:
    """One line on where the background process stands, for a map waited on."""
    cur = bg.get("current") or ""
    if bg["state"] == "queued":
        where = "queued behind other runs' maps"
    elif cur == f"{method}:{int(epoch)}":
        where = "being computed now" + (f" ({bg['detail']})" if bg.get("detail") else "")
    else:
        m, _, e = cur.partition(":")
        where = f"next; now: the {m.upper()} map of epoch {e}" if cur else "starting"
    return (f"The {method.upper()} map of epoch {epoch} is {where}. This run's maps are made in "
            f"the background after training ({bg.get('pending', '?')} to go); it appears here "
            f"when it is ready.")


def watch_background_map(run: Run, epoch: int, method: str, bg: dict[str, Any]) -> None:
    """Say that a map is coming from the background process and poll for it: when it lands,
    ``st.session_state["map-arrived-<run id>"]`` names it (method, epoch) and the page reruns;
    when the process is gone without it, the page reruns (and computes it itself)."""
    @st.fragment(run_every=2)
    def poll():
        from dml.projection import projection_path

        if projection_path(run.path, epoch, method).is_file():
            _load_projection.clear()
            st.session_state[f"map-arrived-{run.id}"] = (method, int(epoch))
            st.rerun(scope="app")
        now = background_map(run, epoch, method)
        if now is None:   # failed, or its process went away: the page computes it itself
            st.rerun(scope="app")
        st.info(background_map_text(now, epoch, method), icon=":material/hourglass_top:")

    poll()


@st.cache_data(show_spinner=False, max_entries=16)
def _point_table(path: str, epoch: int, method: str, eval_mtime: int, proj_mtime: int):
    from app.selection import build_point_table
    from dml.projection import load_projection
    proj = load_projection(path, epoch, method)
    if proj is None:
        return None
    return build_point_table(Run(path).load_eval(epoch), proj)


def point_table(run: Run, epoch: int, method: str):
    from dml.projection import projection_path
    return _point_table(str(run.path), int(epoch), method, mtime(run.eval_path(epoch)),
                        mtime(projection_path(run.path, epoch, method)))


# class names of every data set loaded in this server process, by data config: small, and known
# without loading anything again (see ``class_names(cfg, load=False)``)
_CLASS_NAMES: dict[str, dict[int, str]] = {}


@st.cache_resource(show_spinner="Loading the data set…", max_entries=8)
def _dataset(data_json: str):
    from app.images import load_run_dataset
    ds = load_run_dataset({"data": json.loads(data_json)})
    _CLASS_NAMES[data_json] = dict(ds.class_names)
    return ds


def _data_key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg["data"], sort_keys=True)


def run_dataset(cfg: dict[str, Any]):
    """The run's data set, rebuilt from its config (cached for the server's lifetime)."""
    return _dataset(_data_key(cfg))


@st.cache_resource(show_spinner="Loading the checkpoint…", max_entries=8)
def _checkpoint(weights: str, mtime: int):
    from dml.checkpoints import load_checkpoint
    return load_checkpoint(weights)


def run_checkpoint(run: Run, tag: str = "best"):
    p = run.checkpoint_path(tag)
    return _checkpoint(str(p), mtime(p))


# --------------------------------------------------------------------------- checkpoint uploads

class UploadError(ValueError):
    """Uploaded files that are not one Tango checkpoint; the message is one line."""


UPLOAD_PREFIX = "tango-upload-"
PICKLE_NOTE = "pickled checkpoints (torch.save .pt/.pth/.ckpt) are never loaded"


def upload_name(name: object) -> str:
    """An uploaded file's name as shown to the user: the client's last path component, at most 80
    characters, no backticks ("(unnamed)" for none, ``.`` or ``..``). Never used as a path."""
    base = str(name or "").replace("\\", "/").rsplit("/", 1)[-1].replace("`", "'").strip()
    if base in ("", ".", ".."):
        return "(unnamed)"
    return base if len(base) <= 80 else base[:38] + "…" + base[-38:]


def upload_suffix(name: object) -> str:
    """The lower-case extension of an uploaded file's name (".safetensors"), "" for none."""
    base = upload_name(name)
    stem, dot, ext = base.rpartition(".")
    return f".{ext.lower()}" if dot and stem and base != "(unnamed)" else ""


def checkpoint_uploads(files) -> dict[str, Any]:
    """The checkpoint among uploaded files (objects with ``name`` and ``getvalue()``, as
    ``st.file_uploader`` gives): exactly one ``.safetensors`` weights file and one ``.json`` side
    file, told apart by their names' extensions. Returns {"weights": bytes, "meta": bytes,
    "names": (weights name, side file name), "digest": sha256 of names and contents}; anything
    else raises :class:`UploadError` saying what is wrong. The contents are checked when loaded
    (:func:`load_uploaded_checkpoint`); the names are only shown."""
    import hashlib

    by_kind: dict[str, list] = {".safetensors": [], ".json": []}
    for f in files:
        suffix = upload_suffix(f.name)
        if suffix not in by_kind:
            raise UploadError(f"`{upload_name(f.name)}` is neither `.safetensors` weights nor a "
                              f"`.json` side file; {PICKLE_NOTE}")
        by_kind[suffix].append(f)
    weights, metas = by_kind[".safetensors"], by_kind[".json"]
    if len(weights) > 1 or len(metas) > 1:
        raise UploadError(f"one checkpoint at a time: upload one `.safetensors` file and its "
                          f"`.json` side file (got {len(weights)} and {len(metas)})")
    if not weights:
        raise UploadError("no `.safetensors` weights among the uploads; a Tango checkpoint is the "
                          "`.safetensors` weights plus the `.json` side file naming their "
                          "architecture")
    if not metas:
        raise UploadError(f"`{upload_name(weights[0].name)}` has no `.json` side file among the "
                          f"uploads naming its architecture; upload both files of the checkpoint")
    w, m = weights[0], metas[0]
    out = {"weights": w.getvalue(), "meta": m.getvalue(),
           "names": (upload_name(w.name), upload_name(m.name))}
    h = hashlib.sha256()
    for part in (*out["names"], out["weights"], out["meta"]):
        blob = part.encode() if isinstance(part, str) else part
        h.update(len(blob).to_bytes(8, "little") + blob)
    out["digest"] = h.hexdigest()
    return out


@contextlib.contextmanager
def private_checkpoint_files(weights: bytes, meta: bytes) -> Iterator[tuple[Path, Path]]:
    """The two files of an uploaded checkpoint, written as ``checkpoint.safetensors`` and
    ``checkpoint.json`` (fixed names, whatever the client called them) into a new temporary
    folder that only this user can read (0700), removed with its files on leaving the block."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=UPLOAD_PREFIX) as tmp:   # mkdtemp: mode 0700
        folder = Path(tmp)
        os.chmod(folder, 0o700)
        paths = folder / "checkpoint.safetensors", folder / "checkpoint.json"
        for path, data in zip(paths, (weights, meta)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        yield paths


def load_uploaded_checkpoint(upload: dict[str, Any]):
    """(model, side file) of :func:`checkpoint_uploads`' checkpoint, loaded with
    :func:`dml.checkpoints.load_checkpoint` from private temporary files that are removed right
    after (the model is in memory then). A refusal is a one-line CheckpointError that names the
    files as uploaded."""
    from dml.checkpoints import CheckpointError, load_checkpoint

    with private_checkpoint_files(upload["weights"], upload["meta"]) as paths:
        try:
            return load_checkpoint(*paths)
        except CheckpointError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            for path, name in zip(paths, upload["names"]):
                msg = msg.replace(str(path), f"`{name}`").replace(path.name, f"`{name}`")
            raise CheckpointError(msg) from None


def checkpoint_problem(model, info: dict[str, Any]) -> str | None:
    """Why a loaded checkpoint cannot be used, or None. Weights that are not finite are refused
    by :func:`dml.checkpoints.load_checkpoint` itself; here the model embeds two random images
    and its embeddings get the check that `dml eval` applies (``dml.metrics``): finite weights
    can still compute NaN or inf (a negative BatchNorm variance, an overflow)."""
    import torch

    from dml.metrics import as_embeddings

    m = info["model"]
    x = torch.randn(2, m["in_channels"], m["image_size"], m["image_size"],
                    generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            emb = model.eval()(x).float().cpu().numpy()
        as_embeddings(emb, "embeddings")
    except (ValueError, RuntimeError) as exc:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "NaN or inf" in what:
            return ("its weights are finite, but the embeddings it computes are not (NaN or "
                    "inf): this checkpoint cannot embed anything (`dml eval` refuses it too)")
        return f"this checkpoint cannot embed an image of its own input size ({what})"
    return None


def thumbnails(cfg: dict[str, Any], split: str, index, min_side: int = 64) -> np.ndarray:
    from app.images import split_images, to_display
    ds = run_dataset(cfg)
    return to_display(split_images(ds, split, index), min_side)


def class_names(cfg: dict[str, Any], load: bool = True, run: Run | None = None) -> dict[int, str]:
    """{class id: name} of the run's data set ({} when it cannot be loaded): from the run's
    ``classes.json`` when ``run`` is given and has one (instant), else from the data set.
    ``load=False`` never loads the data set (which imports torch and reads the data: seconds on
    a fresh server): then the names only when this server process has loaded it already."""
    if run is not None:
        names = run.class_names()
        if names:
            return names
    key = _data_key(cfg)
    if key in _CLASS_NAMES or not load:
        return _CLASS_NAMES.get(key, {})
    try:
        return dict(run_dataset(cfg).class_names)
    except Exception:
        return {}


# --------------------------------------------------------------------------- jobs

def jobs_panel(root: Path) -> None:
    """Progress bars of recent jobs under the root (call inside ``with st.sidebar:``);
    refreshes itself every 2 s while a job is active, and the whole page when one ends."""
    recent = jobs.list_jobs(root, max_age_s=6 * 3600)
    if not recent:
        return

    def fingerprint(js):   # active jobs and the run directories they have created so far
        return (sum(j.get("state") in ("queued", "running") for j in js),
                sum(bool(r.get("run_dir")) for j in js for r in j.get("runs", [])))

    before = fingerprint(recent)

    @st.fragment(run_every=2 if before[0] else None)
    def panel():
        now = jobs.list_jobs(root, max_age_s=6 * 3600)
        st.caption("Training jobs")
        for j in now[:4]:
            frac, text = jobs.job_progress(j)
            st.progress(frac, text=text)
            for note in j.get("notes", []):
                st.caption(f"note: {note}")
        if fingerprint(now) != before:   # a run started or a job ended: refresh every page
            st.rerun(scope="app")

    panel()


def start_demo(root: Path) -> dict[str, Any]:
    configs, notes = jobs.demo_configs()
    return jobs.start_job(root, configs, "demo set", notes)


def evaluated_runs_or_offer(key: str) -> tuple[Path, list[Run]]:
    """The runs root and its runs with evaluations; with none, the first-start screen (one
    click trains the demo set) and the page stops."""
    root = runs_root()
    runs = runs_with_evals(root)
    if not runs:
        no_runs_offer(root, key=key)
        st.stop()
    return root, runs


def no_runs_offer(root: Path, key: str = "demo") -> None:
    """The first-start screen: no runs under the root -> one click trains the demo set."""
    active = jobs.list_jobs(root, active_only=True)
    st.info(f"No runs under `{root}` yet.")
    if active:
        st.write("A training job is running; its runs appear here as soon as they start.")

        @st.fragment(run_every=2)
        def live():
            for j in jobs.list_jobs(root, max_age_s=6 * 3600)[:len(active)]:
                frac, text = jobs.job_progress(j)
                st.progress(frac, text=text)

        live()
        return
    configs, notes = jobs.demo_configs()
    st.markdown(
        "Train the **demo set** on the built-in *digits* data (no download): "
        + ", ".join(f"`{c['loss']['name']} + {c['mixing']['name']}`" for c in configs)
        + " — 8 epochs each, about two minutes on two CPU cores. Every page then has real runs "
          "to show.")
    for n in notes:
        st.caption(f"note: {n}")
    if st.button("Train the demo set", type="primary", key=f"{key}-button"):
        job = start_demo(root)
        st.session_state["last_job"] = job["path"]
        st.rerun()
