"""The app's launch: `dml app` / `python -m dml.launch` applies streamlit_config.toml (theme,
server settings) from any working directory, and `streamlit run app/main.py` from the repository
root reads the same file through .streamlit/config.toml. Streamlit itself is asked what it
applied (`streamlit config show`), and a real server is started and probed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dml import launch
from tests.servers import wait_until_healthy

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "streamlit_config.toml"


def settings() -> dict[str, object]:
    return {f"{s}.{k}": v for s, t in launch._load_toml(CONFIG).items() for k, v in t.items()}


def shown(value) -> str:
    """How `streamlit config show` prints a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def config_show(args: list[str], cwd: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "streamlit", "config", "show", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    assert out.returncode == 0, out.stderr
    values, section = {}, None
    for line in out.stdout.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = m.group(1)
        elif section and (m := re.fullmatch(r"(\w+) = (.*)", line.strip())):
            values[f"{section}.{m.group(1)}"] = m.group(2)
    return values


def test_config_file_sets_theme_and_server():
    s = settings()
    assert s["theme.primaryColor"].startswith("#")
    assert s["server.headless"] is True and s["server.runOnSave"] is False
    assert s["server.maxUploadSize"] >= 50 and s["browser.gatherUsageStats"] is False


def test_every_setting_becomes_a_flag():
    flags = launch.config_flags(CONFIG)
    assert flags == [f"--{k}={shown(v).strip(chr(34))}" for k, v in settings().items()]
    cmd, env = launch.build_command(["--runs-dir", "/tmp/somewhere", "--port", "8765", "--",
                                     "--server.address=127.0.0.1"])
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py")]
    assert set(flags) <= set(cmd) and "--server.port=8765" in cmd
    assert cmd[-1] == "--server.address=127.0.0.1"
    assert env["DML_RUNS"] == "/tmp/somewhere" and str(REPO) in env["PYTHONPATH"]
    assert env["NUMBA_CACHE_DIR"]


def test_streamlit_applies_the_flags_from_any_directory(tmp_path):
    """What `dml app` passes is what Streamlit uses, even where no .streamlit/ folder exists."""
    values = config_show(launch.config_flags(CONFIG), tmp_path)
    for key, value in settings().items():
        assert values.get(key) == shown(value), key
    plain = config_show([], tmp_path)      # without the flags Streamlit would not know them
    assert plain.get("theme.primaryColor") != shown(settings()["theme.primaryColor"])


def test_dot_streamlit_config_is_the_same_file():
    """`streamlit run app/main.py` from the repository root reads .streamlit/config.toml."""
    dot = REPO / ".streamlit" / "config.toml"
    assert dot.is_file() and dot.resolve() == CONFIG.resolve() or \
        dot.read_bytes() == CONFIG.read_bytes()
    values = config_show([], REPO)
    for key, value in settings().items():
        assert values.get(key) == shown(value), key


def addresses(cmd: list[str]) -> list[str]:
    return [a.split("=", 1)[1] for a in cmd if a.startswith("--server.address=")]


def test_dml_app_listens_on_localhost_unless_asked(tmp_path):
    """The app launches training and accepts uploads: `dml app` serves this machine only
    unless --address says otherwise, also with a config file that names no address, and
    `streamlit run app/main.py` from the repository root reads the same default."""
    assert addresses(launch.build_command([])[0]) == ["localhost"]
    assert addresses(launch.build_command(["--address", "0.0.0.0"])[0]) == ["0.0.0.0"]
    bare = tmp_path / "bare.toml"
    bare.write_text("[server]\nheadless = true\n")
    assert addresses(launch.build_command(["--config", str(bare)])[0]) == ["localhost"]
    assert addresses(launch.build_command(["--config", str(bare), "--address", "10.0.0.7"])[0]) \
        == ["10.0.0.7"]
    cmd = launch.build_command(["--", "--server.address=127.0.0.1"])[0]   # as is, and last
    assert cmd[-1] == "--server.address=127.0.0.1"
    assert " ".join(launch.make_parser().format_help().split()).count("--address 0.0.0.0") >= 1
    assert settings()["server.address"] == "localhost"
    assert config_show([], REPO)["server.address"] == '"localhost"'


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":     # LISTEN
                found.append(addr)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dml_launch_starts_a_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "DML_NO_WARMUP": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dml.launch", "--runs-dir", str(tmp_path),
                             "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, 90), \
            "the server did not come up"
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<div id=\"root\">" in html or "root" in html
        if Path("/proc/net/tcp").is_file():      # localhost only, by default
            bound = _listening(port)
            assert bound and not {"00000000", "0" * 32} & set(bound), bound
    finally:
        os.killpg(proc.pid, 15)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out


def test_preload_imports_what_the_first_page_needs():
    """`dml app` imports the app's heavy modules before the server starts, so the first session
    on a fresh server does not pay for them (pandas alone is a third of a second, torch 2-3 s)."""
    import subprocess
    import sys

    code = ("import sys; from dml.launch import preload; preload(); "
            "print(all(m in sys.modules for m in ('pandas', 'plotly.graph_objects', "
            "'app.plots', 'app.selection', 'app.tables', 'dml.projection', 'torch', 'dml.data', "
            "'dml.losses', 'dml.mixing', 'dml.models', 'dml.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
