"""What ``bench/infer.py`` and ``bench/train.py`` share: a cached JPEG corpus, a fresh Ray worker
with a pipeline worker's resources, a timing loop, the host-inclusive bound and the final
``RESULT`` line.
"""

from __future__ import annotations

import functools
import os
import sys
import time
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
