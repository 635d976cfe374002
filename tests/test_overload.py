"""Serve under overload (issue 12, item 4), on real HTTP against a real ``raydeeplab serve``:
one replica that holds ``MAX_ONGOING`` requests with ``MAX_QUEUED`` more waiting at the proxy.
A burst of ``BURST`` concurrent requests gets fast 503s with Retry-After for the excess, a
request past the deadline gets 504, and afterwards the service answers normally."""

from __future__ import annotations

import concurrent.futures
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from raydeeplab.data.images import decode_mask_png
from tests.test_security import marked_pids
from tests.test_shutdown import Server

BURST = 48
MAX_ONGOING, MAX_QUEUED, RETRY_AFTER_S = 2, 4, 2
DEADLINE_S = 3.0  # --request-timeout-s
BURST_SIDE = 1024  # a mask answer: ~0.05 s of the replica's CPU (decode, forward, encode)
SLOW_SIDE = 6000  # an overlay of 36 MP (the cap is 40): 7-30 s of blending and encoding here


def gradient_png(side: int) -> bytes:
    """A smooth image: a small body that still decodes to ``side`` x ``side`` pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], (ramp[:, None] + ramp[None, :]) / 2), -1)
    out = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def replica_rss_mib(server: Server) -> float:
    """Resident memory of the Serve replica process (``ray::ServeReplica:...``), from /proc."""
    for pid in marked_pids(server.ray_tmp):
        try:
            if b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                status = Path(f"/proc/{pid}/status").read_text()
                return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
        except (OSError, StopIteration):
            continue
    raise AssertionError("no Serve replica process found")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(
        tmp_path_factory.mktemp("overload"), "--replicas", "1", "--max-batch-size", "2",
        "--max-ongoing-requests", str(MAX_ONGOING), "--max-queued-requests", str(MAX_QUEUED),
        "--retry-after-s", str(RETRY_AFTER_S), "--request-timeout-s", str(DEADLINE_S),
    )  # fmt: skip
    try:
        yield running
    finally:
        running.close()


def post(client: httpx.Client, body: bytes, output: str = "png") -> tuple[httpx.Response, float]:
    """One request and its latency in seconds."""
    started = time.perf_counter()
    response = client.post("/segment", params={"format": output}, content=body)
    return response, time.perf_counter() - started


@pytest.fixture
def client(server):
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)  # every request at once
    with httpx.Client(base_url=server.url, timeout=120, limits=limits) as c:
        yield c


@pytest.mark.large  # a Serve app under load: minutes on 2 cores (pytest -m large)
def test_a_burst_gets_fast_503s_with_retry_after_and_memory_stays_flat(server, client):
    body = gradient_png(BURST_SIDE)
    assert post(client, body)[0].status_code == 200  # warm: the first request pays for nothing else
    rss_before = replica_rss_mib(server)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(lambda _: post(client, body), range(BURST)))
    burst_s = time.perf_counter() - started
    rss_after = replica_rss_mib(server)

    ok = [s for r, s in answers if r.status_code == 200]
    busy = [(r, s) for r, s in answers if r.status_code == 503]
    print(
        f"\n{BURST} sent in {burst_s:.1f} s: {len(ok)} 2xx (p50 {percentile(ok, 50):.2f} s, p99 {percentile(ok, 99):.2f} s), "
        f"{len(busy)} 503 (p50 {percentile([s for _, s in busy], 50):.3f} s, p99 {percentile([s for _, s in busy], 99):.3f} s); "
        f"replica RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert len(ok) + len(busy) == BURST, sorted({r.status_code for r, _ in answers})  # nothing else: no 5xx, no hang
    assert len(ok) >= MAX_ONGOING + MAX_QUEUED and busy, "the burst must overflow the queue"
    assert all(r.headers.get("retry-after") == str(RETRY_AFTER_S) for r, _ in busy)
    assert percentile([s for _, s in busy], 50) < percentile(ok, 50), "a 503 must not wait for a replica"
    for response, _ in answers:
        if response.status_code == 200:
            assert decode_mask_png(response.content).shape == (BURST_SIDE, BURST_SIDE)
    assert rss_after - rss_before < 256, "a bounded queue keeps the replica's memory bounded"


@pytest.mark.large  # a Serve app under load: minutes on 2 cores (pytest -m large)
def test_a_request_past_the_deadline_gets_504_then_the_service_answers(client):
    response, seconds = post(client, gradient_png(SLOW_SIDE), "overlay")
    print(f"\n{SLOW_SIDE}x{SLOW_SIDE} overlay: {response.status_code} after {seconds:.1f} s (deadline {DEADLINE_S:g} s)")
    assert response.status_code == 504, response.headers
    assert DEADLINE_S <= seconds < DEADLINE_S + 3  # the deadline, not the work (its thread runs on)
    assert "request_timeout_s" in response.json()["detail"]

    small = gradient_png(64)
    response, seconds = post(client, small)
    print(f"then a normal request: {response.status_code} in {seconds:.2f} s")
    assert response.status_code == 200 and decode_mask_png(response.content).shape == (64, 64)
