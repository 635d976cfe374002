"""``raydeeplab`` console script: one verb per job. Flags are checked before Ray starts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # training needs JAX; one backend everywhere by default
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from raydeeplab.config import PredictConfig, load_config  # noqa: E402
from raydeeplab.errors import UserError  # noqa: E402

WORKER_ENV = ("KERAS_BACKEND", "AWS_ENDPOINT_URL", "TF_CPP_MIN_LOG_LEVEL")


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="YAML file of PredictConfig keys; flags override it")
    add("--input", help="folder, s3://bucket/prefix, or a manifest (.parquet/.csv/.txt of URIs)")
    add("--output", help="folder or s3://bucket/prefix for masks/, predictions/ and _run.json")
    add("--model", help="architecture name, preset folder, s3:// preset, or keras-hub preset name")
    add("--batch-size", type=int, help="device batch size (fixed: the last batch is padded)")
    add("--image-size", type=int, help="input size for architecture names (presets carry theirs)")
    add("--num-classes", type=int, help="class count for architecture names")
    add("--actors", type=int, help="GPU actors (default: one per GPU; one on a CPU-only cluster)")
    add("--gpus-per-actor", type=float)
    add("--cpus-per-actor", type=float)
    add("--decode-batch-size", type=int, help="images per CPU decode task")
    add("--max-pixels", type=int, help="larger images are recorded as errors (decompression bombs)")
    add("--max-error-rate", type=float, help="exit non-zero if more than this fraction fails")
    add("--precision", help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    add("--compile-cache", help="persistent XLA compilation cache folder")
    add("--model-cache", help="local cache folder for s3:// presets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydeeplab", description=__doc__)
    parser.add_argument("--address", help="Ray address (default: local Ray, or RAY_ADDRESS)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    add_predict_flags(verbs.add_parser("predict", help="segment a folder, bucket or manifest"))

    model = verbs.add_parser("model", help="model presets").add_subparsers(dest="action", required=True)
    create = model.add_parser("create", help="write a random-init preset (offline)")
    create.add_argument("--arch", required=True)
    create.add_argument("--num-classes", type=int, default=21)
    create.add_argument("--image-size", type=int)
    create.add_argument("--output", required=True)

    quick = verbs.add_parser("quickstart", help="offline demo on local Ray: data, model, masks, gallery")
    quick.add_argument("--output", default="quickstart_out")
    quick.add_argument("--images", type=int, default=24)
    return parser


def predict_config(args: argparse.Namespace) -> PredictConfig:
    fields = {f.name for f in dataclasses.fields(PredictConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    cfg = load_config(PredictConfig, args.config, overrides)
    return cfg


def init_ray(address: str | None) -> None:
    """Connect to (or start) Ray, passing the environment workers need to behave like the driver."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)


def run_predict_verb(args: argparse.Namespace) -> int:
    from raydeeplab.batch import check_predict_config, run_predict

    cfg = predict_config(args)
    check_predict_config(cfg)  # before any cluster work
    init_ray(args.address)
    summary = run_predict(cfg)
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


def run_model_verb(args: argparse.Namespace) -> int:
    from raydeeplab.model import create_model, default_image_size

    create_model(args.arch, args.num_classes, args.image_size or default_image_size(args.arch), args.output)
    print(f"wrote {args.arch} preset ({args.num_classes} classes) to {args.output}")
    return 0


def run_quickstart_verb(args: argparse.Namespace) -> int:
    from raydeeplab.quickstart import quickstart

    init_ray(args.address)
    gallery = quickstart(args.output, args.images)
    print(f"gallery: {gallery}")
    return 0


VERBS = {"predict": run_predict_verb, "model": run_model_verb, "quickstart": run_quickstart_verb}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except UserError as err:
        print(f"raydeeplab {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
