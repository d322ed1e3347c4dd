"""Helpers the benchmarks share: free ports, waiting for a port, a throwaway Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, what: str, *, host: str = "127.0.0.1", timeout_s: float = 30) -> None:
    """Until something accepts connections on ``port``; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


def start_redis(name: str) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway ``redis-server`` (no persistence) and its URL; exits if it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(f"{name} needs redis-server on PATH (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", tempfile.mkdtemp(prefix="promptq-bench-redis-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"
