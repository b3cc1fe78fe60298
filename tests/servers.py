"""Helpers for tests that start a real `dml app` server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def wait_until_healthy(url: str, proc, timeout: float = 90.0) -> bool:
    """Poll ``url``/_stcore/health until it answers ok (True), the server process ``proc``
    exits or ``timeout`` seconds pass (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@contextmanager
def app_server(runs_root, port: int, repo, env: dict | None = None,
               log_path=None) -> Iterator[str]:
    """A real `dml app` on 127.0.0.1:``port`` over ``runs_root`` (no numba warm-up; ``env``:
    more variables), its log in ``log_path`` (default ``runs_root``/server-PORT.log); yields its
    URL and stops it (the whole process group)."""
    env = {**os.environ, "DML_NO_WARMUP": "1", **(env or {})}
    log = open(log_path or Path(runs_root) / f"server-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dml.launch", "--runs-dir", str(runs_root),
                             "--port", str(port), "--address", "127.0.0.1"], cwd=repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_healthy(url, proc, 90):
            import pytest

            pytest.fail("the app server did not start: "
                        + (Path(log.name).read_text(errors="replace")[-2000:]))
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
