"""The README's quick start is what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quickstart_has_exactly_two_commands():
    cmds = quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds


def test_ci_runs_the_readme_test_command():
    test_cmd = quickstart_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci], "CI must run the README's test command"


def test_the_own_loop_example_runs_as_printed(tmp_path):
    import subprocess
    import sys

    text = (REPO / "README.md").read_text()
    section = text.split("## Use it in your own loop", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert 20 <= len(code.splitlines()) <= 25
    assert "MetrixEmbedding(MultiSimilarityLoss()" in code and "pytorch_metric_learning" in code
    assert "dml.train" not in code                       # the public API only, no Tango trainer
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    map_at_r = float(out.stdout.strip().splitlines()[-1])
    assert map_at_r > 0.8          # it learned: the untrained MLP's MAP@R on digits is 0.42


def test_layout_names_every_module_of_the_core_and_only_existing_ones():
    """The README's Layout table: every path it names exists (files named in a folder's row
    are looked up in that folder), and every module of dml/ is named."""
    section = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named: set[Path] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        where, what = line.split("|")[1:3]
        folders = []
        for p in re.findall(r"`([\w./]+)`", where):
            path = REPO / p
            assert path.exists(), p
            named.add(path)
            if path.is_dir():
                folders.append(path)
        for f in re.findall(r"`([\w/]+\.py)`", what) + re.findall(r"`(\w+/)`", what):
            assert any((d / f).exists() for d in folders) or (REPO / f).exists(), \
                f"{f} in the row of {where.strip()}"
            named.update(d / f.rstrip("/") for d in folders if (d / f).exists())
    for py in (REPO / "dml").glob("*.py"):
        if py.name != "__init__.py":
            assert py in named, f"README Layout does not mention dml/{py.name}"


def test_every_test_the_reliability_section_cites_exists():
    text = (REPO / "README.md").read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    files = set(re.findall(r"`(tests/test_\w+\.py)", section))
    named = set(re.findall(r"(?:::|`)(test_\w+)`", section))
    defined = set()
    for p in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M))
    for f in files:
        assert (REPO / f).is_file(), f
    for f, name in re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", section):
        assert re.search(rf"^def {name}\(", (REPO / f).read_text(), flags=re.M), f"{f}::{name}"
    assert len(named) >= 20 and not named - defined, f"cited but not defined: {named - defined}"
