"""A real S3 endpoint for tests: a moto server subprocess on a free local port.

A subprocess (not moto's in-process mock) because Ray workers and s3fs's own event
loop must reach it the way they reach AWS: over HTTP, through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_moto_server(timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start ``moto.server``; returns ``(process, endpoint_url)`` once it answers HTTP."""
    port = free_port()
    log = tempfile.TemporaryFile()  # not a pipe: moto logs every request and a full pipe blocks it
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"moto server exited with {process.returncode}: {output}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return process, endpoint
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    stop_moto_server(process)
    log.close()
    raise RuntimeError(f"moto server on {endpoint} did not answer within {timeout} s")


def stop_moto_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
