"""Arguments of the Serve app and of ``raydeeplab serve``: pydantic models and argparse flags.

Kept apart from :mod:`raydeeplab.serve` so that building the CLI parser (``raydeeplab --help``)
imports neither Ray Serve, FastAPI, Keras nor TensorFlow.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydeeplab.config import ConfigError

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB; anything bigger is refused


class Knobs(BaseModel):
    """``user_config``: applied by ``reconfigure()`` on live replicas, no redeploy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)  # architecture, preset folder, s3:// preset or keras-hub preset
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)


class ServeArgs(BaseModel):
    """``app_builder`` arguments (``serve run raydeeplab.serve:app_builder key=value``); unknown keys fail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("tiny", min_length=1)
    num_classes: int = Field(21, ge=2)  # architectures only; presets carry theirs
    image_size: int | None = Field(None, ge=32, multiple_of=32)  # architectures only
    replicas: int = Field(1, ge=1)
    autoscaling_config: dict[str, Any] | None = None  # Serve's AutoscalingConfig; replaces `replicas`
    gpus_per_replica: float = Field(0.0, ge=0.0)
    cpus_per_replica: float = Field(1.0, ge=0.0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: max(2 x max_batch_size, 8)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    auth_token_env: str | None = None  # name of an env var on the replicas holding the token
    auth_token_file: str | None = None  # path, on the replicas' nodes, of a file holding the token
    precision: Literal["float32", "bfloat16", "float16"] | None = None  # default: bfloat16 on GPU
    compile_cache: str | None = None
    model_cache: str | None = None
    keras_backend: str = Field(default_factory=lambda: os.environ.get("KERAS_BACKEND", "jax"))

    @model_validator(mode="after")
    def _exclusive(self) -> ServeArgs:
        if self.auth_token_env and self.auth_token_file:
            raise ValueError("give auth_token_env or auth_token_file, not both")
        if self.autoscaling_config is not None and "replicas" in self.model_fields_set:
            raise ValueError("give replicas or autoscaling_config, not both")
        return self

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServeArgs:
        try:
            return cls.model_validate(args)
        except ValidationError as err:
            raise ConfigError(f"serve arguments: {err}") from None

    def knobs(self) -> Knobs:
        return Knobs(
            model=self.model,
            max_batch_size=self.max_batch_size,
            batch_wait_timeout_s=self.batch_wait_timeout_s,
        )


# ---------------------------------------------------------------- `raydeeplab serve` flags


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", required=True, help="architecture name, preset folder, s3:// preset, or keras-hub preset")
    add("--num-classes", type=int, help="class count for architecture names")
    add("--image-size", type=int, help="input size for architecture names (presets carry theirs)")
    add("--replicas", type=int, help="replicas (the minimum when --max-replicas autoscales); default 1")
    add("--max-replicas", type=int, help="autoscale between --replicas and this many replicas")
    add("--gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0")
    add("--cpus-per-replica", type=float)
    add("--max-batch-size", type=int, help="requests per forward pass (1 turns batching off)")
    add("--batch-wait-timeout-s", type=float, help="how long a batch waits to fill up")
    add("--max-ongoing-requests", type=int, help="per replica; default max(2 x --max-batch-size, 8)")
    add("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    add("--port", type=int, default=8000)
    add("--max-body-bytes", type=int, help="larger request bodies get 413")
    add("--max-pixels", type=int, help="larger images get 400 (decompression bombs)")
    add("--precision", help="float32, bfloat16 or float16 (default: bfloat16 on GPU)")
    add("--compile-cache", help="persistent XLA compilation cache folder on the replicas")
    add("--model-cache", help="local cache folder for s3:// presets on the replicas")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--auth-token-env", help="require 'Authorization: Bearer <token>', token from this env var")
    auth.add_argument("--auth-token-file", help="require a bearer token, read from this file on the replicas")


def serve_args_from_flags(args: argparse.Namespace, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """Flags that were given -> ``app_builder`` arguments."""
    fields = set(ServeArgs.model_fields)
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.gpus_per_replica is None:
        values["gpus_per_replica"] = 1.0 if cluster_gpus else 0.0
    if args.max_replicas is not None:
        minimum = values.pop("replicas", 1)
        if args.max_replicas < minimum:
            raise ConfigError(f"--max-replicas must be >= --replicas ({minimum}), got {args.max_replicas}")
        values["autoscaling_config"] = {
            "min_replicas": minimum,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": values.get("max_batch_size", ServeArgs().max_batch_size),
        }
    return values


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as Serve's proxy will, so a port taken by another server fails here,
    in one line, instead of inside Ray after the cluster has started."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as err:
            cause = "already in use (another server, or an earlier raydeeplab serve)" if err.errno == errno.EADDRINUSE else err.strerror
            raise ConfigError(f"--port {port} on {host}: {cause}; stop that process or pick another --port") from err
