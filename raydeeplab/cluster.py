"""Starting or joining Ray, and what its workers inherit from the driver: environment and paths.

Ray Train v2 moves every worker into its own working directory, and a job's workers may run on
other nodes, so the driver makes every local path absolute against the caller's working
directory (inside ``ray job submit --working-dir .``: the job's directory) before anything is
shipped to Ray. ``s3://`` URIs and model names are left as they are.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

from raydeeplab.hub import keras_without_tensorflow

VERBOSE_ENV = "RAYDEEPLAB_VERBOSE"
WORKER_ENV = ("KERAS_BACKEND", "AWS_ENDPOINT_URL", "TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", "RAY_TRAIN_V2_ENABLED")
PATH_KEYS = ("input", "output", "data", "sbd", "compile_cache", "model_cache", "auth_token_file")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_up_environment(verbose_flag: bool) -> None:
    """Process-wide defaults, set before Keras, TensorFlow and Ray are imported (read once).

    Unless verbose, TensorFlow's and gRPC's native log lines (absl, oneDNN, cudart) stay off the
    terminal: they say nothing a user can act on. ``-v`` or ``RAYDEEPLAB_VERBOSE=1`` keeps them.
    """
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    os.environ.setdefault("KERAS_BACKEND", "jax")  # training needs JAX; one backend everywhere
    keras_without_tensorflow()
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        import_with_stderr_closed("keras_hub")


def import_with_stderr_closed(module: str) -> None:
    """Import ``module`` with file descriptor 2 on /dev/null: TensorFlow, where Keras' backend loads
    it, writes absl lines there before any log level applies. Python errors still surface, after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            importlib.import_module(module)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def absolute(path: str | None) -> str | None:
    """A local path made absolute against the current directory; URIs (``s3://``) unchanged."""
    if not isinstance(path, str) or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_model(spec: str | None) -> str | None:
    """``--model`` made absolute only when it is an existing local folder that is not an
    architecture name (the name wins, as when the model is loaded); names pass unchanged."""
    from raydeeplab.architectures import ARCHITECTURES

    if not isinstance(spec, str) or "://" in spec or spec in ARCHITECTURES or not os.path.isdir(spec):
        return spec
    return absolute(spec)


def absolute_paths(values: dict) -> dict:
    """Config or flag values with every path-valued key (``PATH_KEYS``, ``model``) absolute."""
    resolved = {k: absolute(v) if k in PATH_KEYS else v for k, v in values.items()}
    if "model" in values:
        resolved["model"] = absolute_model(values["model"])
    return resolved


def job_env_vars() -> dict:
    """Variables a submitted job's runtime_env already sets (Ray refuses to set them twice)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return job.get("runtime_env", {}).get("env_vars", {})


def starts_local(address: str | None) -> bool:
    """Whether :func:`init_ray` starts Ray on this machine rather than joining a cluster."""
    return (address or os.environ.get("RAY_ADDRESS")) in (None, "", "local")


def init_ray(address: str | None, min_cpus: int | None = None) -> None:
    """Connect to (or start) Ray, passing the environment workers need to behave like the driver.

    ``min_cpus`` raises the logical CPU count of a cluster started here, so a demo that needs
    several concurrent workers still schedules on a small machine. Unless verbose, worker output
    stays in Ray's log files (``log_folder()``) and Ray Data draws progress bars only on a TTY.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ and k not in job_env_vars()}
    cpus = max(min_cpus, os.cpu_count() or 1) if (min_cpus and starts_local(address)) else None
    loud = verbose()
    ray.init(
        address=address, num_cpus=cpus, runtime_env={"env_vars": env}, log_to_driver=loud,
        logging_level=logging.INFO if loud else logging.ERROR,
    )  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = loud or sys.stdout.isatty()
    if not loud:  # off Ray Data's console, errors included (the CLI says what failed); ray-data.log keeps all
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL)


def log_folder() -> str:
    """This node's Ray log folder: every process's full output, kept when the terminal is quiet."""
    import ray

    session = ray.get_runtime_context().get_session_name()
    return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", session, "logs")
