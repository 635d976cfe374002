"""Batch inference: the Ray Data pipeline over real JPEGs against the model-only ceiling.

    python bench/infer.py --images 300                    # CPU: tiny model, 128 px, batch 16
    python bench/infer.py --images 2000                   # GPU: R50 DeepLabV3+, 512 px, bf16, batch 64
    python bench/infer.py --images 64 --tile 128          # CPU, plus the tiled case (tiny: 128 px tiles)
    python bench/infer.py --images 2000 --tile 512        # GPU, plus 4 scenes of 7,232 x 7,232 px

One run, one local Ray cluster, one machine:

1. ceiling, in a fresh Ray worker holding what a pipeline actor holds: the compiled forward
   + argmax of ``Segmenter`` (``compile_inference(build_mask_model(...))``) on one synthetic
   uint8 batch already on the device; also ``Segmenter.predict`` from host numpy (copies
   included), and the host work per image (``load_images`` and ``write_outputs`` run on a
   sample of the corpus, one core), from which a ceiling *including host work* follows;
2. ``raydeeplab.batch.run_predict`` over ``--images`` VOC-sized JPEGs (cached in ``--corpus``),
   twice: with an empty compilation cache (cold) and again with it filled (warm); then once
   more over the same JPEGs packed into Parquet shards (``--image-column``, warm cache);
   With ``--tile S``, also ``--scenes`` JPEG scenes of ``--scene-tiles``^2 tiles each (mosaics of
   the corpus photos) with ``--tile S --overlap V``; its ceiling is the tile program's
   (``build_tile_model``: argmax, confidence sums and float16 band cells) in tiles/s, and its
   steady state is the tiles of the scenes committed after the first / seconds from the first
   scene's part to the last (a part is one scene);
3. steady state = images committed after the k-th Parquet part / seconds from that part to
   the last one, k = calls in flight over all actors (they start together once the model is
   ready, so their work is start-up). A part is written by a ``write_outputs`` task after its
   PNGs; the tail is included. A part holds what one actor call returned (about 60 images
   by default), so a few hundred images give a coarse number: thousands give a precise one;
   time to first mask = first PNG's mtime - the moment the actor's constructor started
   running (its creation task's RUNNING event in Ray's state API);
4. where the cores went in the warm run's steady window (``common.CpuUse``, this machine's
   processes): segmenter actors, other Ray tasks, workers starting, the driver, Ray's daemons.

On a GPU the host work runs on other cores than the model, so ``ratio`` (steady/ceiling) is
the whole story. On a CPU-only machine decoding, PNG encoding and the model share the same
cores: the best any pipeline can do is ``1 / (1/ceiling + host_seconds_per_image/cores)``
(perfect overlap, perfect scaling), printed as ``ceiling incl. host`` with its own ratio.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from common import (
    DEFAULT_CACHE,
    CpuUse,
    check_positive,
    cluster_gpus,
    host_bound,
    jpeg_corpus,
    rate,
    result_line,
    run_in_fresh_worker,
)

TARGET_GPU, TARGET_CPU, TARGET_FIRST_MASK_S = 0.9, 0.8, 15.0
HOST_SAMPLE = 64  # images whose decode and write are timed for the host cost per image
IN_FLIGHT = (1, 2)  # callers timed for the ceiling: a segmenter actor runs 2 calls at once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="architecture or preset (default: deeplabv3plus_resnet50 on GPU, tiny on CPU)")
    parser.add_argument("--num-classes", type=int, default=21, help="architectures only")
    parser.add_argument("--image-size", type=int, help="architectures only (default: the architecture's)")
    parser.add_argument("--batch-size", type=int, help="device batch (default: 64 on GPU, 16 on CPU)")
    parser.add_argument("--decode-batch-size", type=int, help="images per decode task (default: PredictConfig's)")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs through the pipeline")
    parser.add_argument("--precision", help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    parser.add_argument("--actors", type=int, help="segmenter actors (default: one per GPU, one on CPU)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each ceiling is timed")
    parser.add_argument("--corpus", default=os.path.join(DEFAULT_CACHE, "jpegs"), help="JPEG cache folder")
    parser.add_argument("--address", default="local", help="Ray address (default: a new local cluster)")
    parser.add_argument("--tile", type=int, help="also the tiled case: tiles of this size (the model's input size)")
    parser.add_argument("--overlap", type=int, help="--tile: overlap in pixels (default: tile / 8)")
    parser.add_argument("--scenes", type=int, default=4, help="--tile: large scenes through the pipeline")
    parser.add_argument("--scene-tiles", type=int, default=16, help="--tile: tiles along each side of a scene")
    args = parser.parse_args(argv)
    check_positive(parser, args, "images", "batch_size", "decode_batch_size", "actors", "num_classes", "tile", "scenes", "scene_tiles")
    if args.tile and args.overlap is None:
        args.overlap = args.tile // 8
    return args


# ---------------------------------------------------------------- ceiling (in a fresh Ray worker)


def measure_ceiling(cfg, sample: list[str], seconds: float) -> dict:
    """Images/s of the compiled forward on a device-resident batch and of ``predict`` from host
    arrays; host seconds per image of the pipeline's CPU stages on ``sample``."""
    import keras

    from raydeeplab.batch import (
        BOX, CONFIDENCE, ERROR, IMAGE, LOW_FRACTION, MASK, PATH, RELPATH, load_images, write_outputs,
    )  # fmt: skip
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import Segmenter, build_mask_model, build_tile_model, compile_inference, to_host

    model = load_model(cfg.model, cfg.num_classes, cfg.image_size, cfg.precision)
    segmenter = Segmenter(model, cfg.batch_size)
    size = segmenter.image_size
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, size, size, 3), dtype=np.uint8)
    forward = compile_inference(build_mask_model(model, cfg.batch_size))
    on_device = [keras.ops.convert_to_tensor(a) for a in (images, segmenter.full_boxes(cfg.batch_size))]
    block = lambda outputs: [o.block_until_ready() if hasattr(o, "block_until_ready") else to_host(o) for o in outputs]  # noqa: E731

    result = {
        "device": {n: rate(lambda: block(forward(*on_device)), cfg.batch_size, seconds, n) for n in IN_FLIGHT},
        "predict": {n: rate(lambda: segmenter.predict(images), cfg.batch_size, seconds, n) for n in IN_FLIGHT},
        "image_size": size,
    }
    if cfg.tile:  # tiles/s of the program the tiled pipeline's actors run
        tiles = compile_inference(build_tile_model(model, cfg.batch_size, cfg.overlap))
        result["tiles"] = max(rate(lambda: block(tiles(*on_device)), cfg.batch_size, seconds, n) for n in IN_FLIGHT)
    batch = {PATH: np.array(sample), RELPATH: np.array([os.path.basename(p) for p in sample])}
    started = time.perf_counter()
    batch = load_images(batch, size, cfg.max_pixels)
    result["decode_s"] = (time.perf_counter() - started) / len(sample)
    if (batch[ERROR] != "").any():
        raise RuntimeError(f"corpus images failed to decode: {set(batch[ERROR])}")
    out = segmenter.segment(batch.pop(IMAGE), batch[BOX])
    batch.update({MASK: out.masks, CONFIDENCE: out.confidence, LOW_FRACTION: out.low_confidence_fraction})
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        write_outputs(batch, out, cfg.model, segmenter.num_classes)
        result["write_s"] = (time.perf_counter() - started) / len(sample)
    return result


# ---------------------------------------------------------------- the pipeline


def actor_started(since: float) -> float | None:
    """Wall time the first segmenter actor's constructor began, from Ray's task events."""
    import ray
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=ray.get_runtime_context().gcs_address,
        filters=[("type", "=", "ACTOR_CREATION_TASK")],
        detail=True,
        raise_on_missing_output=False,
    )
    starts = [
        event["created_ms"] / 1000
        for task in tasks
        if "SegmenterPredictor" in task.name
        for event in task.events
        if event["state"] == "RUNNING" and event["created_ms"] / 1000 >= since
    ]
    return min(starts) if starts else None


def first_mask_time(output: str) -> float:
    """Modification time of the first mask PNG written under ``output``."""
    return min(
        os.stat(os.path.join(folder, name)).st_mtime
        for folder, _, names in os.walk(os.path.join(output, "masks"))
        for name in names
        if name.endswith(".png")
    )


def commits(output: str) -> tuple[np.ndarray, np.ndarray]:
    """(times, rows) of the Parquet parts under ``output``, oldest first: each part is written
    by one ``write_outputs`` task after all of its PNGs, so it marks that many images done."""
    import pyarrow.parquet as pq

    folder = os.path.join(output, "predictions")
    parts = sorted((os.stat(os.path.join(folder, name)).st_mtime, name) for name in os.listdir(folder))
    rows = [pq.read_metadata(os.path.join(folder, name)).num_rows for _, name in parts]
    return np.array([t for t, _ in parts]), np.array(rows)


def write_shards(paths: list[str], folder: str, rows_per_shard: int = 64) -> str:
    """The corpus as Parquet shards of ``(key, jpeg)`` rows; returns their glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    for start in range(0, len(paths), rows_per_shard):
        chunk = paths[start : start + rows_per_shard]
        images = []
        for path in chunk:
            with open(path, "rb") as f:
                images.append(f.read())
        keys = [os.path.splitext(os.path.basename(p))[0] for p in chunk]
        table = pa.table({"key": keys, "jpeg": pa.array(images, pa.binary())})
        pq.write_table(table, os.path.join(folder, f"part-{start // rows_per_shard:05d}.parquet"))
    return os.path.join(folder, "part-*.parquet")


def write_scenes(paths: list[str], folder: str, count: int, side: int) -> None:
    """``count`` JPEG scenes of ``side`` x ``side`` px, mosaics of the corpus photos (real image
    content, so the model's work is typical)."""
    from PIL import Image

    os.makedirs(folder)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:16]]
    for n in range(count):
        scene = np.zeros((side, side, 3), np.uint8)
        for k, (y, x) in enumerate((y, x) for y in range(0, side, 256) for x in range(0, side, 256)):
            piece = photos[(k + n) % len(photos)][: side - y, : side - x][:256, :256]
            scene[y : y + piece.shape[0], x : x + piece.shape[1]] = piece
        Image.fromarray(scene).save(os.path.join(folder, f"scene_{n:03d}.jpg"), quality=90)


def measure_pipeline(cfg, in_flight: int) -> dict:
    """One ``run_predict``; ``in_flight`` tasks start together when the actors are ready, so
    the steady window opens at the ``in_flight``-th commit (earlier work is start-up)."""
    from raydeeplab.batch import run_predict

    since = time.time()
    summary = run_predict(cfg)
    if summary.failed or summary.ok != summary.inputs:
        raise RuntimeError(f"pipeline run incomplete: {summary.line()} {summary.errors_by_reason}")
    times, rows = commits(cfg.output)
    actor = actor_started(since)
    start, end = times[min(in_flight, len(times)) - 1], times[-1]  # the steady window
    return {
        "steady": rows[in_flight:].sum() / (end - start) if len(times) > in_flight else float("nan"),
        "window": (start, end),
        "parts": len(times),
        "first_mask_s": first_mask_time(cfg.output) - actor if actor else float("nan"),
        "actor_start_s": actor - since if actor else float("nan"),
        "total_s": summary.seconds,
        "overall": summary.images_per_second,
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from raydeeplab.batch import actor_resources
    from raydeeplab.cluster import init_ray
    from raydeeplab.config import PredictConfig, inference_precision

    paths = jpeg_corpus(args.corpus, args.images)
    init_ray(args.address)
    gpus = cluster_gpus()
    work = tempfile.mkdtemp(prefix="raydeeplab-bench-")
    manifest = os.path.join(work, "inputs.txt")
    with open(manifest, "w") as f:
        f.write("".join(f"{p}\n" for p in paths))
    cfg = PredictConfig(
        input=manifest,
        output=os.path.join(work, "cold"),
        model=args.model or ("deeplabv3plus_resnet50" if gpus else "tiny"),
        batch_size=args.batch_size or (64 if gpus else 16),
        image_size=args.image_size,
        num_classes=args.num_classes,
        actors=args.actors,
        precision=inference_precision(args.precision, gpus > 0),
        compile_cache=os.path.join(work, "xla"),  # empty: the first run compiles
        **({"decode_batch_size": args.decode_batch_size} if args.decode_batch_size else {}),
    )
    cores = os.cpu_count() or 1
    _, actors = actor_resources(cfg)
    cpu = CpuUse("SegmenterPredictor")
    try:
        tile_fields = {"tile": args.tile, "overlap": args.overlap} if args.tile else {}  # its ceiling too
        ceiling = run_in_fresh_worker(
            measure_ceiling, 1 if gpus else 0, cfg.cpus_per_actor, cfg.model_copy(update=tile_fields),
            paths[:HOST_SAMPLE], args.seconds,
        )  # fmt: skip
        in_flight = max(IN_FLIGHT) * actors
        cold = measure_pipeline(cfg, in_flight)
        with cpu:
            warm = measure_pipeline(cfg.model_copy(update={"output": os.path.join(work, "warm")}), in_flight)
        shards = write_shards(paths, os.path.join(work, "shards"))
        sharded = measure_pipeline(
            cfg.model_copy(update={"input": shards, "image_column": "jpeg", "id_column": "key", "output": os.path.join(work, "sharded")}),
            in_flight,
        )
        tiled = measure_tiled(args, cfg, paths, work) if args.tile else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()  # flush the workers' log lines before the report
    report(args, cfg, gpus, actors, cores, ceiling, cold, warm, sharded, tiled, cpu.cores(*warm["window"]))
    return 0


def measure_tiled(args, cfg, paths: list[str], work: str) -> dict:
    """The scenes through ``--tile``: one part per scene, so the steady window opens at the first
    scene's part (its tiles include the start-up) and is counted in tiles."""
    side = args.scene_tiles * (args.tile - args.overlap) + args.overlap
    write_scenes(paths, os.path.join(work, "scenes"), args.scenes, side)
    tiled_cfg = cfg.model_copy(
        update={"input": os.path.join(work, "scenes"), "output": os.path.join(work, "tiled"), "tile": args.tile, "overlap": args.overlap}
    )
    run = measure_pipeline(tiled_cfg, 1)
    return {**run, "steady": run["steady"] * args.scene_tiles**2, "side": side}


def report(
    args, cfg, gpus: int, actors: int, cores: int, ceiling: dict, cold: dict, warm: dict, sharded: dict,
    tiled: dict | None, cpu: dict[str, float],
) -> None:
    scale = actors if gpus else 1  # each actor owns a GPU; CPU actors share the same cores
    device = {n: r * scale for n, r in ceiling["device"].items()}
    predict = {n: r * scale for n, r in ceiling["predict"].items()}
    best = max(device.values())
    host_s = ceiling["decode_s"] + ceiling["write_s"]
    with_host = host_bound(best, host_s, cores, gpus > 0)
    print(
        f"machine: {f'{gpus} GPU' if gpus else 'CPU only'}, {cores} CPUs; model {cfg.model} {ceiling['image_size']}px "
        f"{cfg.precision or 'float32'}, batch {cfg.batch_size}, {actors} actor(s), "
        f"decode batch {cfg.decode_batch_size}, {args.images} JPEGs"
    )
    calls = "  ".join(f"{n} in flight {device[n]:.1f}" for n in IN_FLIGHT)
    print(f"forward+argmax on a device-resident uint8 batch, img/s: {calls}  -> ceiling {best:.1f}")
    calls = "  ".join(f"{n} in flight {predict[n]:.1f}" for n in IN_FLIGHT)
    print(f"Segmenter.predict from host arrays (copies included), img/s: {calls}")
    print(
        f"host work per image (one core): decode+resize {ceiling['decode_s'] * 1e3:.2f} ms, "
        f"mask resize+PNG+write {ceiling['write_s'] * 1e3:.2f} ms -> ceiling incl. host work {with_host:.1f} img/s"
    )
    header = f"{'pipeline run':<24} {'steady img/s':>12} {'parts':>6} {'actor start s':>13}"
    print(header + f" {'first mask s':>12} {'total s':>8} {'overall img/s':>13}")
    for label, run in (("cold compilation cache", cold), ("warm compilation cache", warm), ("Parquet shards, warm", sharded)):
        print(
            f"{label:<24} {run['steady']:>12.1f} {run['parts']:>6} {run['actor_start_s']:>13.1f}"
            f" {run['first_mask_s']:>12.1f} {run['total_s']:>8.1f} {run['overall']:>13.1f}"
        )
    if sum(cpu.values()):
        used = "  ".join(f"{group} {value:.2f}" for group, value in cpu.items())
        print(f"cores used in the warm run's steady window, of {cores}: {used}  idle {max(cores - sum(cpu.values()), 0):.2f}")
    target = TARGET_GPU if gpus else TARGET_CPU
    ratio = warm["steady"] / best
    print(
        f"steady/ceiling {ratio:.2f} (target >= {target} on {'GPU' if gpus else 'CPU with the tiny model'}); "
        f"steady/ceiling incl. host {warm['steady'] / with_host:.2f}; first mask {warm['first_mask_s']:.1f}s "
        f"after actor start with a warm cache (target <= {TARGET_FIRST_MASK_S:.0f}s), {cold['first_mask_s']:.1f}s cold"
    )
    extra = {}
    if tiled:
        tile_ceiling = ceiling["tiles"] * scale
        extra = {"tiles_ceiling": tile_ceiling, "tiles": tiled["steady"], "tiles_ratio": tiled["steady"] / tile_ceiling}
        print(
            f"tiled: {args.scenes} scenes of {tiled['side']} x {tiled['side']} px, {args.scene_tiles ** 2} tiles of "
            f"{args.tile} px (overlap {args.overlap}) each: steady {tiled['steady']:.1f} tiles/s vs tile-program "
            f"ceiling {tile_ceiling:.1f} -> ratio {extra['tiles_ratio']:.2f}; total {tiled['total_s']:.1f}s"
        )
    print(
        result_line(
            ceiling=best,
            pipeline=warm["steady"],
            ratio=ratio,
            ceiling_with_host=with_host,
            ratio_with_host=warm["steady"] / with_host,
            first_mask_warm_s=warm["first_mask_s"],
            first_mask_cold_s=cold["first_mask_s"],
            shards=sharded["steady"],
            shards_ratio=sharded["steady"] / best,
            **extra,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
