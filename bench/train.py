"""Training: the full Ray Train loop (real augmentation) against the bare train step.

    python bench/train.py --model tiny --image-size 64 --batch-size 8 --workers 1 --epochs 3 --images 256
    python bench/train.py --images 1024          # GPU: R50 DeepLabV3+, 512 px, mixed_bfloat16, batch 16

One run, one local Ray cluster, one machine:

1. ceiling, in a fresh Ray worker holding what one training worker holds: the compiled Keras
   train step (``recipe.trainable_model`` + ``compile_for_training`` + ``train_on_batch``)
   on one fixed random uint8 batch of the *global* batch size, already on the device;
2. ``raydeeplab.train.run_train`` on ``--workers`` Ray Train workers over ``--images`` VOC-sized
   (375x500) examples in the VOC layout (``make_shapes_dataset``, cached), decoded and
   augmented (flip, scale 0.5-2, pad and crop) by Ray Data as in a real run;
3. pipeline = the mean of the loop's own per-epoch ``images_per_second`` (global batch x
   steps / seconds of the epoch's training steps, the first batch's wait included; validation
   and checkpointing excluded) over epochs 2.., since epoch 1 compiles.

On a CPU-only machine the workers, their data tasks and the ceiling's single process all
share the same cores, and 2 workers also pay gloo all-reduces: the ratio says what the
distributed loop costs there, not what it would on GPUs. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from common import DEFAULT_CACHE, check_positive, cluster_gpus, host_bound, rate, result_line, run_in_fresh_worker

TARGET = 0.9
HOST_SAMPLE = 32  # training examples whose decode + augmentation is timed
SOURCE_SIZE = (375, 500)  # (height, width) of a typical Pascal VOC image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="architecture or preset (default: deeplabv3plus_resnet50 on GPU, tiny on CPU)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--image-size", type=int, help="training crop (default: 512 on GPU, 64 on CPU)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: 16 on GPU, 8 on CPU)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per node on GPUs)")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: epoch 1 compiles and is not counted")
    parser.add_argument("--images", type=int, default=256, help="examples generated (every 4th is validation)")
    parser.add_argument("--precision", help="float32, mixed_bfloat16 or mixed_float16 (default: bf16 on GPU)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the ceiling is timed")
    parser.add_argument("--data", help=f"dataset folder (default: cached under {DEFAULT_CACHE})")
    parser.add_argument("--address", default="local", help="Ray address (default: a new local cluster)")
    args = parser.parse_args(argv)
    check_positive(parser, args, "num_classes", "image_size", "batch_size", "workers", "images")
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (epoch 1 compiles and is not counted), got {args.epochs}")
    return args


def shapes_dataset(folder: str, images: int, num_classes: int) -> str:
    """A VOC-layout dataset of ``images`` examples in ``folder``, generated once."""
    from raydeeplab.data.synthetic import make_shapes_dataset

    if not os.path.exists(os.path.join(folder, "ImageSets", "Segmentation", "val.txt")):
        print(f"data: generating {images} VOC-layout examples in {folder}")
        make_shapes_dataset(folder, images, size=SOURCE_SIZE, num_classes=num_classes, photos=True)
    return folder


def measure_ceiling(cfg, seconds: float) -> dict:
    """Images/s of ``train_on_batch`` on one fixed device-resident batch of the global size;
    host seconds per image of the loop's decode + augmentation (``load_train_batch``, one core)."""
    import keras

    from raydeeplab import recipe
    from raydeeplab.data import voc
    from raydeeplab.train import dataset_pairs, load_train_batch

    recipe.configure_keras(cfg)  # precision and data parallelism, as on a worker owning every GPU
    model = recipe.trainable_model(recipe.initial_model(cfg))
    recipe.compile_for_training(model, cfg, total_steps=1000)
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.image_size, cfg.image_size)
    images = keras.ops.convert_to_tensor(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    masks = keras.ops.convert_to_tensor(rng.integers(0, cfg.num_classes, shape, dtype=np.uint8))
    step = rate(lambda: model.train_on_batch(images, masks), cfg.batch_size, seconds)
    sample = dataset_pairs(cfg)[0][:HOST_SAMPLE]
    batch = {key: np.array([pair[key] for pair in sample]) for key in (voc.IMAGE_URI, voc.MASK_URI)}
    started = time.perf_counter()
    marker = os.path.join(tempfile.mkdtemp(), "user_error.txt")  # where a worker records a user error
    load_train_batch(batch, cfg.image_size, cfg.num_classes, cfg.min_scale, cfg.max_scale, marker)
    return {"step": step, "augment_s": (time.perf_counter() - started) / len(sample)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from raydeeplab.cluster import init_ray
    from raydeeplab.config import TrainConfig, training_precision
    from raydeeplab.train import run_train

    init_ray(args.address, min_cpus=args.workers + 2)  # every worker plus data tasks, even on 2 cores
    gpus = cluster_gpus()
    if gpus and args.workers > 1:
        sys.exit(f"--workers {args.workers}: on one GPU machine use 1 worker owning all {gpus} GPUs")
    data = args.data or os.path.join(DEFAULT_CACHE, f"voc-{args.images}-{args.num_classes}")
    shapes_dataset(data, args.images, args.num_classes)
    work = tempfile.mkdtemp(prefix="raydeeplab-bench-train-")
    cfg = TrainConfig(
        data=data,
        output=work,
        model=args.model or ("deeplabv3plus_resnet50" if gpus else "tiny"),
        num_classes=args.num_classes,
        image_size=args.image_size or (512 if gpus else 64),
        batch_size=args.batch_size or (16 if gpus else 8),
        epochs=args.epochs,
        workers=args.workers,
        gpus_per_worker=gpus // args.workers,
        precision=training_precision(args.precision, gpus > 0),
        gallery=0,
    )
    try:
        ceiling = run_in_fresh_worker(measure_ceiling, cfg.gpus_per_worker, cfg.cpus_per_worker, cfg, args.seconds)
        state = run_train(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()  # flush the workers' log lines before the report
    epochs = [epoch["images_per_second"] for epoch in state["history"]]
    pipeline = float(np.mean(epochs[1:]))
    cores = os.cpu_count() or 1
    with_host = host_bound(ceiling["step"], ceiling["augment_s"], cores, gpus > 0)
    print(
        f"machine: {f'{gpus} GPU' if gpus else 'CPU only'}, {cores} CPUs; model {cfg.model} {cfg.image_size}px "
        f"{cfg.precision}, global batch {cfg.batch_size}, {cfg.workers} worker(s), "
        f"{args.images} examples of {SOURCE_SIZE[1]}x{SOURCE_SIZE[0]}"
    )
    print(f"ceiling (train_on_batch, fixed device-resident batch of {cfg.batch_size}): {ceiling['step']:.1f} img/s")
    print(
        f"host work per image (one core): decode + augment {ceiling['augment_s'] * 1e3:.2f} ms "
        f"-> ceiling incl. host work {with_host:.1f} img/s"
    )
    print("Ray Train loop, img/s per epoch: " + ", ".join(f"{r:.1f}" for r in epochs) + " (epoch 1 compiles)")
    ratio = pipeline / ceiling["step"]
    print(f"loop/ceiling {ratio:.2f} (target >= {TARGET} on GPU); loop/ceiling incl. host {pipeline / with_host:.2f}")
    print(
        result_line(
            ceiling=ceiling["step"],
            pipeline=pipeline,
            ratio=ratio,
            ceiling_with_host=with_host,
            ratio_with_host=pipeline / with_host,
            workers=cfg.workers,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
