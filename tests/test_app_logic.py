"""The app's pure logic, without Streamlit: tables and significance, selections and
neighbours, figure builders, the launch form, the playground's mixing math, images, jobs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from app import forms, images, jobs, mixlab, plots, selection, tables


# --------------------------------------------------------------------------- tables

def summary(id_, state="finished", **kw):
    base = {"id": id_, "name": None, "dataset": "digits", "loss": "contrastive",
            "mixing": "none", "seed": 0, "state": state, "progress": {}, "best_epoch": 2,
            "val": {"recall@1": 0.9, "map@r": 0.5}, "test": {"recall@1": 0.6, "map@r": 0.2,
                                                              "nmi": 0.3},
            "elapsed_s": 12.5, "error": None}
    base.update(kw)
    return base


def test_runs_table_rows_and_progress():
    df = tables.runs_table([
        summary("a"),
        summary("b", state="running", progress={"epoch": 2, "epochs": 8, "step": 10,
                                                "steps": 40}, val={}, test={}),
        summary("c", state="failed", error="ValueError: boom")])
    assert list(df["run"]) == ["a", "b", "c"]
    assert df.loc[0, "test R@1"] == 0.6 and df.loc[0, "status"] == "finished"
    assert df.loc[1, "progress"] == 0.25
    assert df.loc[1, "status"] == "running: epoch 2/8 (25%)"
    assert math.isnan(df.loc[1, "test R@1"])
    assert df.loc[2, "error"] == "ValueError: boom"
    assert tables.progress_fraction({"epoch": 1, "epochs": 4}) == 0.25
    assert tables.progress_fraction({}) is None


def test_missing_values_show_as_a_dash_never_none():
    # a run still training: no best checkpoint yet, so no validation or test metrics
    running = summary("r", state="running", progress={"epoch": 1, "epochs": 8}, val={}, test={},
                      best_epoch=None, elapsed_s=None)
    df = tables.runs_table([summary("a"), running])
    assert math.isnan(df.loc[1, "test R@1"])     # numbers stay numbers (sortable, formatted)
    shown = tables.fill_missing(df)
    row = shown.loc[1]
    for col in ("test R@1", "test MAP@R", "test NMI", "val R@1", "val MAP@R", "best epoch",
                "time (s)"):
        assert row[col] == tables.MISSING == "—", col
    cells = {str(v) for v in shown.to_numpy().ravel()}
    assert not cells & {"None", "nan", "NaN", "<NA>"}, cells
    assert shown.loc[0, "test R@1"] == "0.6" and shown.loc[0, "name"] == "a"
    assert tables.value_text(None) == tables.value_text(float("nan")) == "—"
    assert tables.value_text(0.51234, "{:.3f}") == "0.512" and tables.value_text(0) == "0"
    assert tables.mean_std_text(float("nan"), float("nan")) == "—"
    assert tables.mean_std_text(0.5, float("nan")) == "0.5000"


def test_curve_label_names_the_seed_once():
    assert tables.curve_label({**cfg(seed=1), "name": "t-none-s1"}) == "t-none-s1"
    assert tables.curve_label({**cfg(seed=1), "name": "baseline seed=1"}) == "baseline seed=1"
    assert tables.curve_label({**cfg(seed=1), "name": "mine"}) == "mine s1"
    assert tables.curve_label({**cfg(seed=1), "name": "t-none-s10"}) == "t-none-s10 s1"
    assert tables.curve_label({**cfg(seed=1), "name": "runs1"}) == "runs1 s1"
    assert tables.curve_label({**cfg("metrix-embed", seed=2, alpha=2), "name": None}) == \
        "digits / contrastive / metrix-embed (alpha=2) s2"
    assert tables.has_seed_marker("grid_S3", 3) and not tables.has_seed_marker("grid_s3", None)


def test_metric_series_and_keys():
    recs = [{"epoch": 1, "val": {"recall@1": 0.5}, "test": {"recall@1": 0.4, "nmi": 0.1},
             "utilization": 0.2, "train": {"loss": 1.0, "pos": 0.6}},
            {"epoch": 2, "val": {"recall@1": 0.6}, "test": {"recall@1": 0.5, "nmi": 0.2},
             "utilization": 0.1, "utilization_mixed": 0.05, "train": {"loss": 0.8, "pos": 0.5}}]
    assert tables.metric_series(recs, "test.recall@1") == ([1, 2], [0.4, 0.5])
    assert tables.metric_series(recs, "utilization_mixed") == ([2], [0.05])
    keys = tables.metric_keys([recs])
    assert keys.index("train.loss") < keys.index("val.recall@1") < keys.index("test.recall@1") \
        < keys.index("utilization")
    assert tables.metric_label("test.map@r") == "test MAP@R"
    assert tables.metric_label("utilization_mixed") == "utilization (with mixed)"


def cfg(mixing="none", seed=0, loss="contrastive", **mixing_params):
    return {"name": f"x{seed}", "data": {"name": "digits", "root": None},
            "loss": {"name": loss, "params": {}},
            "mixing": {"name": mixing, "params": mixing_params},
            "model": {"name": "small-cnn"}, "train": {"seed": seed, "epochs": 8, "threads": 2}}


def test_configurations_ignore_seed_and_bookkeeping():
    assert tables.config_key(cfg(seed=0)) == tables.config_key(cfg(seed=3))
    assert tables.config_key(cfg("metrix-embed")) != tables.config_key(cfg())
    assert tables.baseline_key(cfg("metrix-embed", alpha=2)) == tables.config_key(cfg())
    assert tables.differing_keys([cfg(), cfg("metrix-embed", alpha=2)]) == \
        ["mixing.name", "mixing.params.alpha"]
    assert tables.config_label(cfg("metrix-embed", alpha=2)) == \
        "digits / contrastive / metrix-embed (alpha=2)"


def test_the_app_and_the_benchmark_share_one_configuration_identity():
    # The review found them disagreeing: the benchmark treated an explicit alpha=2 as the
    # default run but train.device as a difference, the app the opposite. Now both use
    # dml.stats: explicit defaults are the default run, and the device does not matter.
    from dml.stats import configuration_key, run_key

    on_gpu = cfg("metrix-embed")
    on_gpu["train"]["device"] = "cuda:1"
    assert tables.config_key(cfg("metrix-embed", alpha=2)) == tables.config_key(cfg("metrix-embed"))
    assert tables.config_key(on_gpu) == tables.config_key(cfg("metrix-embed"))
    assert tables.config_key is configuration_key
    assert run_key(on_gpu) == run_key(cfg("metrix-embed", alpha=2.0))
    assert run_key(cfg("metrix-embed", seed=1)) != run_key(cfg("metrix-embed", seed=2))


def test_group_runs_mean_spread_and_significance():
    # "significant" is the paired interval of dml.stats excluding 0 (the benchmark's test),
    # not mean +- 1 sd intervals that do not overlap
    rows = []
    for s, v in enumerate([0.50, 0.52, 0.48]):
        rows.append({"id": f"b{s}", "config": cfg(seed=s), "values": {"r1": v}})
    for s, v in enumerate([0.51, 0.55, 0.47]):          # differences +0.01, +0.03, -0.01
        rows.append({"id": f"m{s}", "config": cfg("metrix-embed", seed=s), "values": {"r1": v}})
    for s, v in enumerate([0.53, 0.545, 0.51]):         # +0.03, +0.025, +0.03: consistent
        rows.append({"id": f"e{s}", "config": cfg("metrix-input", seed=s), "values": {"r1": v}})
    rows.append({"id": "f0", "config": cfg("metrix-feature"), "values": {"r1": 0.9}})
    rows.append({"id": "t0", "config": cfg("embedding-expansion", loss="triplet"),
                 "values": {"r1": 0.4}})
    df = tables.group_runs(rows, ["r1"]).set_index("mixing")
    assert df.loc["none", "r1 vs baseline"] == "baseline"
    assert df.loc["none", "r1 mean"] == pytest.approx(0.5)
    assert df.loc["none", "r1 std"] == pytest.approx(np.std([0.5, 0.52, 0.48], ddof=1))
    assert df.loc["none", "seeds"] == "0, 1, 2" and df.loc["none", "runs"] == 3
    assert df.loc["metrix-embed", "r1 vs baseline"] == "not significant"
    # the spreads of metrix-input (sd 0.018) and the baseline (0.02) overlap, but every seed
    # gains 0.025-0.03: the paired interval [0.021, 0.035] excludes 0
    assert df.loc["metrix-input", "r1 vs baseline"] == "significant"
    assert df.loc["metrix-feature", "r1 vs baseline"] == "needs >= 2 seeds"
    assert math.isnan(df.loc["metrix-feature", "r1 std"])
    assert df.loc["embedding-expansion", "r1 vs baseline"] == "no baseline"
    assert list(tables.group_runs(rows, ["r1"])["mixing"])[0] == "none"   # baseline first


def test_group_runs_paired_difference_to_the_baseline():
    from dml.stats import paired_interval as paired_ci

    base = {0: 0.50, 1: 0.52, 2: 0.47}
    mix = {0: 0.55, 1: 0.56, 2: 0.50}
    rows = [{"id": f"b{s}", "config": cfg(seed=s), "values": {"r1": v, "m": v / 2}}
            for s, v in base.items()]
    rows += [{"id": f"m{s}", "config": cfg("metrix-embed", seed=s), "values": {"r1": v}}
             for s, v in mix.items()]
    rows.append({"id": "m2bis", "config": cfg("metrix-embed", seed=2), "values": {"r1": 0.52}})
    rows.append({"id": "i0", "config": cfg("metrix-input", seed=0), "values": {"r1": 0.6}})
    rows.append({"id": "f9", "config": cfg("metrix-feature", seed=9), "values": {"r1": 0.6}})
    rows.append({"id": "t0", "config": cfg("embedding-expansion", loss="triplet"),
                 "values": {"r1": 0.4}})
    df = tables.group_runs(rows, ["r1"], paired=["r1", "m"]).set_index("mixing")
    # two runs of seed 2: their mean is paired with the baseline's seed 2
    want = paired_ci([0.55, 0.56, 0.51], [0.50, 0.52, 0.47])
    got = df.loc["metrix-embed", ["r1 Δ", "r1 Δ low", "r1 Δ high"]].tolist()
    assert got == pytest.approx(list(want)) and df.loc["metrix-embed", "r1 pairs"] == 3
    assert df.loc["metrix-embed", "seeds"] == "0, 1, 2" and df.loc["metrix-embed", "runs"] == 4
    assert df.loc["metrix-embed", "m pairs"] == 0          # no 'm' value on the mixing side
    assert df.loc["metrix-input", "r1 Δ"] == pytest.approx(0.1)
    assert math.isnan(df.loc["metrix-input", "r1 Δ low"])   # one pair: no interval
    assert df.loc["metrix-feature", "r1 pairs"] == 0        # no seed in common
    assert math.isnan(df.loc["none", "r1 Δ"]) and df.loc["none", "role"] == "baseline"
    assert df.loc["embedding-expansion", "role"] == "no baseline"

    show = tables.final_table(df.reset_index(), ["r1"], paired=["r1"]).set_index("configuration")
    col = tables.delta_label("r1")
    assert col == "Δr1 vs baseline [95% CI], paired by seed"
    assert tables.delta_label("test.recall@1") == "ΔR@1 vs baseline [95% CI], paired by seed"
    mean, lo, hi = want
    assert show.loc["digits / contrastive / metrix-embed", col] == \
        f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" + (" *" if lo > 0 or hi < 0 else "")
    assert show.loc["digits / contrastive / none", col] == "baseline"
    assert show.loc["digits / contrastive / metrix-input", col] == \
        "+0.1000 (1 seed pair: no interval)"
    assert show.loc["digits / contrastive / metrix-feature", col] == \
        "no seed pair with the baseline"
    assert show.loc["digits / triplet / embedding-expansion", col] == "no baseline"
    assert list(show.columns[:3]) == ["seeds", col, "r1"]
    assert tables.delta_text(0.02, 0.01, 0.03, 3) == "+0.0200 [+0.0100, +0.0300] *"


# --------------------------------------------------------------------------- selection

def point_table():
    ev = {"train_embeddings": np.eye(4, dtype=np.float16)[[0, 0, 1, 1, 2, 2]],
          "train_labels": np.array([0, 0, 1, 1, 2, 2]),
          "test_embeddings": np.eye(4, dtype=np.float16)[[3, 3]],
          "test_labels": np.array([7, 7]),
          "synthetic_embeddings": np.full((3, 4), 0.5, np.float32),
          "synthetic_parents": np.array([[0, 1], [1, 2], [0, 2]]),
          "probe_index": np.array([0, 2, 4]),
          "synthetic_weight": np.array([0.3, 0.5, 0.9], np.float32),
          "synthetic_kind": np.array(["metrix-embed"] * 3),
          "synthetic_top_classes": np.array([[0, 1], [1, 2], [0, 2]])}
    proj = {"train": np.arange(12, dtype=np.float32).reshape(6, 2),
            "test": np.array([[100, 100], [101, 101]], np.float32),
            "synthetic": np.array([[50, 50], [51, 51], [52, 52]], np.float32)}
    return selection.build_point_table(ev, proj)


def test_point_table_provenance():
    pt = point_table()
    assert list(pt.split) == ["train"] * 6 + ["test"] * 2 + ["synthetic"] * 3
    assert list(pt.index) == [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]
    # synthetic parents index the probe batch -> train images and their classes
    np.testing.assert_array_equal(pt.parent_index[8:], [[0, 2], [2, 4], [0, 4]])
    np.testing.assert_array_equal(pt.parents[8:], [[0, 1], [1, 2], [0, 2]])
    assert selection.describe_point(pt, 9) == "synthetic (metrix-embed): classes 1 × 2, λ=0.50"
    assert selection.describe_point(pt, 6, {7: "seven"}) == "test #0: class 7 (seven)"
    assert selection.class_label(3, {3: "5"}) == "3 (5)" and selection.class_label(3, {3: "3"}) == "3"
    assert selection.short_caption(pt, 9) == "1×2 · λ=0.50"
    assert selection.short_caption(pt, 3) == "#3 · class 1"


def test_visible_mask_isolates_classes_and_the_points_between_them():
    pt = point_table()
    assert selection.visible_mask(pt, ["train", "test"]).sum() == 11
    assert selection.visible_mask(pt, ["train"], show_synthetic=False).sum() == 6
    m = selection.visible_mask(pt, ["train", "test"], [0, 1], True)
    np.testing.assert_array_equal(np.flatnonzero(m), [0, 1, 2, 3, 8])   # + the 0x1 mix only


def test_ids_from_plotly_events():
    ev = {"selection": {"points": [{"customdata": 5}, {"customdata": [2]},
                                   {"curve_number": 1, "point_index": 0}],
                        "point_indices": [0], "box": [], "lasso": []}}
    assert selection.ids_from_event(ev, [np.array([9]), np.array([7, 8])]).tolist() == [2, 5, 7]
    assert selection.ids_from_event(None).tolist() == []
    assert selection.ids_from_event({"selection": {"points": []}}).tolist() == []


def test_box_and_lasso_selection():
    xy = np.array([[0, 0], [1, 1], [2, 2], [3, 0.5], [0.5, 2]], np.float32)
    assert selection.points_in_box(xy, (2.5, 0.5), (0, 2.1)).tolist() == [1, 2, 4]
    tri = ([-0.5, 3, -0.5], [-1, 2.6, 2.6])              # upper-left of a line below the diagonal
    assert selection.points_in_lasso(xy, *tri).tolist() == [0, 1, 2, 4]
    assert selection.points_in_lasso(xy, [0, 1], [0, 1]).tolist() == []
    pt = point_table()
    ev = {"selection": {"box": [{"x": [-1, 4], "y": [-1, 4]}],
                        "lasso": [{"x": [99, 102, 102, 99], "y": [99, 99, 102, 102]}]}}
    assert selection.ids_from_shapes(ev, pt).tolist() == [0, 1, 6, 7]
    vis = selection.visible_mask(pt, ["train"], show_synthetic=False)
    assert selection.ids_from_shapes(ev, pt, vis).tolist() == [0, 1]


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((7, 5)), rng.standard_normal((30, 5))
    idx, dist = selection.nearest_neighbours(q, r, k=4)
    d = np.linalg.norm(q[:, None] - r[None], axis=-1)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :4])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :4], rtol=1e-4, atol=1e-5)
    idx, _ = selection.nearest_neighbours(r[:3], r, k=2, exclude=np.array([0, 1, -1]))
    assert 0 not in idx[0] and 1 not in idx[1] and idx[2, 0] == 2


def test_neighbours_of_selection_exclude_the_query_itself():
    pt = point_table()
    out = selection.neighbours_of_selection(pt, np.array([0, 9]), k=2, among=("train",))
    assert out[0]["id"] == 0 and out[0]["neighbours"][0] == 1 and 0 not in out[0]["neighbours"]
    assert out[0]["distances"][0] == pytest.approx(0.0, abs=1e-3)
    assert len(out[1]["neighbours"]) == 2
    assert all(pt.split[n] == "train" for row in out for n in row["neighbours"])


# --------------------------------------------------------------------------- plots

def test_map_figure_is_webgl_with_ids_and_distinct_synthetic_marker():
    pt = point_table()
    vis = selection.visible_mask(pt, ["train", "test"])
    fig, ids = plots.map_figure(pt, vis)
    data = {t.name: t for t in fig.data}
    assert all(t.type == "scattergl" for t in fig.data if t.x[0] is not None)
    assert list(data["train"].customdata[:, 0]) == [0, 1, 2, 3, 4, 5]
    assert list(data["train"].customdata[:, 2]) == [0, 0, 1, 1, 2, 2]       # class, for hover
    assert data["train"].hovertemplate.startswith("train #%{customdata[1]}")
    assert list(data["synthetic"].customdata) == [8, 9, 10]
    assert data["synthetic"].marker.symbol == plots.SYNTHETIC_SYMBOL == "x-thin-open"
    assert data["train"].marker.symbol == "circle" and data["test"].marker.symbol == "diamond"
    assert [len(i) for i in ids] == [6, 2, 3]
    # points of one class share a colour; classes differ
    c = data["train"].marker.color
    assert c[0] == c[1] and c[0] != c[2]
    scale = data["train"].marker.colorscale
    assert len({col for _, col in scale}) == 4            # one colour per class (0, 1, 2, 7)
    assert "λ=0.30" in data["synthetic"].text[0]
    named, _ = plots.map_figure(pt, vis, class_names={0: "zero"})
    assert named.data[0].text[0] == "train #0: class 0 (zero)"
    assert {"train (6)", "test (2)", "synthetic (3)", "class 0", "class 7"} <= set(data)
    named_chips = {t.name for t in named.data if t.legendgroup == "classes"}
    assert named_chips == {"class 0 (zero)", "class 1", "class 2", "class 7"}
    fig2, ids2 = plots.map_figure(pt, selection.visible_mask(pt, ["test"], show_synthetic=False))
    assert [t.name for t in fig2.data if t.x[0] is not None] == ["test"] and len(ids2) == 1


def test_large_maps_name_classes_in_the_legend_not_per_point(monkeypatch):
    pt = point_table()
    vis = selection.visible_mask(pt, ["train", "test"])
    monkeypatch.setattr(plots, "MAX_NAMED_HOVER_POINTS", 7)     # 8 real points: a "large" map
    fig, _ = plots.map_figure(pt, vis, class_names={0: "zero", 7: "seven"})
    data = {t.name: t for t in fig.data}
    assert data["train"].text is None                         # no per-point strings
    assert data["train"].hovertemplate.startswith("train #%{customdata[1]}")
    assert {"class 0 (zero)", "class 7 (seven)"} <= set(data)
    assert "classes 0 (zero) × 1" in data["synthetic"].text[0]
    # names equal to the ids (nothing to add) cost nothing either, on any map
    monkeypatch.setattr(plots, "MAX_NAMED_HOVER_POINTS", 10_000)
    same, _ = plots.map_figure(pt, vis, class_names={c: str(c) for c in range(8)})
    assert same.data[0].text is None


def test_curve_histogram_and_terms_figures():
    f = plots.curves_figure([{"name": "a", "x": [1, 2], "y": [0.1, 0.2]},
                             {"name": "b", "x": [1], "y": [0.3], "dash": "dash"}], title="t")
    assert [t.name for t in f.data] == ["a", "b"] and f.data[1].line.dash == "dash"
    h = plots.histogram_figure({"x": np.array([0.1, 0.2, 0.3]), "y": np.array([]),
                                "z": np.array([0.5])})
    assert [t.name for t in h.data] == ["x", "z"] and h.layout.barmode == "overlay"
    lams = np.linspace(0, 1, 5)
    t = plots.loss_terms_figure(lams, {"contrastive": {"pos": lams, "neg": 1 - lams},
                                       "n-pair": {"total": lams}}, current=0.5)
    assert [a.text for a in t.layout.annotations][:2] == ["contrastive", "n-pair"]
    assert len(t.data) == 3
    s = plots.soft_label_figure({"class 1": 0.3, "class 2": 0.7})
    assert list(s.data[0].y) == [0.3, 0.7]


# --------------------------------------------------------------------------- forms

def test_param_parsing_and_changed_params():
    assert forms.parse_param("3", 1) == 3 and forms.parse_param("0.5", 1) == 0.5
    assert forms.parse_param("2", 0.1) == 2.0 and forms.parse_param("off", True) is False
    assert forms.parse_param("batch-hard", "all") == "batch-hard"
    assert forms.parse_param("", None) is None and forms.parse_param("[1, 2]", None) == [1, 2]
    with pytest.raises(ValueError):
        forms.parse_param("maybe", True)
    assert forms.changed_params({"a": 1, "b": 2}, {"a": 1, "b": 3}) == {"b": 2}


def test_strategies_follow_the_registry():
    from dml.mixing import supported_pairs
    for loss in ("contrastive", "proxy-anchor", "triplet"):
        got = forms.strategies_for(loss)
        assert got[0] == "none"
        assert set(got) == {m for m, l in supported_pairs() if l == loss}


def test_build_config_validates():
    c = forms.build_config("digits", "contrastive", "none", {"pos_margin": 0.9}, {},
                           epochs=3, seed=2, name="n", extra=["train.lr=3e-4", ""])
    assert c["loss"]["params"] == {"pos_margin": 0.9} and c["train"]["lr"] == 3e-4
    assert c["train"]["epochs"] == 3 and c["train"]["seed"] == 2 and c["name"] == "n"
    with pytest.raises(ValueError, match="unknown"):
        forms.build_config("digits", "contrastive", "none", {"nope": 1}, {}, epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        forms.build_config("digits", "contrastive", "none", {}, {}, epochs=0, seed=0)


# --------------------------------------------------------------------------- mixlab

@pytest.fixture(scope="module")
def tiny_model():
    from dml.models import build_model
    torch.manual_seed(0)
    return build_model("small-cnn", 1, 8, 16, width=8).eval()


def test_mixes_at_each_level_end_at_the_pair(tiny_model):
    x = torch.randn(2, 1, 8, 8)
    lams = np.array([0.0, 0.5, 1.0])
    paths = mixlab.mix_embeddings(tiny_model, x[:1], x[1:], lams)
    with torch.no_grad():
        e = tiny_model(x).numpy()
    for level in mixlab.LEVELS:
        assert paths[level].shape == (3, 16)
        np.testing.assert_allclose(paths[level][2], e[0], atol=1e-5)    # lambda = 1: image 1
        np.testing.assert_allclose(paths[level][0], e[1], atol=1e-5)    # lambda = 0: image 2
        np.testing.assert_allclose(np.linalg.norm(paths[level], axis=1), 1, atol=1e-5)
    mid = (e[0] + e[1]) / np.linalg.norm(e[0] + e[1])
    np.testing.assert_allclose(paths["embedding"][1], mid, atol=1e-5)
    stage1 = mixlab.mix_embeddings(tiny_model, x[:1], x[1:], lams, stage=1)
    assert not np.allclose(stage1["feature"][1], paths["feature"][1])


def test_mix_images_soft_label_and_expansion():
    a, b = np.full((1, 2, 2), 200, np.uint8), np.zeros((1, 2, 2), np.uint8)
    assert (mixlab.mix_images(a, b, 0.25) == 50).all()
    assert mixlab.soft_label(0.3, 1, 4) == {1: 0.3, 4: pytest.approx(0.7)}
    assert mixlab.soft_label(0.3, 2, 2) == {2: pytest.approx(1.0)}
    ei, ej = np.array([1.0, 0, 0], np.float32), np.array([0, 1.0, 0], np.float32)
    pts = mixlab.expansion_points(ei, ej, n=2)
    raw = np.stack([(2 * ei + ej) / 3, (ei + 2 * ej) / 3])
    np.testing.assert_allclose(pts, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(mixlab.expansion_points(ei, ej, 1, normalize=False),
                               [[0.5, 0.5, 0]])


def test_loss_terms_vs_lambda():
    from dml.losses import list_losses
    rng = np.random.default_rng(0)
    e = rng.standard_normal((3, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    lams = np.linspace(0, 1, 5)
    mixes = np.stack([l * e[1] + (1 - l) * e[2] for l in lams])
    proxies = mixlab.class_proxies(e, np.array([0, 0, 1]), np.array([0, 1]))
    terms = mixlab.loss_terms_vs_lambda(e[0], mixes, lams, 0, 1, 2, proxies=proxies)
    assert list(terms) == list_losses()
    con = terms["contrastive"]
    assert con["pos"][0] == pytest.approx(0.0) and con["pos"][-1] > 0    # weighted by lambda
    assert con["neg"][-1] == pytest.approx(0.0)                          # weighted by 1-lambda
    assert all(len(v) == 5 for t in terms.values() for v in t.values())
    plot = mixlab.terms_for_plot(terms)
    assert set(plot["contrastive"]) == {"pos", "neg"}
    assert set(mixlab.loss_terms_vs_lambda(e[0], mixes, lams, 0, 1, 2)) < set(list_losses())


# --------------------------------------------------------------------------- images

def test_display_images():
    x = np.arange(2 * 1 * 8 * 8, dtype=np.uint8).reshape(2, 1, 8, 8)
    d = images.to_display(x, 64)
    assert d.shape == (2, 64, 64) and d[0, 0, 7] == x[0, 0, 0, 0] and d[0, 0, 8] == x[0, 0, 0, 1]
    assert images.to_display(np.zeros((1, 3, 32, 32), np.uint8), 64).shape == (1, 64, 64, 3)
    mean, std = (0.5,), (0.25,)
    norm = (x / 255.0 - 0.5) / 0.25
    from dml.data.transforms import denormalize
    np.testing.assert_array_equal(denormalize(norm, mean, std), x)
    old = {"name": "digits", "root": None, "image_size": None, "val_classes": 0.2,
           "split": "default", "split_seed": 3}                   # written before split versions
    assert len(images.load_run_dataset({"data": old}).test) == 714        # digits 6-9
    assert len(images.load_run_dataset({"data": dict(old, split_version=2)}).test) == 896  # 5-9


# --------------------------------------------------------------------------- jobs

def test_demo_set_uses_registered_strategies():
    from dml.mixing import supported_pairs
    configs, notes = jobs.demo_configs()
    assert len(configs) == 3 and configs[0]["mixing"]["name"] == "none"
    pairs = set(supported_pairs())
    for c in configs:
        assert c["data"]["name"] == "digits"
        assert (c["mixing"]["name"], c["loss"]["name"]) in pairs
    names = [c["mixing"]["name"] for c in configs]
    for slot, got in zip(jobs.DEMO_PLAN[1:], names[1:]):
        assert got in [s for _, s in slot["choices"]] or any(slot["title"] in n for n in notes)


def test_demo_set_falls_back_and_says_so(monkeypatch):
    import dml.mixing
    monkeypatch.setattr(dml.mixing, "supported_pairs",
                        lambda: [("none", l) for l in ("contrastive", "multi-similarity")])
    configs, notes = jobs.demo_configs()
    assert [c["mixing"]["name"] for c in configs] == ["none"] * 3
    assert len(notes) == 2 and "not registered" in notes[0]


def test_job_progress_text():
    job = {"title": "demo set", "state": "running", "current": 1, "phase": "training",
           "progress": {"epoch": 2, "epochs": 8, "step": 10, "steps": 40},
           "runs": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    frac, text = jobs.job_progress(job)
    assert frac == pytest.approx((1 + 0.9 * 0.25) / 3)
    assert text == "demo set: run 2/3 b - epoch 2/8, step 10/40"
    assert jobs.job_progress(dict(job, phase="maps"))[1].endswith("computing maps")
    maps = dict(job, progress=dict(job["progress"], phase="maps"))
    assert jobs.job_progress(maps)[1].endswith("computing maps")
    assert tables.status_text("running", {"phase": "projections", "epoch": 2,
                                          "epochs": 2}) == "running: computing maps for the app"
    assert jobs.job_progress(dict(job, state="finished"))[0] == 1.0
    # a finished run whose maps are still being made in the background says so
    bg = {"state": "running", "alive": True, "pending": 3}
    assert tables.status_text("finished", {}, bg) == "finished · maps: 3 to go"
    assert tables.status_text("finished", {}, dict(bg, state="queued")) == \
        "finished · maps queued"
    assert tables.status_text("finished", {}, dict(bg, alive=False)) == "finished"
    assert tables.status_text("finished", {}, {"state": "failed", "alive": False}) == \
        "finished · maps failed: see maps.log"


def test_the_explorer_says_where_a_background_map_stands():
    from app.common import background_map_text

    bg = {"state": "running", "current": "umap:2", "detail": "placing 8,192 of 40,000",
          "pending": 2}
    assert "UMAP map of epoch 2 is being computed now (placing 8,192 of 40,000)" in \
        background_map_text(bg, 2, "umap")
    assert "next; now: the UMAP map of epoch 2" in background_map_text(bg, 3, "pca")
    assert "queued behind other runs' maps" in background_map_text(
        dict(bg, state="queued", current=None), 2, "umap")


def test_a_job_trains_in_a_subprocess(tmp_path, monkeypatch):
    from dml.config import RunConfig
    from dml.runs import list_runs
    from tests.test_app_fixtures import TINY
    monkeypatch.setenv("DML_PRECOMPUTE", "pca")
    c = RunConfig().with_overrides(TINY + ["train.epochs=1", "train.iterations_per_epoch=3",
                                           "name=job-test"]).to_dict()
    bad = dict(c, loss={"name": "contrastive", "params": {"pos_margin": "x"}})
    job = jobs.start_job(tmp_path, [c, bad], title="t")
    assert job["pid"] and (tmp_path / ".jobs" / f"{job['id']}.json").is_file()
    t0 = time.time()
    while jobs.read_job(job["path"])["state"] in ("queued", "running"):
        assert time.time() - t0 < 180, jobs.read_job(job["path"])
        time.sleep(0.3)
    done = jobs.read_job(job["path"])
    assert done["state"] == "failed", done          # the second configuration cannot train
    runs = list_runs(tmp_path)
    ok = [r for r in runs if r.status()["state"] == "finished"]
    assert len(ok) == 1 and ok[0].config()["name"] == "job-test"
    assert done["runs"][0]["run_dir"] == str(ok[0].path)
    assert done["runs"][1]["error"] and not done["runs"][0]["error"]
    assert jobs.job_progress(done)[0] > 0.5


def test_method_versions_separate_configurations_but_not_baselines():
    # a run of Embedding Expansion before its mining fix (no version, i.e. 1) and one after
    # (version 2) are different configurations; both share the same baseline
    old, new = cfg("embedding-expansion", loss="triplet"), cfg("embedding-expansion", loss="triplet")
    new["mixing"]["version"] = 2
    assert tables.config_key(old) != tables.config_key(new)
    base = cfg(loss="triplet")
    base["mixing"]["version"] = 1
    assert tables.baseline_key(new) == tables.baseline_key(old) == tables.config_key(base)
    assert tables.config_key(base) == tables.config_key(cfg(loss="triplet"))


def test_mean_series_by_hand_and_band_colours():
    from app import plots

    x, mean, sd, n = tables.mean_series([([1, 2, 3], [0.5, 0.6, 0.7]), ([1, 2], [0.7, 0.8]),
                                         ([2], [1.0])])
    assert x == [1, 2, 3] and n == [2, 3, 1]
    assert mean == pytest.approx([0.6, 0.8, 0.7])
    # epoch 2: 0.6, 0.8, 1.0 -> sd 0.2; epoch 1: 0.5, 0.7 -> 0.1414...; one run: 0
    assert sd == pytest.approx([2 ** 0.5 / 10, 0.2, 0.0])
    assert plots.with_alpha("#636efa", 0.2) == "rgba(99, 110, 250, 0.2)"
    assert plots.with_alpha("rgb(1, 2, 3)", 0.5) == "rgba(1, 2, 3, 0.5)"
    key = plots.color_key_html([("#000000", "a <b>")])
    assert "a &lt;b&gt;" in key and "#000000" in key
