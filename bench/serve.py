"""Serving on loopback: latency and throughput with batching on and off, against the model-only ceiling.

    python bench/serve.py --model tiny --image-size 64 --requests 200 --concurrency 16 --max-batch-size 8

One run, one process: first the ceiling (``Segmenter.predict`` on synthetic uint8 batches of
``--max-batch-size``, no HTTP), then a local Ray Serve app driven by a bounded load generator
(``--requests`` in total, at most ``--concurrency`` in flight; it stops by itself), once with
``max_batch_size=B`` and once with 1. It prints p50/p95/p99 latency, requests/s, the mean batch
the replica ran, and served/ceiling. The client shares the machine with the replica: on a small
CPU box it takes cores the model would otherwise use. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # ceiling and replica share a GPU

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="architecture, preset folder or s3:// preset")
    parser.add_argument("--num-classes", type=int, default=21, help="architectures only")
    parser.add_argument("--image-size", type=int, help="architectures only (default: the architecture's)")
    parser.add_argument("--source-size", type=int, help="side of the JPEGs sent (default: --image-size)")
    parser.add_argument("--requests", type=int, default=200, help="requests per load run (1..100000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (1..1024)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="B for 'batching on'")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--gpus-per-replica", type=float, help="default: 1 when a GPU is visible")
    parser.add_argument("--precision", help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        parser.error(f"--requests must be in 1..100000, got {args.requests}")
    if not 1 <= args.concurrency <= 1024:
        parser.error(f"--concurrency must be in 1..1024, got {args.concurrency}")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    return args


def ceiling(model, batch_size: int, images: int) -> float:
    """Images/s of ``Segmenter.predict`` alone on full synthetic batches (host->device copy included)."""
    from raydeeplab.segmenter import Segmenter

    segmenter = Segmenter(model, batch_size)
    segmenter.warmup()
    rng = np.random.default_rng(0)
    size = segmenter.image_size
    batch = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    segmenter.predict(batch)
    calls = max(3, images // batch_size)
    started = time.perf_counter()
    for _ in range(calls):
        segmenter.predict(batch)
    return calls * batch_size / (time.perf_counter() - started)


def sample_jpegs(count: int, size: int) -> list[bytes]:
    from raydeeplab.data.images import encode_jpeg

    rng = np.random.default_rng(1)
    blocks = [rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8) for _ in range(count)]
    return [encode_jpeg(np.repeat(np.repeat(b, 16, 0), 16, 1)[:size, :size]) for b in blocks]


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int, timeout: float) -> dict:
    """``requests`` POSTs, ``concurrency`` workers; returns latencies (s), wall time and failures."""
    import httpx

    latencies: list[float] = []
    failures = 0
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in next_index:
            started = time.perf_counter()
            response = await client.post(url, content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"latencies": latencies, "seconds": time.perf_counter() - started, "failures": failures}


def row(label: str, concurrency: int, run: dict, mean_batch: float, ceiling_rate: float) -> str:
    ms = np.percentile(run["latencies"], [50, 95, 99]) * 1000
    rate = len(run["latencies"]) / run["seconds"]
    return (
        f"{label:<22} {concurrency:>5} {len(run['latencies']):>8} {ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f}"
        f" {rate:>9.1f} {mean_batch:>10.2f} {rate / ceiling_rate:>15.2f}"
        + (f"  ({run['failures']} failed)" if run["failures"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from raydeeplab.cluster import init_ray
    from raydeeplab.config import default_gpus, inference_precision
    from raydeeplab.architectures import ARCHITECTURES, default_image_size
    from raydeeplab.presets import input_size, load_model
    from raydeeplab.serve import app_builder

    init_ray(None)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = default_gpus(ray.cluster_resources().get("GPU", 0.0))
    precision = inference_precision(args.precision, gpus > 0)  # what the replica will run
    is_arch = args.model in ARCHITECTURES
    image_size = args.image_size or (default_image_size(args.model) if is_arch else None)
    model = load_model(args.model, args.num_classes, image_size, precision)
    image_size = input_size(model)
    ceiling_rate = ceiling(model, args.max_batch_size, args.requests)
    del model
    print(
        f"ceiling: Segmenter.predict, batch {args.max_batch_size}, {image_size}px, "
        f"{precision or 'float32'}: {ceiling_rate:.1f} img/s"
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bodies = sample_jpegs(16, args.source_size or image_size)
    url = f"http://127.0.0.1:{port}/bench/segment"
    header = f"{'mode':<22} {'conc':>5} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    print(header + f" {'req/s':>9} {'mean batch':>10} {'served/ceiling':>15}")
    try:
        modes = [(f"batching on (B={args.max_batch_size})", args.max_batch_size), ("batching off (B=1)", 1)]
        for label, batch_size in modes:
            builder_args = {
                "model": args.model,
                "num_classes": args.num_classes,
                "max_batch_size": batch_size,
                "batch_wait_timeout_s": args.batch_wait_timeout_s,
                "gpus_per_replica": gpus,
                "precision": precision,
                "max_ongoing_requests": 2 * args.max_batch_size,  # the same queue for both modes
            }
            if is_arch:
                builder_args["image_size"] = image_size
            serve.run(app_builder(builder_args), name="bench", route_prefix="/bench")
            asyncio.run(load(url, bodies, 2 * args.concurrency, args.concurrency, args.timeout_s))  # warm
            for concurrency in (args.concurrency, 1):
                before = stats(port)
                requests = args.requests if concurrency > 1 else min(args.requests, 50)
                run = asyncio.run(load(url, bodies, requests, concurrency, args.timeout_s))
                print(row(label, concurrency, run, mean_batch(before, stats(port)), ceiling_rate))
            serve.delete("bench")
    finally:
        serve.shutdown()
    return 0


def stats(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/bench/stats", timeout=30).json()


def mean_batch(before: dict, after: dict) -> float:
    """Requests per forward pass between two /stats readings (one replica)."""
    passes = after["forward_passes"] - before["forward_passes"]
    return (after["requests"] - before["requests"]) / passes if passes else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
