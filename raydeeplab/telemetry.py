"""Application metrics through ``ray.util.metrics``: exported by each node's Prometheus endpoint
(``ray start --metrics-export-port``) with a ``ray_`` prefix, shown in the dashboard's Metrics
view and in ``k8s/grafana-dashboard.json``.

Metric objects are created lazily, once per process, so importing this module costs nothing
and the core (which never imports Ray) stays free of it: only the Ray roles record.
"""

from __future__ import annotations

import functools

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
FILL_BUCKETS = [0.125, 0.25, 0.5, 0.75, 0.9, 1.0]


@functools.cache
def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


@functools.cache
def histogram(name: str, description: str, boundaries: tuple[float, ...], tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Histogram

    return Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tag_keys)


@functools.cache
def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


def images_processed(count: int) -> None:
    if count:
        counter("raydeeplab_images_processed", "Images segmented and written").inc(count)


def image_failed(reason: str) -> None:
    counter("raydeeplab_images_failed", "Inputs recorded as failed, by reason", ("reason",)).inc(
        1, tags={"reason": reason}
    )


def bytes_read(count: int) -> None:
    if count:
        counter("raydeeplab_bytes_read", "Input bytes read from storage").inc(count)


def bytes_written(count: int) -> None:
    if count:
        counter("raydeeplab_bytes_written", "Output bytes written to storage").inc(count)


def device_batch(seconds: float, fill: float, role: str) -> None:
    """One forward pass: its latency and how full the fixed-shape batch was (1.0 = no padding)."""
    tags = {"role": role}
    histogram(
        "raydeeplab_batch_latency_seconds", "Device batch latency", tuple(LATENCY_BUCKETS), ("role",)
    ).observe(seconds, tags=tags)
    histogram("raydeeplab_batch_fill", "Real images / batch size", tuple(FILL_BUCKETS), ("role",)).observe(
        fill, tags=tags
    )


def train_step(seconds: float, images_per_second: float) -> None:
    histogram("raydeeplab_train_step_seconds", "Training step time", tuple(LATENCY_BUCKETS)).observe(seconds)
    gauge("raydeeplab_train_images_per_second", "Training throughput (this worker's epoch)").set(images_per_second)


def serve_batch(requests: int, seconds: float, fill: float) -> None:
    """One batched forward pass in a Serve replica: how many requests shared it."""
    histogram(
        "raydeeplab_serve_batch_size", "Requests per forward pass", (1, 2, 4, 8, 16, 32, 64, 128, 256)
    ).observe(requests)
    device_batch(seconds, fill, role="serve")
