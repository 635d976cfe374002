"""``raydeeplab`` console script: one verb per job. Flags are checked and local paths made
absolute before Ray starts; the terminal gets one line per phase and a summary (``-v``: all logs).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # "done in" counts from the command's start, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

from raydeeplab.cluster import absolute, absolute_paths, init_ray, log_folder, set_up_environment, verbose  # noqa: E402
from raydeeplab.config import PredictConfig, TrainConfig, load_config  # noqa: E402
from raydeeplab.errors import UserError  # noqa: E402
from raydeeplab.evaluate import EvaluateConfig  # noqa: E402

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
    "workers": "Ray Train workers, each with --gpus-per-worker GPUs and --cpus-per-worker CPUs on one node",
    "wait_for_resources_s": "on an autoscaling cluster: ask for the workers' nodes and wait this long (default 0: fail at once)",
    "protocol": "voc: label 255 ignored, scored at the source size (default); guide: the Keras guide's (255 = background, at the model size)",
    "gallery": "write a gallery PNG of this many validation images",
    "verbose": "show every library and worker log line here (also RAYDEEPLAB_VERBOSE=1)",
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
    parser.add_argument("-v", "--verbose", action="store_true", help=HELP["verbose"])
    # `-v` after the verb too; SUPPRESS keeps a verb's parser from resetting the top-level value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=HELP["verbose"])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=text, parents=[common])

    add_config_flags(verb("predict", "segment a folder, bucket or manifest"), PredictConfig)
    add_config_flags(verb("train", "fine-tune on Ray Train (JAX, data parallel)"), TrainConfig)
    add_config_flags(verb("evaluate", "mean IoU / pixel accuracy over a split"), EvaluateConfig)

    from raydeeplab.serve_args import add_serve_flags

    add_serve_flags(verb("serve", "online segmentation over HTTP (Ray Serve)"))

    model = verb("model", "model presets").add_subparsers(dest="action", required=True)
    create = model.add_parser("create", help="write a random-init preset (offline)", parents=[common])
    create.add_argument("--arch", required=True)
    create.add_argument("--num-classes", type=int, default=21)
    create.add_argument("--image-size", type=int)
    create.add_argument("--output", required=True)

    quick = verb("quickstart", "offline demo on local Ray: data, model, masks, gallery")
    quick.add_argument("--output", default="quickstart_out", help="folder for everything it writes")
    quick.add_argument("--images", type=int, default=48, help="labelled examples to generate")
    quick.add_argument("--epochs", type=int, default=8)
    return parser


def say(verb: str, text: str) -> None:
    """One line per phase, flushed so it shows before the phase's work starts."""
    print(f"raydeeplab {verb}: {text}", flush=True)


def start_ray(verb: str, address: str | None, min_cpus: int | None = None) -> None:
    import ray

    init_ray(address, min_cpus)
    resources = ray.cluster_resources()
    say(
        verb,
        f"Ray cluster with {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
        f"its logs: {log_folder()}",
    )


def run_predict_verb(args: argparse.Namespace) -> int:
    from raydeeplab.batch import check_predict_config, run_predict

    cfg = config_from_args(PredictConfig, args)
    info = check_predict_config(cfg)  # before any cluster work
    say("predict", f"{cfg.input} -> {cfg.output} with {cfg.model} ({info.num_classes} classes, {info.image_size} px)")
    start_ray("predict", args.address)
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
    say("train", f"{len(pairs[0])} training and {len(pairs[1])} validation examples checked in {cfg.data}")
    start_ray("train", args.address)
    say("train", f"training {cfg.model} on {cfg.workers} worker(s) for {cfg.epochs} epochs into {cfg.output}")
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
    start_ray("evaluate", args.address)
    scores = run_evaluate(cfg)
    print(json.dumps({k: scores[k] for k in ("mean_iou", "pixel_accuracy", "images", "split")}))
    return 0


def wait_until_interrupted() -> None:
    while True:
        time.sleep(3600)


def run_serve_verb(args: argparse.Namespace) -> int:
    """``raydeeplab serve``: check flags, start Ray and Serve on ``--host:--port``, block until Ctrl-C."""
    from raydeeplab.cluster import starts_local
    from raydeeplab.presets import check_sizes_agree, describe_model
    from raydeeplab.serve_args import ServeArgs, check_port_free, serve_args_from_flags

    args = argparse.Namespace(**absolute_paths(vars(args)))
    ServeArgs.from_dict(serve_args_from_flags(args))  # flag errors before any cluster work
    check_sizes_agree(args.model, describe_model(args.model), args.num_classes, args.image_size)
    from raydeeplab.serve import APP_NAME, app_builder, read_auth_token

    read_auth_token(args.auth_token_env, None)  # a file is read on the replicas' nodes
    import ray
    from ray import serve

    if starts_local(args.address) and not ray.is_initialized():  # on a cluster, the port is the head node's
        check_port_free(args.host, args.port)
    init_ray(args.address)
    application = app_builder(serve_args_from_flags(args, ray.cluster_resources().get("GPU", 0.0)))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"raydeeplab serve: POST http://{args.host}:{args.port}/segment, docs at /docs; Ctrl-C stops")
    try:
        wait_until_interrupted()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
    return 0


def run_model_verb(args: argparse.Namespace) -> int:
    from raydeeplab.architectures import default_image_size
    from raydeeplab.presets import create_model

    output = absolute(args.output)
    create_model(args.arch, args.num_classes, args.image_size or default_image_size(args.arch), output)
    print(f"wrote {args.arch} preset ({args.num_classes} classes) to {output}")
    return 0


def run_quickstart_verb(args: argparse.Namespace) -> int:
    from raydeeplab.quickstart import quickstart

    start_ray("quickstart", args.address, min_cpus=4)  # 2 training workers + data tasks, even on 2 cores
    result = quickstart(absolute(args.output), args.images, args.epochs)
    say("quickstart", f"masks: {result['masks']}")
    say("quickstart", f"Parquet, one row per image: {result['parquet']}")
    say("quickstart", f"gallery (image | truth | prediction): {result['gallery']}")
    say("quickstart", f"done in {time.perf_counter() - STARTED:.0f} s")
    return 0


VERBS = {
    "predict": run_predict_verb,
    "train": run_train_verb,
    "evaluate": run_evaluate_verb,
    "serve": run_serve_verb,
    "model": run_model_verb,
    "quickstart": run_quickstart_verb,
}


def root_cause(err: BaseException) -> BaseException:
    """The first :class:`UserError` (it already says what to do), else the innermost exception with
    a message: Ray wraps a worker's error in task, actor and worker-group errors, and Ray Data
    adds an empty ``SystemException`` as the cause."""
    found, seen = err, set()
    while isinstance(err, BaseException) and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        found = err if str(err).strip() else found
        cause = getattr(err, "cause", None)  # RayTaskError: the task's own exception
        err = (
            (cause if isinstance(cause, BaseException) else None)
            or next(iter(getattr(err, "worker_failures", {}).values()), None)  # Ray Train workers
            or getattr(err, "controller_failure", None)
            or err.__cause__
        )
    return found


def failure_line(err: BaseException) -> str:
    """``Type: message`` of what failed; a worker's error often reaches the driver only as the
    text of its traceback, whose last line is that."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130  # README: Troubleshooting


def main(argv: list[str] | None = None) -> int:
    """Runs one verb; every way it can end is one line on stderr and an exit code (``-v``: the
    traceback first)."""
    args = build_parser().parse_args(argv)
    try:
        set_up_environment(args.verbose)
        return VERBS[args.verb](args)
    except KeyboardInterrupt:  # Ctrl-C: Ray, if started here, stops with this process
        return report(args.verb, "interrupted (Ctrl-C); outputs written so far are kept", EXIT_INTERRUPTED)
    except Exception as err:  # one line, not each worker's traceback
        cause = root_cause(err)
        import ray

        started = ray.is_initialized()
        if isinstance(cause, UserError):
            where = f" (raised in a Ray worker; its trace is in Ray's logs in {log_folder()})" if cause is not err and started else ""
            return report(args.verb, f"error: {cause}{where}", EXIT_USER_ERROR)
        logs = f"Ray's logs in {log_folder()}" if started else "Ray was not started"
        return report(args.verb, f"failed: {failure_line(cause)} ({logs}; rerun with -v for every traceback)", EXIT_FAILED)


def report(verb: str, line: str, code: int) -> int:
    """``raydeeplab <verb>: <line>`` on stderr, after the traceback when verbose; returns ``code``."""
    if verbose() and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    print(f"raydeeplab {verb}: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
