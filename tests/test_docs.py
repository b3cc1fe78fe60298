"""docs/METHODS.md stays true to the code: the file the docstrings cite exists, and every test
it names as the check of a statement exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_methods_doc_exists_and_is_cited_by_the_code():
    doc = REPO / "docs" / "METHODS.md"
    assert doc.is_file()
    cited = [p for p in (REPO / "dml").rglob("*.py") if "docs/METHODS.md" in p.read_text()]
    assert len(cited) >= 5
    for p in list((REPO / "dml").rglob("*.py")) + list((REPO / "app").rglob("*.py")):
        text = p.read_text()
        assert not re.search(r"(?<!docs/)METHODS\.md", text), f"{p} cites a METHODS.md elsewhere"


def test_every_test_named_in_methods_doc_exists():
    names = set(re.findall(r"`(test_\w+)", (REPO / "docs" / "METHODS.md").read_text()))
    defined = set()
    for p in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M))
    assert names and not names - defined, f"named but not defined: {sorted(names - defined)}"


def test_every_config_named_in_methods_doc_exists():
    for name in re.findall(r"`(configs/[\w.-]+\.toml)`", (REPO / "docs" / "METHODS.md").read_text()):
        assert (REPO / name).is_file(), name
