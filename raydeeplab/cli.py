"""``raydeeplab`` console script: one verb per job. Flags are checked and local paths made
absolute before Ray starts; the terminal gets one line per phase and a summary (``-v``: all logs).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # "done in" counts from the command's start, imports included

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from typing import Literal  # noqa: E402

from raydeeplab.cluster import init_ray, log_folder, set_up_environment, verbose  # noqa: E402
from raydeeplab.config import (  # noqa: E402
    Config,
    ConfigError,
    CreateModelConfig,
    EvaluateConfig,
    ExportModelConfig,
    PredictConfig,
    QuickstartConfig,
    ServeCommand,
    TrainConfig,
    choices,
    flag,
    load_config,
)
from raydeeplab.errors import UserError  # noqa: E402

VERBOSE_HELP = "show every library and worker log line here (also RAYDEEPLAB_VERBOSE=1)"


def flag_type(annotation) -> type | None:
    """The argparse type of a field: ``int``, ``float`` or ``str`` (``X | None`` and ``Literal``
    included); None for fields a flag cannot hold (mappings: YAML and Serve arguments only)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        annotation = type(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, str) else None


def add_config_flags(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """``--config`` and one flag per field (``batch_size`` -> ``--batch-size``), with the field's
    type, choices and description; flags not given stay None, so YAML values and defaults apply."""
    parser.add_argument("--config", help="YAML file of the same keys (snake_case); flags override it")
    for name, field in cls.model_fields.items():
        shown = field.default not in (None, ...) and field.default_factory is None and not field.is_required()
        text = f"{field.description} (default: {field.default})" if shown else field.description
        if field.annotation is bool:  # a switch: --overlays sets it; absent stays None (YAML, default)
            parser.add_argument(flag(name), action="store_true", default=None, help=text)
            continue
        kind = flag_type(field.annotation)
        if kind is None or (field.json_schema_extra or {}).get("flag") is False:
            continue
        parser.add_argument(flag(name), type=kind, choices=choices(field.annotation) or None, help=text)


def config_from_args(cls: type[Config], args: argparse.Namespace):
    """``--config`` + the flags given -> ``cls``, checked; local paths made absolute."""
    overrides = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    return load_config(cls, args.config, overrides)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own refusals (an unknown flag, a value outside a flag's choices) as one line
    and exit 2, like every other user error; the verb's ``--help`` has the usage."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="raydeeplab", description=__doc__)
    parser.add_argument("--address", help="Ray address (default: local Ray, or RAY_ADDRESS)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # `-v` after the verb too; SUPPRESS keeps a verb's parser from resetting the top-level value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=text, parents=[common])

    add_config_flags(verb("predict", "segment a folder, bucket or manifest"), PredictConfig)
    add_config_flags(verb("train", "fine-tune on Ray Train (JAX, data parallel)"), TrainConfig)
    add_config_flags(verb("evaluate", "mean IoU / pixel accuracy over a split"), EvaluateConfig)
    add_config_flags(verb("serve", "online segmentation over HTTP (Ray Serve)"), ServeCommand)
    model = verb("model", "model presets").add_subparsers(dest="action", required=True)
    add_config_flags(model.add_parser("create", help="write a random-init preset (offline)", parents=[common]), CreateModelConfig)
    add_config_flags(model.add_parser("export", help="write a SavedModel or ONNX model: uint8 in, class map out", parents=[common]), ExportModelConfig)
    add_config_flags(verb("quickstart", "offline demo on local Ray: data, model, masks, gallery"), QuickstartConfig)
    return parser


def say(verb: str, text: str) -> None:
    """One line per phase, flushed so it shows before the phase's work starts."""
    print(f"raydeeplab {verb}: {text}", flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes and process managers send), raised in the main thread. A
    ``KeyboardInterrupt`` so that Ray and every verb stop their work as on Ctrl-C."""


def raise_terminated(signum: int, frame: types.FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the drain short
    raise Terminated


def sigterm_received() -> bool:
    """Whether :func:`raise_terminated` ran. Not the exception's type: what reaches ``main`` under
    ``train`` is a plain ``KeyboardInterrupt`` (Ray Train's ``fit()`` raises its own)."""
    return signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Terminated`. Called again after ``ray.init``, whose own handler
    kills the local Ray processes at once and exits, so the driver aborted (``Aborted``) on its
    next call into Ray instead of draining and stopping its work."""
    signal.signal(signal.SIGTERM, raise_terminated)


def start_ray(verb: str, address: str | None, min_cpus: int | None = None) -> None:
    import ray

    init_ray(address, min_cpus)
    stop_on_sigterm()
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
    from raydeeplab.evaluate import check_evaluate_config, run_evaluate

    cfg = config_from_args(EvaluateConfig, args)
    checked = check_evaluate_config(cfg)  # before any cluster work
    start_ray("evaluate", args.address)
    scores = run_evaluate(cfg, checked)
    print(json.dumps({k: scores[k] for k in ("mean_iou", "pixel_accuracy", "images", "split")}))
    return 0


def wait_until_interrupted() -> None:
    """Returns on Ctrl-C or SIGTERM (:class:`Terminated`)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as Serve's proxy will, so a port taken by another server fails here,
    in one line, instead of inside Ray after the cluster has started."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except socket.gaierror as err:
            raise ConfigError(f"--host {host}: {err.strerror}; give an address or name of this machine (127.0.0.1, 0.0.0.0)") from err
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine; bind 0.0.0.0 or one of its own") from err
            cause = "already in use (another server, or an earlier raydeeplab serve)" if err.errno == errno.EADDRINUSE else err.strerror
            raise ConfigError(f"--port {port} on {host}: {cause}; stop that process or pick another --port") from err


def run_serve_verb(args: argparse.Namespace) -> int:
    """``raydeeplab serve``: check flags, start Ray and Serve on ``--host:--port``, block until Ctrl-C."""
    from raydeeplab.cluster import starts_local
    from raydeeplab.presets import check_sizes_agree, describe_model

    cfg = config_from_args(ServeCommand, args)  # flag errors before any cluster work
    check_sizes_agree(cfg.model, describe_model(cfg.model), cfg.given("num_classes"), cfg.image_size)
    from raydeeplab.api import read_auth_token
    from raydeeplab.serve import APP_NAME, app_builder

    import ray
    from ray import serve

    local = starts_local(args.address) and not ray.is_initialized()
    read_auth_token(cfg.auth_token_env, cfg.auth_token_file if local else None)  # on a cluster, the replicas' nodes read the file
    if local:  # on a cluster, the port is the head node's
        check_port_free(cfg.host, cfg.port)
    start_ray("serve", args.address)
    application = app_builder(cfg.app_args(ray.cluster_resources().get("GPU", 0.0)))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    say("serve", f"POST http://{cfg.host}:{cfg.port}/segment, docs at /docs; Ctrl-C stops (or SIGTERM)")
    wait_until_interrupted()
    say("serve", f"stopping: in-flight requests finish first (up to {cfg.graceful_shutdown_timeout_s:g} s)")
    serve.delete(APP_NAME)  # replicas drain while the proxy still carries their answers back
    if local:
        serve.shutdown()  # the proxy too: the port is free when this process exits
    say("serve", "stopped")
    return 0


def run_model_verb(args: argparse.Namespace) -> int:
    if args.action == "export":
        return run_model_export(args)
    from raydeeplab.architectures import default_image_size
    from raydeeplab.presets import create_model

    cfg = config_from_args(CreateModelConfig, args)
    create_model(cfg.arch, cfg.num_classes, cfg.image_size or default_image_size(cfg.arch), cfg.output)
    print(f"wrote {cfg.arch} preset ({cfg.num_classes} classes) to {cfg.output}")
    return 0


def run_model_export(args: argparse.Namespace) -> int:
    from raydeeplab.export import export_model
    from raydeeplab.presets import check_sizes_agree, describe_model

    cfg = config_from_args(ExportModelConfig, args)
    check_sizes_agree(cfg.model, describe_model(cfg.model), cfg.given("num_classes"), cfg.given("image_size"))
    say("model", f"exporting {cfg.model} as {cfg.format} (TensorFlow and tf2onnx run in a child process)")
    written = export_model(cfg.model, cfg.format, cfg.output, cfg.batch_size, cfg.num_classes, cfg.image_size, cfg.model_cache)
    say("model", f"wrote {cfg.output} ({written['bytes'] / 1e6:.1f} MB; inputs, outputs and classes in raydeeplab.json)")
    return 0


def run_quickstart_verb(args: argparse.Namespace) -> int:
    from raydeeplab.quickstart import quickstart

    cfg = config_from_args(QuickstartConfig, args)
    start_ray("quickstart", args.address, min_cpus=4)  # 2 training workers + data tasks, even on 2 cores
    result = quickstart(cfg.output, cfg.images, cfg.epochs)
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
    adds an empty ``SystemException`` as the cause. A function that failed inside Ray Data is the
    exception, and its traceback text, of the task (see :func:`failure_line`)."""
    from ray.exceptions import UserCodeException

    found, seen = err, set()
    while isinstance(err, BaseException) and id(err) not in seen:
        if isinstance(err, UserError):  # Ray's RayTaskError(UserError) prints as the worker's traceback
            return err.cause if isinstance(getattr(err, "cause", None), UserError) else err
        seen.add(id(err))
        found = err if str(err).strip() else found
        cause = getattr(err, "cause", None)  # RayTaskError: the task's own exception
        if isinstance(cause, UserCodeException):  # Ray Data's wrapper: "UDF failed", retry advice
            return err
        err = (
            (cause if isinstance(cause, BaseException) else None)
            or next(iter(getattr(err, "worker_failures", {}).values()), None)  # Ray Train workers
            or getattr(err, "controller_failure", None)
            or err.__cause__
        )
    return found


def failure_line(err: BaseException) -> str:
    """``Type: message`` of what failed; a worker's error often reaches the driver only as the
    text of its traceback, whose last line is that (before Ray Data's ``UserCodeException``,
    raised from it)."""
    from ray.exceptions import UserCodeException

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if isinstance(err, UserCodeException):
        text = text.rsplit("The above exception was the direct cause of the following exception:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143  # README: Troubleshooting


def main(argv: list[str] | None = None) -> int:
    """Runs one verb; every way it can end is one line on stderr and an exit code (``-v``: the
    traceback first)."""
    args = build_parser().parse_args(argv)
    try:
        stop_on_sigterm()
        set_up_environment(args.verbose)
        return VERBS[args.verb](args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Ray, if started here, stops with this process
        if sigterm_received():  # the shell's code for a SIGTERM (128 + 15)
            return report(args.verb, "stopped (SIGTERM); outputs written so far are kept", EXIT_TERMINATED)
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
