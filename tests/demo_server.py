"""Start `steer demo` as a real subprocess on a free port of 127.0.0.1 (for the demo tests).

Not a test module: `conftest.py`'s ``demo_server`` fixture uses it, and so can a test
that needs its own server with other flags.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_demo(*args: str, timeout: float = 300.0, env: dict | None = None):
    """``steer demo --port P ARGS`` until the block ends (``env``: extra environment); yields ``http://127.0.0.1:P/``.

    Waits until the page answers 200; fails with the server's log if it exits or times out.
    Stops it with SIGINT (as Ctrl-C), then SIGKILL if it does not stop.
    """
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "steer.cli.main", "demo", "--port", str(port), *args],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"steer demo did not start (exit {server.poll()}):\n"
                                         + log.read().decode(errors="replace")[-4000:])
                time.sleep(1.0)
            yield url
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


def _answers(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
