"""``raydeeplab`` console script: one verb per job. Flags are checked before Ray starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # training needs JAX; one backend everywhere by default
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from raydeeplab.cluster import init_ray  # noqa: E402
from raydeeplab.config import PredictConfig, TrainConfig, load_config  # noqa: E402
from raydeeplab.evaluate import EvaluateConfig  # noqa: E402
from raydeeplab.errors import UserError  # noqa: E402

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


HELP = {
    "config": "YAML file of the same keys (snake_case); flags override it",
    "input": "folder, s3://bucket/prefix, or a manifest (.parquet/.csv/.txt of URIs)",
    "output": "folder or s3://bucket/prefix for the outputs",
    "model": "architecture name, preset folder, s3:// preset, or keras-hub preset name",
    "batch_size": "device batch size (fixed shape: a last partial batch is padded)",
    "image_size": "input size (architecture names; presets carry their own)",
    "num_classes": "number of classes (architecture names; presets carry their own)",
    "actors": "GPU actors (default: one per GPU; one on a CPU-only cluster)",
    "max_pixels": "larger images are recorded as errors (decompression bombs)",
    "max_error_rate": "exit non-zero when more than this fraction of inputs fails (default 1: never)",
    "precision": "compute dtype (default: bfloat16 on GPUs, float32 on CPUs)",
    "data": "dataset root: Pascal VOC, SBD or generic (images/ + masks/) layout; local or s3://",
    "sbd": "SBD root: with a VOC --data, train on the standard train_aug union",
    "workers": "Ray Train workers: one per node, each owning all of its GPUs",
    "gallery": "write a gallery PNG of this many validation images",
}


def flag_type(annotation: str):
    return int if "int" in annotation else float if "float" in annotation else str


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (``batch_size`` -> ``--batch-size``); unset flags stay None."""
    parser.add_argument("--config", help=HELP["config"])
    for field in dataclasses.fields(cls):
        name = "--" + field.name.replace("_", "-")
        parser.add_argument(name, type=flag_type(str(field.type)), help=HELP.get(field.name))


def config_from_args(cls, args: argparse.Namespace):
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    return load_config(cls, args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydeeplab", description=__doc__)
    parser.add_argument("--address", help="Ray address (default: local Ray, or RAY_ADDRESS)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    add_config_flags(verbs.add_parser("predict", help="segment a folder, bucket or manifest"), PredictConfig)
    add_config_flags(verbs.add_parser("train", help="fine-tune on Ray Train (JAX, data parallel)"), TrainConfig)
    add_config_flags(verbs.add_parser("evaluate", help="mean IoU / pixel accuracy over a split"), EvaluateConfig)

    from raydeeplab.serve_args import add_serve_flags

    add_serve_flags(verbs.add_parser("serve", help="online segmentation over HTTP (Ray Serve)"))

    model = verbs.add_parser("model", help="model presets").add_subparsers(dest="action", required=True)
    create = model.add_parser("create", help="write a random-init preset (offline)")
    create.add_argument("--arch", required=True)
    create.add_argument("--num-classes", type=int, default=21)
    create.add_argument("--image-size", type=int)
    create.add_argument("--output", required=True)

    quick = verbs.add_parser("quickstart", help="offline demo on local Ray: data, model, masks, gallery")
    quick.add_argument("--output", default="quickstart_out")
    quick.add_argument("--images", type=int, default=48, help="labelled examples to generate")
    quick.add_argument("--epochs", type=int, default=8)
    return parser


def run_predict_verb(args: argparse.Namespace) -> int:
    from raydeeplab.batch import check_predict_config, run_predict

    cfg = config_from_args(PredictConfig, args)
    info = check_predict_config(cfg)  # before any cluster work
    init_ray(args.address)
    summary = run_predict(cfg, info)
    print(summary.line())
    if summary.error_rate > cfg.max_error_rate:
        print(
            f"error: {summary.failed}/{summary.processed} inputs failed "
            f"({summary.error_rate:.1%} > --max-error-rate {cfg.max_error_rate:.1%}); "
            f"reasons: {summary.errors_by_reason}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_train_verb(args: argparse.Namespace) -> int:
    from raydeeplab.train import check_train_config, run_train

    cfg = config_from_args(TrainConfig, args)
    pairs = check_train_config(cfg)  # before any cluster work
    init_ray(args.address)
    state = run_train(cfg, pairs)
    last = state["history"][-1] if state["history"] else {}
    print(
        f"raydeeplab train: {state['epoch']} epochs, last mean IoU {last.get('mean_iou', float('nan')):.4f}, "
        f"best {state['best_mean_iou']:.4f}; presets in {cfg.output}/best and {cfg.output}/last"
    )
    return 0


def run_evaluate_verb(args: argparse.Namespace) -> int:
    from raydeeplab.evaluate import run_evaluate

    cfg = config_from_args(EvaluateConfig, args)
    init_ray(args.address)
    scores = run_evaluate(cfg)
    print(json.dumps({k: scores[k] for k in ("mean_iou", "pixel_accuracy", "images", "split")}))
    return 0


def run_serve_verb(args: argparse.Namespace) -> int:
    from raydeeplab.serve import run_serve_verb as serve

    return serve(args)


def run_model_verb(args: argparse.Namespace) -> int:
    from raydeeplab.model import create_model, default_image_size

    create_model(args.arch, args.num_classes, args.image_size or default_image_size(args.arch), args.output)
    print(f"wrote {args.arch} preset ({args.num_classes} classes) to {args.output}")
    return 0


def run_quickstart_verb(args: argparse.Namespace) -> int:
    from raydeeplab.quickstart import quickstart

    init_ray(args.address, min_cpus=4)  # 2 training workers + data tasks, even on 2 cores
    result = quickstart(args.output, args.images, args.epochs)
    print(f"masks: {result['predictions']}/masks")
    print(f"gallery: {result['gallery']}")
    return 0


VERBS = {
    "predict": run_predict_verb,
    "train": run_train_verb,
    "evaluate": run_evaluate_verb,
    "serve": run_serve_verb,
    "model": run_model_verb,
    "quickstart": run_quickstart_verb,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except UserError as err:
        print(f"raydeeplab {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
