"""Finding a data set on disk and saying clearly what is wrong when it is missing or malformed:
root resolution (explicit root > ``$DML_DATA`` > built-in candidates), the error texts, and the
index-file readers of the path-backed data sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from dml.paths import repo_root

POINT_HINT = (
    "Point Tango at it with the --data-root PATH flag, `data.root` in the run config, or the DML_DATA "
    "environment variable (DML_DATA=/datasets finds /datasets/{name}, or DML_DATA may be the data folder itself)."
)


class DatasetError(ValueError):
    """A data set could not be found or is malformed. The message says what was tried and how to fix it."""


Probe = Callable[[Path], "tuple[Path | None, str]"]


def resolve_root(
    name: str,
    root: str | os.PathLike | None,
    probe: Probe,
    *,
    candidates: Sequence[str | os.PathLike] = (),
    aliases: Sequence[str] = (),
    layout: str = "",
) -> Path:
    """Find a data set's folder: explicit ``root`` > ``$DML_DATA/<name>`` (or an alias folder name) >
    ``$DML_DATA`` itself > built-in ``candidates`` (relative ones are tried from the current directory
    and from the repository root).

    ``probe(path)`` returns ``(data_dir, "")`` when ``path`` holds the data set (``data_dir`` may be a
    sub-folder such as ``CUB_200_2011``) or ``(None, reason)``. An explicit root is never skipped: if
    it does not hold the data the error says why; neither is an existing ``$DML_DATA/<name>`` folder.
    Otherwise every place is tried and the error lists all.
    """
    tried: list[str] = []

    def attempt(path: Path, label: str) -> Path | None:
        path = Path(os.path.expanduser(str(path)))
        if not path.exists():
            tried.append(f"{path}  ({label}): does not exist")
            return None
        if not path.is_dir() and not path.is_file():
            tried.append(f"{path}  ({label}): not a folder")
            return None
        found, reason = probe(path)
        if found is not None:
            return found
        tried.append(f"{path}  ({label}): {reason}")
        return None

    if root is not None and str(root) != "":
        found = attempt(Path(root), "explicit root")
        if found is not None:
            return found
        raise _not_found(name, tried, layout)

    env = os.environ.get("DML_DATA")
    if env:
        base = Path(os.path.expanduser(env))
        seen = set()
        for sub in (name, *aliases):
            if sub in seen:
                continue
            seen.add(sub)
            p = base / sub
            if p.exists() or sub == name:
                existed = p.exists()
                found = attempt(p, f"$DML_DATA/{sub}")
                if found is not None:
                    return found
                if existed:  # the user's own folder for this data set is broken: say so, do not skip it
                    raise _not_found(name, tried, layout)
        found = attempt(base, "$DML_DATA")
        if found is not None:
            return found

    seen_paths: set[str] = set()
    for cand in candidates:
        cand = Path(os.path.expanduser(str(cand)))
        if cand.is_absolute():
            options = [(cand, "built-in candidate")]
        else:
            options = [
                (Path.cwd() / cand, f"{cand} relative to the current directory"),
                (repo_root() / cand, f"{cand} relative to the repository root"),
            ]
        for p, label in options:
            key = os.path.normpath(str(p))
            if key in seen_paths:
                continue
            seen_paths.add(key)
            found = attempt(Path(key), label)
            if found is not None:
                return found
    raise _not_found(name, tried, layout)


def _not_found(name: str, tried: list[str], layout: str) -> DatasetError:
    lines = [f"Could not find the {name!r} data set. Tried:"]
    lines += [f"  - {t}" for t in tried] or ["  - (nothing: no root given, DML_DATA unset, no candidates)"]
    if layout:
        lines.append("Expected layout:")
        lines += ["  " + ln for ln in layout.strip("\n").splitlines()]
    lines.append(POINT_HINT.format(name=name))
    return DatasetError("\n".join(lines))


def malformed(name: str, problem: str, layout: str = "") -> DatasetError:
    """A data set was found but is malformed (``problem`` names the file)."""
    lines = [f"The {name!r} data set is malformed: {problem}"]
    if layout:
        lines.append("Expected layout:")
        lines += ["  " + ln for ln in layout.strip("\n").splitlines()]
    lines.append(POINT_HINT.format(name=name))
    return DatasetError("\n".join(lines))


def check_files_exist(name: str, paths: Iterable[str], index_file: Path | str, layout: str = "") -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise malformed(name, f"{index_file} references the image {p}, which does not exist", layout)


def read_index(name: str, path: Path, ncols: int, layout: str = "", skip_header: str | None = None) -> list[list[str]]:
    """Whitespace-separated rows of an index file with at least ``ncols`` columns (blank lines skipped).
    ``skip_header``: drop the first row if its first field equals this string."""
    if not path.is_file():
        raise malformed(name, f"missing index file {path}", layout)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and skip_header is not None and parts[0] == skip_header:
                continue
            if len(parts) < ncols:
                raise malformed(name, f"{path}, line {lineno}: expected {ncols} columns, got {line.strip()!r}", layout)
            rows.append(parts)
    if not rows:
        raise malformed(name, f"index file {path} is empty", layout)
    return rows


def to_int(name: str, value: str, where: str, layout: str = "") -> int:
    try:
        return int(value)
    except ValueError:
        raise malformed(name, f"{where}: expected an integer, got {value!r}", layout) from None
