"""Helpers for tests that start a real `dml app` server."""

from __future__ import annotations

import time
import urllib.request


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
