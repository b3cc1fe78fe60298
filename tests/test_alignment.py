"""dml.alignment: aligned maps of a run's evaluations (the app's "Through time" page): frames that
stay put when the embedding only rotates and scales, one frame per evaluation, the cache in the
run extended by a new evaluation (old frames kept, only the new one computed) and recomputed when
an evaluation changes, two runs aligned onto each other, old and new npz layouts."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from dml import alignment as al
from dml.runs import RunWriter

D = 12


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rotation(rng, d=D):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def base_eval(seed=0, n_train=150, n_test=90, n_syn=40, classes=5):
    """Clustered unit vectors per class, shaped like the trainer's npz (today's layout)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes * 2, D)) * 3

    def split(n, offset):
        y = np.arange(n) % classes + offset
        return _unit(centres[y] + rng.standard_normal((n, D)) * 0.4), y

    tr, ytr = split(n_train, 0)
    te, yte = split(n_test, classes)
    probe = np.arange(0, 40, 2)
    parents = rng.integers(0, len(probe), (n_syn, 2))
    lam = rng.uniform(0, 1, n_syn).astype(np.float32)
    syn = _unit(lam[:, None] * tr[probe[parents[:, 0]]] + (1 - lam[:, None]) *
                tr[probe[parents[:, 1]]])
    return {"train_embeddings": tr, "train_labels": ytr, "test_embeddings": te,
            "test_labels": yte, "synthetic_embeddings": syn, "synthetic_parents": parents,
            "synthetic_weight": lam, "synthetic_kind": np.array(["metrix-embed"] * n_syn),
            "probe_index": probe, "probe_labels": ytr[probe]}


def moved(ev, q, s=1.0, noise=0.0, seed=0):
    """The evaluation with every embedding rotated by q (D x D) and scaled by s (+ noise)."""
    rng = np.random.default_rng(seed)
    out = dict(ev)
    for k in ("train_embeddings", "test_embeddings", "synthetic_embeddings"):
        x = np.asarray(ev[k], np.float32) @ q * s
        out[k] = (x + rng.standard_normal(x.shape) * noise).astype(np.float32)
    return out


def rotating_evals(n=3, seed=0, noise=0.0, **kw):
    """Evaluations 1..n where epoch e+1 is a rotated, scaled copy of epoch e."""
    rng = np.random.default_rng(seed + 100)
    ev = base_eval(seed, **kw)
    out = {1: ev}
    for e in range(2, n + 1):
        ev = moved(ev, _rotation(rng), s=float(rng.uniform(0.5, 2.0)), noise=noise, seed=e)
        out[e] = ev
    return out


def make_run(root, evals, mixing="metrix-embed", seed=0, state="finished", run_id=None):
    w = RunWriter.create(root, {"data": {"name": "digits"}, "loss": {"name": "contrastive"},
                                "mixing": {"name": mixing}, "train": {"seed": seed}},
                         run_id=run_id)
    for epoch, ev in evals.items():
        w.save_eval(epoch, **ev)
        w.append_metrics({"epoch": epoch, "test": {"recall@1": 0.5 + epoch / 100}})
    if state == "running":
        return w          # the caller closes it
    w.set_status(state)
    w.close()
    return w.run


def test_fit_similarity_recovers_rotation_reflection_scale_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 2))
    theta = 0.7
    r = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    for refl in (np.eye(2), np.diag([1.0, -1.0])):
        b = 2.5 * a @ refl @ r + np.array([3.0, -1.0])
        sim = al.fit_similarity(a, b)
        np.testing.assert_allclose(sim(a), b, atol=1e-5)
        assert al.displacement(sim(a), b) < 1e-5
    # a poor match keeps the target's spread (the least-squares scale would shrink it)
    noise = rng.standard_normal((50, 2))
    assert al._spread(al.fit_similarity(noise, a)(noise)) == pytest.approx(al._spread(a), 1e-5)
    assert al._spread(al.fit_similarity(noise, a, keep_spread=False)(noise)) < al._spread(a) / 2


@pytest.mark.parametrize("split", ["test", "train"])
def test_frames_stay_put_when_the_embedding_only_rotates_and_scales(tmp_path, split):
    run = make_run(tmp_path, rotating_evals(4))
    tl = al.get_timeline(run.path, split, "pca")
    assert tl.epochs.tolist() == [1, 2, 3, 4]                 # one frame per evaluation
    assert tl.frames.shape == (4, tl.n_points, 2)
    assert tl.n_points == (90 if split == "test" else 150)
    for i in range(3):
        assert al.displacement(tl.frames[i], tl.frames[i + 1]) < 1e-3
        # the synthetic points (the same ones, rotated with everything) stay put too
        a, b = tl.synthetic(i + 1)["xy"], tl.synthetic(i + 2)["xy"]
        assert len(a) == 40 and np.abs(a - b).max() < 1e-2 * al._spread(tl.frames[0])
    # the first frame is centred with a spread of 1; the later ones keep it
    assert np.abs(tl.frames[0].mean(axis=0)).max() < 1e-5
    assert al._spread(tl.frames[-1]) == pytest.approx(1.0, 1e-4)
    # without the alignment the same maps move a lot (signs flip, scales change)
    raw = [al._project(np.asarray(ev[f"{split}_embeddings"], np.float32), None, "pca", 0,
                       None, {})[0] for ev in rotating_evals(4).values()]
    assert max(al.displacement(al.normalizing_similarity(raw[i])(raw[i]),
                               al.normalizing_similarity(raw[i + 1])(raw[i + 1]))
               for i in range(3)) > 0.5


def test_synthetic_points_carry_their_parents_classes_and_weights(tmp_path):
    evals = rotating_evals(2)
    run = make_run(tmp_path, evals)
    tl = al.get_timeline(run.path, "train", "pca")
    syn = tl.synthetic(2)
    ev = evals[2]
    np.testing.assert_array_equal(syn["parent_class"],
                                  ev["probe_labels"][ev["synthetic_parents"]])
    np.testing.assert_allclose(syn["weight"], ev["synthetic_weight"])
    assert set(syn["kind"]) == {"metrix-embed"}
    assert tl.syn_total.tolist() == [40, 40] and tl.syn_offsets.tolist() == [0, 40, 80]
    # a cap keeps a seeded subset of each evaluation's synthetic points, rows recorded
    capped = al.compute_timeline(run, "train", "pca", max_synthetic=10)
    assert np.diff(capped.syn_offsets).tolist() == [10, 10]
    assert capped.syn_total.tolist() == [40, 40]
    rows = capped.synthetic(2)["row"]
    np.testing.assert_array_equal(capped.synthetic(2)["weight"], ev["synthetic_weight"][rows])


def test_a_new_evaluation_extends_the_cache_and_a_changed_one_refreshes_it(tmp_path,
                                                                           monkeypatch):
    evals = rotating_evals(4, noise=0.01)
    w = make_run(tmp_path, {e: evals[e] for e in (1, 2, 3)}, state="running")
    try:
        run = w.run
        tl3 = al.get_timeline(run.path, "test", "pca")
        path = al.timeline_path(run.path, "test", "pca")
        assert path.name == "timeline.test.pca.npz" and path.parent.name == "evals"
        assert len(tl3) == 3
        assert al.cache_state(al.load_timeline(run.path, "test", "pca"), run) == "fresh"
        assert al.get_timeline(run.path, "test", "pca", compute=False) is not None

        calls = []
        real_project = al._project
        monkeypatch.setattr(al, "_project", lambda *a, **k: calls.append(1) or
                            real_project(*a, **k))
        w.save_eval(4, **evals[4])               # the run trains on: a fourth evaluation lands
        assert al.cache_state(al.load_timeline(run.path, "test", "pca"), run) == "extend"
        assert al.get_timeline(run.path, "test", "pca", compute=False) is None
        tl4 = al.get_timeline(run.path, "test", "pca")
        assert len(calls) == 1                   # only the new evaluation was projected
        assert tl4.epochs.tolist() == [1, 2, 3, 4]
        np.testing.assert_array_equal(tl4.frames[:3], tl3.frames)   # old frames kept as they were
        assert al.displacement(tl4.frames[2], tl4.frames[3]) < 0.05
        assert len(al.load_timeline(run.path, "test", "pca")) == 4
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

        calls.clear()
        assert len(al.get_timeline(run.path, "test", "pca")) == 4   # fresh: nothing computed
        assert not calls

        # an evaluation rewritten (e.g. a run resumed from an older checkpoint): recomputed
        time.sleep(0.01)
        w.save_eval(2, **evals[3])
        assert al.cache_state(al.load_timeline(run.path, "test", "pca"), run) == "stale"
        tl = al.get_timeline(run.path, "test", "pca")
        assert len(calls) == 4 and len(tl) == 4
        # an evaluation removed (save_embeddings="best+last"): recomputed without it
        run.eval_path(1).unlink()
        calls.clear()
        assert al.get_timeline(run.path, "test", "pca").epochs.tolist() == [2, 3, 4]
        assert len(calls) == 3
        # other settings (a different cap) do not use the cache
        assert al.cache_state(al.load_timeline(run.path, "test", "pca"), run,
                              max_points=10) == "stale"
        assert al.get_timeline(run.path, "test", "pca", max_points=10).n_points == 10
    finally:
        w.close()


def test_a_broken_or_foreign_cache_is_ignored(tmp_path):
    run = make_run(tmp_path, rotating_evals(2))
    al.get_timeline(run.path, "test", "pca")
    p = al.timeline_path(run.path, "test", "pca")
    p.write_bytes(b"not an npz")
    assert al.load_timeline(run.path, "test", "pca") is None
    assert len(al.get_timeline(run.path, "test", "pca")) == 2
    with np.load(p) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data.pop("meta")))
    np.savez(p, meta=np.array(json.dumps(dict(meta, version=999))), **data)
    assert al.load_timeline(run.path, "test", "pca") is None


def test_two_runs_are_aligned_onto_each_other(tmp_path):
    evals = rotating_evals(3, noise=0.005)
    a = make_run(tmp_path, evals, mixing="metrix-embed", run_id="a")
    rng = np.random.default_rng(7)     # run b: the same embeddings, other rotations and scales
    b = make_run(tmp_path, {e: moved(ev, _rotation(rng), s=3.0, noise=0.005, seed=e + 10)
                            for e, ev in evals.items() if e != 2}, mixing="none",
                 run_id="b")
    ta, tb = (al.get_timeline(r.path, "test", "pca") for r in (a, b))
    assert tb.epochs.tolist() == [1, 3]
    fb = al.align_to(ta, tb)
    assert fb.meta["shared_points"] == 90 and fb.meta["matched_epochs"] == [1, 3]
    for i, e in enumerate(fb.epochs.tolist()):
        assert al.displacement(fb.frames[i], ta.frame(e)) < 0.05
        np.testing.assert_allclose(fb.synthetic(e)["xy"], ta.synthetic(e)["xy"],
                                   atol=0.05 * al._spread(ta.frame(e)))
    np.testing.assert_array_equal(fb.index, tb.index)        # the same points, moved
    # runs of different splits / data share no points: refused with a message
    other = al.get_timeline(a.path, "train", "pca")
    other = al.Timeline(**{**other.__dict__, "index": other.index + 10_000})
    with pytest.raises(al.AlignmentError, match="share 0 point"):
        al.align_to(ta, other)


def test_training_subsamples_are_matched_by_their_data_set_indices(tmp_path):
    """Today's npz holds a training subsample with ``train_index``; two runs (or two
    evaluations) whose subsamples differ share the images both hold, in data-set order."""
    ev = base_eval(0, n_train=150)
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(1000, 150, replace=False))
    shuffled = rng.permutation(150)         # rows in another order than the indices

    def with_index(ev, rows, index):
        out = dict(ev, train_embeddings=ev["train_embeddings"][rows],
                   train_labels=ev["train_labels"][rows], train_index=index[rows])
        out.pop("probe_labels")
        return out

    run = make_run(tmp_path, {1: with_index(ev, np.arange(150), idx),
                              2: with_index(ev, shuffled, idx),
                              3: with_index(ev, np.arange(120), idx)}, run_id="sub")
    tl = al.get_timeline(run.path, "train", "pca")
    np.testing.assert_array_equal(tl.index, idx[:120])      # those in every evaluation
    np.testing.assert_array_equal(tl.label, ev["train_labels"][:120])
    for i in range(2):                                     # the same embeddings: no motion
        assert al.displacement(tl.frames[i], tl.frames[i + 1]) < 1e-3
    # without probe_labels, with a subsample: the parents' classes come from the strongest
    # membership classes when the npz has them, else are unknown (-1), never wrong
    assert (tl.synthetic(1)["parent_class"] == -1).all()
    # a seeded sample of at most max_points, by data-set index: the same for both runs
    run2 = make_run(tmp_path, {1: with_index(ev, shuffled, idx)}, run_id="sub2")
    s1 = al.compute_timeline(run, "train", "pca", max_points=40, epochs=[1])
    s2 = al.compute_timeline(run2, "train", "pca", max_points=40)
    assert s1.n_points == 40
    np.testing.assert_array_equal(s1.index, s2.index)


def test_old_npz_layouts_are_read(tmp_path):
    """float16 embeddings, no train_index, no probe_labels (parents' classes from the training
    labels), ``synthetic_ratio`` in place of ``synthetic_weight``, and evaluations without
    synthetic points or without some split."""
    evals = rotating_evals(3)
    old = {}
    for e, ev in evals.items():
        ev = {k: (v.astype(np.float16) if k.endswith("_embeddings") else v)
              for k, v in ev.items() if k != "probe_labels"}
        ev["synthetic_ratio"] = ev.pop("synthetic_weight")
        old[e] = ev
    old[3] = {k: v for k, v in old[3].items() if not k.startswith(("synthetic_", "probe_"))}
    old[4] = {k: v for k, v in old[3].items() if not k.startswith("test_")}   # train only
    run = make_run(tmp_path, old)
    tl = al.get_timeline(run.path, "test", "pca")
    assert tl.epochs.tolist() == [1, 2, 3]                   # epoch 4 saved no test points
    assert al.split_epochs(run, "train") == [1, 2, 3, 4]
    assert al.available_splits(run) == ["train"]
    for i in range(2):
        assert al.displacement(tl.frames[i], tl.frames[i + 1]) < 5e-3
    syn = tl.synthetic(1)
    ev = evals[1]
    np.testing.assert_array_equal(syn["parent_class"],
                                  ev["train_labels"][ev["probe_index"][ev["synthetic_parents"]]])
    np.testing.assert_allclose(syn["weight"], ev["synthetic_weight"])
    assert len(tl.synthetic(3)["xy"]) == 0 and tl.syn_total.tolist() == [40, 40, 0]
    assert len(al.get_timeline(run.path, "train", "pca")) == 4


def test_errors_say_what_is_missing(tmp_path):
    run = make_run(tmp_path, {1: {"test_embeddings": np.zeros((0, D), np.float32),
                                  "test_labels": np.zeros(0, np.int64)}})
    with pytest.raises(al.AlignmentError, match="no evaluation with saved test embeddings"):
        al.get_timeline(run.path, "test", "pca")
    with pytest.raises(al.AlignmentError, match="unknown method"):
        al.compute_timeline(run, "test", "tsne")
    tiny = make_run(tmp_path, {1: {"test_embeddings": np.eye(D, dtype=np.float32)[:2],
                                   "test_labels": np.arange(2)}}, run_id="tiny")
    with pytest.raises(al.AlignmentError, match="at least 3"):
        al.get_timeline(tiny.path, "test", "pca")


def test_bounds_and_head(tmp_path):
    run = make_run(tmp_path, rotating_evals(3))
    tl = al.get_timeline(run.path, "train", "pca")
    (x0, x1), (y0, y1) = tl.bounds()
    pts = np.concatenate([tl.frames.reshape(-1, 2), tl.syn_xy])
    assert x0 < pts[:, 0].min() and pts[:, 0].max() < x1
    assert y0 < pts[:, 1].min() and pts[:, 1].max() < y1
    h = tl.head(2)
    assert h.epochs.tolist() == [1, 2] and len(h.syn_xy) == 80
    assert al.cache_state(h, run) == "extend"


def test_the_command_line_caches_timelines(tmp_path, capsys):
    run = make_run(tmp_path, rotating_evals(2))
    assert al.main([str(run.path), "--split", "train", "--method", "pca"]) == 0
    out = capsys.readouterr().out
    assert "2 frame(s) of 150 train points" in out
    assert al.timeline_path(run.path, "train", "pca").is_file()
    assert al.main([str(tmp_path / "nothing"), "--method", "pca"]) == 1


@pytest.mark.slow
def test_umap_frames_follow_the_previous_frame(tmp_path):
    """UMAP, each fit initialised from the previous frame: a rotated copy of the embedding
    barely moves the map (spectral inits of each epoch alone would flip and reorder it); the
    synthetic points are placed by transform in their evaluation's frame."""
    pytest.importorskip("umap")
    run = make_run(tmp_path, rotating_evals(3, n_test=120))
    tl = al.get_timeline(run.path, "test", "umap", n_epochs=60)
    assert tl.epochs.tolist() == [1, 2, 3] and tl.meta["params"]["n_epochs"] == 60
    for i in range(2):
        assert al.displacement(tl.frames[i], tl.frames[i + 1]) < 0.25
    assert len(tl.synthetic(2)["xy"]) == 40 and np.isfinite(tl.syn_xy).all()
    assert al.get_timeline(run.path, "test", "umap", compute=False, n_epochs=60) is not None
    assert os.path.isfile(al.timeline_path(run.path, "test", "umap"))


def test_the_through_time_page_draws_aligned_frames_of_two_runs(tmp_path, monkeypatch):
    """The app's page under AppTest (no browser): a mixing run and the baseline of its seed side
    by side, one slider stop per evaluation, in-between frames, synthetic points beneath the
    real ones, and the second panel aligned onto the first."""
    pytest.importorskip("streamlit")
    import base64
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    def decode(a):
        if isinstance(a, dict) and "bdata" in a:
            return np.frombuffer(base64.b64decode(a["bdata"]), dtype=np.dtype(a["dtype"]))
        return np.asarray(a if a is not None else [], float)

    evals = rotating_evals(3, noise=0.005)
    make_run(tmp_path, evals, mixing="metrix-embed", run_id="b-metrix")
    rng = np.random.default_rng(5)
    make_run(tmp_path, {e: {k: v for k, v in moved(ev, _rotation(rng), 2.0).items()
                            if not k.startswith(("synthetic_", "probe_"))}
                        for e, ev in evals.items()}, mixing="none", run_id="a-base")
    monkeypatch.setenv("DML_RUNS", str(tmp_path))
    monkeypatch.setenv("DML_NO_WARMUP", "1")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"),
                           default_timeout=120)
    at.query_params["run"] = "b-metrix"
    at.run()
    at.switch_page("views/timeline.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="tl-vs-b-metrix").value == "a-base"      # the same seed's baseline
    assert at.radio(key="tl-split-b-metrix").value == "train"        # where synthetic points sit
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t.get("name") for t in spec["data"]]
    assert names == ["synthetic (metrix-embed)", "train points", "synthetic", "train points"]
    steps = spec["layout"]["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == ["1", "2", "3"]
    frames = {f["name"]: f for f in spec["frames"]}
    assert {"e1", "e2", "e3", "e1-1", "e2-4"} <= set(frames) and len(frames) == 3 + 2 * 4
    for e in ("e1", "e2", "e3"):
        d = frames[e]["data"]
        a = np.column_stack([decode(d[1]["x"]), decode(d[1]["y"])])
        b = np.column_stack([decode(d[3]["x"]), decode(d[3]["y"])])
        assert al.displacement(a, b) < 0.05          # the baseline aligned onto the Metrix run
        assert len(decode(d[0]["x"])) == 40 and len(decode(d[2]["x"])) == 0
    # the toggle hides the synthetic points; PCA is the default without a cached UMAP timeline
    at.toggle(key="tl-syn").set_value(False).run()
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert len(decode(spec["frames"][0]["data"][0]["x"])) == 0
    assert al.timeline_path(tmp_path / "b-metrix", "train", "pca").is_file()
