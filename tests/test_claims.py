import json
import math

import pytest

from dml.claims import GRIDS, Cell
from dml.report import write_section
from dml.stats import mean_sd
from dml.stats import paired_interval as paired_ci
from dml.cli import main
from dml.runs import list_runs


def test_paired_ci_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653, half width 4.302653/sqrt(3)
    mean, lo, hi = paired_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    m, s = mean_sd([1.0, 2.0, 3.0])
    assert (m, s) == pytest.approx((2.0, 1.0))
    assert math.isnan(paired_ci([1.0], [0.0])[1])
    with pytest.raises(ValueError):
        paired_ci([1.0], [])


def test_cell_baseline_drops_only_mixing_keys():
    c = Cell("triplet", "embedding-expansion", ("mixing.params.n=4", "train.epochs=9"))
    assert c.baseline() == Cell("triplet", "none", ("train.epochs=9",))
    assert "n=4" in c.label


def test_grids_name_registered_losses():
    from dml.losses import list_losses
    for cells in GRIDS.values():
        assert {c.loss for c in cells} <= set(list_losses())


def test_write_section_keeps_prose(tmp_path):
    p = tmp_path / "R.md"
    p.write_text("# Results\n\nprose before\n")
    write_section(p, "g", "table 1")
    write_section(p, "g", "table 2")
    text = p.read_text()
    assert "prose before" in text and "table 2" in text and "table 1" not in text
    assert text.count("tango:g:begin") == 1


@pytest.mark.slow
def test_smoke_grid_trains_reuses_and_reports(tmp_path, capsys):
    args = ["bench", "claims", "--dataset", "digits", "--grid", "smoke", "--seeds", "2",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "R.md"),
            "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=3",
            "--set", "model.params.width=8", "--set", "train.clustering=false",
            "--set", "train.projections=none"]
    assert main(args) == 0
    assert len(list_runs(tmp_path / "runs")) == 4
    out = capsys.readouterr()
    assert "4 to train" in out.err
    table = (tmp_path / "R.md").read_text()
    assert "| contrastive | none | 2 |" in table and "| contrastive | none (neg_margin=0.4) | 2 |" in table
    assert "Training time:" in table and "with 1 parallel job)" in table
    assert "this invocation trained 4 runs in" in table and "reused 0" in table
    assert "| ep 1 |" in table     # the validation curves
    # rerun: nothing is trained again, the same runs are reported
    assert main(args) == 0
    assert "4 already finished, 0 to train" in capsys.readouterr().err
    assert "trained nothing and reused all 4 runs" in (tmp_path / "R.md").read_text()
    assert len(list_runs(tmp_path / "runs")) == 4


def test_validation_curves_average_seeds_and_keep_the_last_epoch(tmp_path):
    from dml.claims import GridResult, GridRun
    from dml.report import curves_table, validation_curves
    from dml.config import RunConfig
    from dml.runs import RunWriter

    cell = Cell("contrastive")
    items = []
    for seed, offset in ((0, 0.0), (1, 0.1)):
        w = RunWriter.create(tmp_path, RunConfig().to_dict(), run_id=f"r{seed}")
        for e in range(1, 11):
            w.append_metrics({"epoch": e, "val": {"recall@1": e / 20 + offset}})
        w.set_status("finished", best={"epoch": 4 + 2 * seed, "test": {"recall@1": 0.5}})
        items.append(GridRun(cell, seed, RunConfig(), w.run))
    curves = validation_curves(GridResult(items, 0.0, 2), points=4)[cell]
    assert len(curves) <= 4 and max(curves) == 10
    for e, v in curves.items():
        assert v == pytest.approx(e / 20 + 0.05)
    table = curves_table(GridResult(items, 0.0, 2))
    row = [r for r in table.splitlines() if r.startswith("| contrastive")][0]
    assert row.endswith("| 5.0 |")          # chosen epochs 4 and 6
    assert "| 55.0 |" in row                # epoch 10: (0.5 + 0.6) / 2


def test_run_metrics_of_the_chosen_and_of_the_last_evaluation(tmp_path):
    from dml.claims import run_metrics
    from dml.config import RunConfig
    from dml.runs import RunWriter

    w = RunWriter.create(tmp_path, RunConfig().to_dict())
    for e, r1 in ((1, 0.5), (2, 0.8), (3, 0.7)):
        w.append_metrics({"epoch": e, "test": {"recall@1": r1}, "utilization": e / 10})
    w.set_status("finished", best={"epoch": 2, "test": {"recall@1": 0.8}, "utilization": 0.2})
    assert run_metrics(w.run) == {"recall@1": 0.8, "utilization": 0.2, "epoch": 2}
    assert run_metrics(w.run, "last") == {"recall@1": 0.7, "utilization": 0.3, "epoch": 3}


def test_grid_key_treats_an_explicit_default_parameter_as_the_default_run():
    from dml.claims import cell_config
    from dml.stats import run_key as _key

    def key(*overrides):
        return _key(cell_config(Cell("multi-similarity", "metrix-embed", overrides), "digits", 0,
                                ["train.threads=1"]).to_dict())

    assert key("mixing.params.alpha=2.0", "mixing.params.w=0.4") == key()
    assert key("mixing.params.alpha=1.0") != key()
    assert key("loss.params.beta=50") == key() != key("loss.params.beta=40")
    # the thread count and the name do not change a result
    other = cell_config(Cell("multi-similarity", "metrix-embed"), "digits", 0,
                        ["train.threads=2", "name=x"]).to_dict()
    assert _key(other) == key()


def test_grid_never_reuses_a_run_of_another_method_version(tmp_path):
    # a finished run trained before a method changed (its config has no version, or an older
    # one) is not the same configuration as the cell; one of the current version is
    from dml.claims import cell_config
    from dml.stats import run_key as _key
    from dml.mixing import mixing_version

    cell = Cell("triplet", "embedding-expansion")
    want = cell_config(cell, "digits", 0, []).to_dict()
    assert want["mixing"]["version"] == mixing_version("embedding-expansion") == 2
    stale = json.loads(json.dumps(want))
    del stale["mixing"]["version"]
    del stale["loss"]["version"]
    older = json.loads(json.dumps(want))
    older["mixing"]["version"] = 1
    assert _key(stale) != _key(want) and _key(older) != _key(want)
    assert _key(json.loads(json.dumps(want))) == _key(want)


def test_utilization_vs_retrieval_rank_correlations():
    from dml.report import utilization_vs_retrieval

    def row(loss, mixing, u, r1, delta=None):
        r = {"cell": Cell(loss, mixing), "utilization": (u, 0.0), "recall@1": (r1, 0.0)}
        if delta is not None:
            r["delta_recall@1"] = (delta, delta - 0.01, delta + 0.01)
        return r

    # all cells: utilization ranks 1 2 3 4 5, R@1 ranks 5 4 3 2 1 -> rho = -1 exactly.
    # mixing cells against their baselines: du = +0.15, +0.2, +0.3 with dR@1 = +0.01, +0.02,
    # +0.03 -> rho = +1 exactly
    rows = [row("a", "none", 0.1, 0.9), row("b", "none", 0.2, 0.8),
            row("a", "m1", 0.25, 0.7, delta=0.01), row("a", "m2", 0.3, 0.6, delta=0.02),
            row("b", "m1", 0.5, 0.5, delta=0.03)]
    text = utilization_vs_retrieval(rows)
    assert "over all cells rho = -1.00" in text and "n = 5 cells" in text
    assert "baseline: rho = +1.00" in text and "n = 3 cells" in text


def test_seeds_for_half_width_and_resolution():
    from dml.report import resolution, seeds_for_half_width

    # t(0.975, 4) = 2.776445: sd 1 gives half-width 2.776445 / sqrt(5) = 1.2416 with 5 seeds;
    # t(0.975, 7) = 2.364624: 2.364624 / sqrt(8) = 0.8360 <= 1 with 8 seeds, and with 7 seeds
    # t(0.975, 6) = 2.446912: 2.446912 / sqrt(7) = 0.9248 <= 1 too; with 6: 2.570582 / sqrt(6)
    # = 1.0494 > 1. So 7 seeds.
    assert seeds_for_half_width(1.0, 1.0) == 7
    assert seeds_for_half_width(0.0, 0.5) == 2
    half = 2.776445 * 0.02 / math.sqrt(5)                 # sd 2 points over 5 seeds
    rows = [{"seeds": 5, "delta_recall@1": (0.0, -half, half)}, {"seeds": 5}]
    text = resolution(rows)
    assert "from 2.5 to 2.5 points" in text and "median 2.0" in text
    assert f"needs {seeds_for_half_width(0.02, 0.01)} seeds" in text


def test_grid_tables_show_the_recall_at_k_the_runs_recorded():
    from dml.claims import metric_names
    from dml.report import results_table

    sop = [{"recall@1000": 0.9, "recall@1": 0.5, "recall@10": 0.7, "recall@100": 0.8,
            "map@r": 0.2, "nmi": 0.8}]
    assert metric_names(sop) == ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r",
                                 "nmi")
    assert metric_names([{"recall@2": 1, "recall@1": 1}, {"recall@8": 1}]) == (
        "recall@1", "recall@2", "recall@8", "map@r", "nmi")
    row = {"loss": "contrastive", "mixing": "none", "seeds": 2,
           **{k: (v, 0.01) for k, v in sop[0].items()}}
    head, rule, line = results_table([row]).splitlines()
    assert "| R@1 | R@10 | R@100 | R@1000 | MAP@R | NMI |" in head
    assert rule.count("---") == head.count("|") - 1
    assert line.split("|")[7].strip() == "90.0 ± 1.0"          # R@1000's column, in percent
