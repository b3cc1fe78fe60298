"""Start the Tango app: ``dml app`` / ``python -m dml.launch`` runs ``streamlit run app/main.py``
with every setting of ``streamlit_config.toml`` passed as a ``--section.key=value`` flag, so the
theme and server settings apply from any working directory (Streamlit itself only reads
``.streamlit/config.toml`` of the current directory).

    dml app                          # http://localhost:8501
    dml app --runs-dir /data/runs --port 8600
    dml app --address 0.0.0.0        # listen on every network interface
    dml app --max-jobs 2             # training jobs at once (the others queue in the app)
    dml app -- --server.runOnSave=true        # anything after -- goes to streamlit as is

The server listens on localhost only unless ``--address`` says otherwise: the app launches
training and accepts uploads, so it is not offered to the network by default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dml.paths import env_with_checkout

REPO = Path(__file__).resolve().parents[1]
APP_ENTRY = REPO / "app" / "main.py"
CONFIG_FILE = REPO / "streamlit_config.toml"
DEFAULT_ADDRESS = "localhost"   # `--address 0.0.0.0` (or another interface's address) to share


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except ModuleNotFoundError:  # Python 3.10: streamlit depends on `toml`
        import toml
        return toml.load(str(path))


def _flag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def config_flags(path: str | os.PathLike = CONFIG_FILE) -> list[str]:
    """``--section.key=value`` for every setting of a Streamlit TOML config file."""
    path = Path(path)
    if not path.is_file():   # e.g. a non-editable install: Streamlit's defaults apply
        print(f"dml app: warning: {path} not found; using Streamlit's default settings",
              file=sys.stderr)
        return []
    flags = []
    for section, table in _load_toml(path).items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: top-level key {section!r} is not a [section]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise ValueError(f"{path}: nested table {section}.{key} is not a Streamlit option")
            flags.append(f"--{section}.{key}={_flag_value(value)}")
    return flags


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dml app", description="start the Tango Streamlit app",
        epilog=f"The server listens on {DEFAULT_ADDRESS} only (this machine) unless --address "
               "is given: --address 0.0.0.0 listens on all network interfaces, so that other "
               "machines can open the app (and launch training, upload files) too.")
    p.add_argument("--runs-dir", help="runs root shown first (default $DML_RUNS or data/runs)")
    p.add_argument("--port", type=int, help="server port (default 8501)")
    p.add_argument("--address",
                   help=f"address the server listens on (default: {DEFAULT_ADDRESS}, this machine "
                        "only; --address 0.0.0.0 listens on all interfaces)")
    p.add_argument("--max-jobs", type=int, metavar="N",
                   help="training jobs launched from the app that run at once; the others "
                        "queue (sets $DML_MAX_JOBS; default 1 on <= 4 cores, else cores // 4)")
    p.add_argument("--job-threads", type=int, metavar="T",
                   help="threads per training job (sets $DML_JOB_THREADS; default: the cores "
                        "given to the app divided by the jobs at once)")
    p.add_argument("--config", default=str(CONFIG_FILE), help="Streamlit TOML config to apply")
    p.add_argument("--print-command", action="store_true",
                   help="print the streamlit command instead of running it")
    p.add_argument("--no-preload", action="store_true",
                   help="start streamlit in a new process without importing the app's "
                        "modules first")
    p.add_argument("streamlit_args", nargs=argparse.REMAINDER,
                   help="after --: extra arguments for `streamlit run`")
    return p


def build_command(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that start the app for these ``dml app`` arguments."""
    args = make_parser().parse_args(argv)
    flags = config_flags(args.config)
    address = "--server.address="
    if args.address:    # (the config file's address, if any, gives way)
        flags = [f for f in flags if not f.startswith(address)]
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_ENTRY), *flags]
    if args.port:
        cmd.append(f"--server.port={args.port}")
    extra = [a for a in args.streamlit_args if a != "--"]
    if args.address:
        cmd.append(address + args.address)
    elif not any(a.startswith(address) for a in flags + extra):
        cmd.append(address + DEFAULT_ADDRESS)     # never every interface by default
    cmd += extra
    env = dict(os.environ)
    if args.runs_dir:
        env["DML_RUNS"] = str(Path(args.runs_dir).resolve())
    for flag, var in ((args.max_jobs, "DML_MAX_JOBS"), (args.job_threads, "DML_JOB_THREADS")):
        if flag is not None:
            if flag < 1:
                raise SystemExit(f"dml app: --{var[4:].lower().replace('_', '-')} must be >= 1, "
                                 f"got {flag}")
            env[var] = str(flag)
    env = env_with_checkout(env)
    from dml.projection import default_numba_cache_dir
    env.setdefault("NUMBA_CACHE_DIR", str(default_numba_cache_dir()))
    return cmd, env


def preload() -> float:
    """Import what the pages need (plotting, pandas, the app's modules, torch and the training
    core's registries) and build one small WebGL figure, so that no session of a fresh server
    waits for them. Torch matters most: its import takes 2-3 s, holds the server's script
    thread (the Runs page's launch form needs the registries) and cannot be interrupted, so a
    click on another page would wait for it. Returns seconds."""
    import time

    t0 = time.perf_counter()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import numpy as np
    import plotly.graph_objects as go

    import app.plots  # noqa: F401
    import app.selection  # noqa: F401,PLC0415
    import app.tables  # noqa: F401,PLC0415  (pandas: a third of a second on the first page)
    import dml.projection  # noqa: F401,PLC0415
    import dml.data  # noqa: F401,PLC0415  (torch; the Runs page's launch form)
    import dml.losses  # noqa: F401,PLC0415
    import dml.mixing  # noqa: F401,PLC0415
    import dml.models  # noqa: F401,PLC0415  (playground, checkpoint inspector)
    import dml.train  # noqa: F401,PLC0415

    go.Figure([go.Scattergl(x=np.zeros(2, np.float32), y=np.zeros(2, np.float32),
                            customdata=np.zeros((2, 3), np.int32), hovertemplate="%{customdata[1]}",
                            marker=dict(color=np.zeros(2, np.int32), symbol="circle",
                                        colorscale=[[0, "#000"], [1, "#000"]])),
               go.Scatter(x=[None], y=[None])]).to_json()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, env = build_command(argv)
    if "--print-command" in argv:
        print(" ".join(cmd))
        return 0
    if "--no-preload" not in argv:
        # run streamlit in this process, after importing what the first page needs
        os.environ.update(env)
        preload()
        from streamlit.web import cli as streamlit_cli
        sys.argv = ["streamlit", *cmd[3:]]
        try:
            return streamlit_cli.main(prog_name="streamlit", standalone_mode=True) or 0
        except SystemExit as exc:
            return int(exc.code or 0)
    if os.name == "posix":   # become the server: signals (Ctrl-C, kill PID) reach it directly
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
