"""One broken run (a garbage config.json, status.json or metrics.jsonl) never breaks the app: the
Runs page lists the other runs and names the broken one with its file and error; the Compare page
compares the others and notes the one it leaves out. Runs are written with the trainer's
``RunWriter`` (no training), pages driven with ``streamlit.testing`` AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app import tables  # noqa: E402
from dml.config import RunConfig, resolve_versions  # noqa: E402
from dml.runs import RunWriter, summarize_runs  # noqa: E402
from tests.test_app_pages import open_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "app" / "main.py"
TIMEOUT = 120
GOOD = ["good-a", "good-c"]
BAD = "bad-b"
BROKEN = {
    "config.json": ("{not json", "not valid JSON"),
    "status.json": ("\x00garbage", "not valid JSON"),
    "metrics.jsonl": ('{"epoch": 1}\n{"epoch": 2, "te\n', "line 2 is not valid JSON"),
}


def make_runs(root: Path, broken_file: str) -> None:
    """Finished runs good-a (seed 0), bad-b (seed 1) and good-c (seed 2) of one configuration,
    with two evaluations each; then ``broken_file`` of bad-b is overwritten with garbage."""
    for seed, rid in enumerate(["good-a", BAD, "good-c"]):
        cfg = resolve_versions(RunConfig().with_overrides(
            ["data.name=digits", f"train.seed={seed}", f"name={rid}"])).to_dict()
        with RunWriter.create(root, cfg, run_id=rid) as w:
            for epoch in (1, 2):
                w.append_metrics({"epoch": epoch, "train": {"loss": 1.0 / epoch},
                                  "val": {"recall@1": 0.3 + 0.1 * epoch},
                                  "test": {"recall@1": 0.4 + 0.1 * epoch + 0.01 * seed,
                                           "map@r": 0.2, "nmi": 0.5}, "utilization": 0.7})
            w.set_status("finished", progress={"epoch": 2, "epochs": 2},
                         best={"epoch": 2, "val": {"recall@1": 0.5},
                               "test": {"recall@1": 0.6 + 0.01 * seed, "map@r": 0.2,
                                        "nmi": 0.5}, "utilization": 0.7})
    (root / BAD / broken_file).write_text(BROKEN[broken_file][0], encoding="utf-8")


def frame(at: AppTest, column: str):
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with a {column!r} column")


@pytest.mark.parametrize("broken_file", list(BROKEN))
def test_runs_page_lists_the_good_runs_and_names_the_broken_one(tmp_path, monkeypatch,
                                                                  broken_file):
    make_runs(tmp_path, broken_file)
    at = open_app(tmp_path, monkeypatch)
    assert sorted(frame(at, "status")["run"]) == GOOD
    warnings = [w.value for w in at.warning]
    assert any(BAD in w and broken_file in w and BROKEN[broken_file][1] in w for w in warnings)
    bad = frame(at, "file")
    assert list(bad["run"]) == [BAD] and list(bad["file"]) == [broken_file]
    assert BROKEN[broken_file][1] in bad["error"].iloc[0]


@pytest.mark.parametrize("broken_file", list(BROKEN))
def test_compare_page_compares_the_others_and_notes_the_broken_one(tmp_path, monkeypatch,
                                                                     broken_file):
    make_runs(tmp_path, broken_file)
    at = open_app(tmp_path, monkeypatch, page="compare")
    assert sorted(at.multiselect(key="cmp-runs").value) == GOOD
    assert [o.split(" · ")[0] for o in sorted(at.multiselect(key="cmp-runs").options)] == GOOD
    warnings = [w.value for w in at.warning]
    assert any(BAD in w and broken_file in w and "Left out 1 run" in w for w in warnings)
    final = frame(at, "configuration")
    assert list(final["seeds"]) == ["0, 2"]           # good-a and good-c


def test_unreadable_table_rows():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        make_runs(Path(d), "config.json")
        _, errors = summarize_runs(d)
    df = tables.unreadable_table(errors)
    assert list(df.columns) == ["run", "file", "error"]
    assert df.iloc[0]["run"] == BAD and df.iloc[0]["file"] == "config.json"
    assert tables.unreadable_text(errors[0]).startswith(f"{BAD}: config.json: not valid JSON")
    assert tables.unreadable_table([]).empty
