"""What ``bench/infer.py`` and ``bench/train.py`` share: a cached JPEG corpus, a fresh Ray worker
with a pipeline worker's resources, a timing loop, the host-inclusive bound, where the machine's
CPU time went, and the final ``RESULT`` line.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable

import numpy as np

from raydeeplab.storage import CACHE_ROOT

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # ceiling and pipeline take turns on a GPU

DEFAULT_CACHE = os.path.join(CACHE_ROOT, "bench")
# (height, width) of most Pascal VOC JPEGs: 500 on the long side, 4:3 or 3:2, both orientations.
VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (366, 500), (281, 500))
CORPUS_CLASSES = 21


def corpus_image(index: int, seed: int = 0) -> bytes:
    """JPEG bytes of image ``index``: shapes over a photo crop (even) or blotchy noise (odd)."""
    from raydeeplab.data.images import encode_jpeg
    from raydeeplab.data.synthetic import draw_example

    rng = np.random.default_rng([seed, index])
    height, width = VOC_SIZES[index % len(VOC_SIZES)]
    photos = backgrounds() if index % 2 == 0 else None
    image, _ = draw_example(rng, height, width, CORPUS_CLASSES, photos)
    return encode_jpeg(image)


@functools.cache
def backgrounds() -> list[np.ndarray]:
    from raydeeplab.data.synthetic import load_photos

    return load_photos()


def write_corpus_images(folder: str, indices: list[int]) -> None:
    from raydeeplab import storage

    for index in indices:
        storage.write_bytes(storage.join(folder, corpus_name(index)), corpus_image(index))


def corpus_name(index: int) -> str:
    return f"img_{index:06d}.jpg"


def jpeg_corpus(folder: str, count: int) -> list[str]:
    """Paths of ``count`` VOC-sized JPEGs in ``folder``; only the missing ones are generated
    (atomically, on every core), so later runs reuse the corpus."""
    from raydeeplab import storage

    missing = [i for i in range(count) if not os.path.exists(os.path.join(folder, corpus_name(i)))]
    if missing:
        started = time.perf_counter()
        workers = os.cpu_count() or 1
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_corpus_images, [folder] * workers, [missing[w::workers] for w in range(workers)]))
        print(f"corpus: generated {len(missing)} JPEGs in {folder} ({time.perf_counter() - started:.1f}s)")
    return [storage.join(folder, corpus_name(i)) for i in range(count)]


def rate(step: Callable[[], object], items_per_step: int, seconds: float, threads: int = 1) -> float:
    """Items/s of ``step`` called back to back for about ``seconds`` by each of ``threads``
    callers (after one untimed call). ``step`` must block until its work is done."""
    step()
    calls = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        while calls[slot] < 3 or time.perf_counter() < deadline:
            step()
            calls[slot] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return sum(calls) * items_per_step / (time.perf_counter() - started)


def run_in_fresh_worker(fn: Callable, gpus: float, cpus: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new Ray worker holding what a pipeline worker holds; the
    process exits afterwards (``max_calls=1``) so its device memory is free for the pipeline."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # bench/ is not on the workers' path
    remote = ray.remote(num_gpus=gpus, num_cpus=cpus, max_calls=1)(fn)
    return ray.get(remote.remote(*args, **kwargs))


def host_bound(ceiling: float, host_s: float, cores: int, on_gpu: bool) -> float:
    """The best images/s with ``host_s`` seconds of single-core host work per image included:
    the device and the host cores run side by side on a GPU machine; on a CPU-only one they
    divide the same cores (perfect overlap and scaling assumed: an upper bound)."""
    if on_gpu:
        return min(ceiling, cores / host_s)
    return 1.0 / (1.0 / ceiling + host_s / cores)


class CpuUse:
    """Every process's CPU time on this machine, read from ``/proc`` every ``interval`` seconds
    while the ``with`` block runs, so that a pipeline's steady state can be split into who used the
    cores: a figure below the ceiling says where the rest went. Linux only (elsewhere: empty).

    Ray names a worker's process after what it runs (``ray::MapWorker(...)``, ``ray::IDLE``), so
    the groups are: ``actors`` (titles naming ``actor_name``), ``tasks`` (any other Ray worker:
    listing, decoding, writing; short tasks are often seen as ``ray::IDLE``), ``worker start``
    (Python workers not yet named: Ray starting processes), ``driver`` (this process), ``ray``
    (raylet, GCS, dashboard, monitors, Ray Data's helper actors) and ``other``.
    """

    GROUPS = ("actors", "tasks", "worker start", "driver", "ray", "other")
    RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray::Dash", "ray::_StatsActor", "ray::ActorLocation")

    def __init__(self, actor_name: str, interval: float = 0.2):
        self.actor_name, self.interval = actor_name, interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time, CPU seconds per group since the last)
        self.stopped = threading.Event()
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> "CpuUse":
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def run(self) -> None:
        if not os.path.isdir("/proc/self"):
            return
        last: dict[int, float] = {}
        while not self.stopped.wait(self.interval):
            used: dict[str, float] = defaultdict(float)
            for pid, (seconds, title) in self.processes().items():
                if pid in last and seconds > last[pid]:
                    used[self.group(pid, title)] += seconds - last[pid]
                last[pid] = seconds
            self.samples.append((time.time(), used))

    def processes(self) -> dict[int, tuple[float, str]]:
        """pid -> (user + system CPU seconds, command line) of every process still readable."""
        found = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        title = f.read(300).replace(b"\0", b" ").decode(errors="replace")
                except OSError:  # it exited meanwhile
                    continue
                found[int(name)] = ((int(fields[11]) + int(fields[12])) / self.ticks, title)
        return found

    def group(self, pid: int, title: str) -> str:
        if pid == os.getpid():
            return "driver"
        if self.actor_name in title:
            return "actors"
        if any(daemon in title for daemon in self.RAY_DAEMONS):
            return "ray"
        if title.startswith("ray::"):
            return "tasks"
        if "default_worker.py" in title:
            return "worker start"
        return "other"

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Mean cores each group used between two ``time.time()`` instants."""
        total = defaultdict(float)
        for when, used in self.samples:
            if start < when <= end:
                for group, seconds in used.items():
                    total[group] += seconds
        return {group: total[group] / max(end - start, 1e-9) for group in self.GROUPS}


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def check_positive(parser, args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def result_line(**values: float) -> str:
    """``RESULT ceiling=… pipeline=… ratio=…``: the one line a script greps for."""
    return "RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
