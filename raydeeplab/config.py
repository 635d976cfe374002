"""Typed run configurations. A YAML file and command-line flags both end up here, and every
value is checked before any cluster work: the error names the flag and the value received.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

import yaml

from raydeeplab.cluster import absolute_paths
from raydeeplab.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A bad flag or config value; the message names the field."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    input: str
    output: str
    model: str
    batch_size: int = 16
    image_size: int | None = None  # architectures only; presets carry their own size
    num_classes: int = 21  # architectures only
    actors: int | None = None  # default: one per GPU, or one on a CPU-only cluster
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    decode_batch_size: int = 32
    max_pixels: int = 100_000_000
    max_error_rate: float = 1.0
    precision: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    compile_cache: str | None = None
    model_cache: str | None = None

    def validate(self) -> None:
        for name in ("batch_size", "decode_batch_size", "max_pixels", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise ConfigError(f"--image-size must be a multiple of 32, got {self.image_size}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.precision not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"--precision must be float32, bfloat16 or float16, got {self.precision!r}"
            )


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build a config dataclass; unknown keys and values of the wrong type fail loudly (before
    ``validate()`` compares them) instead of being ignored or crashing later."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(key, fields, n=1)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; {hint}the keys are {', '.join(fields)}")
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in values]
    if required:
        raise ConfigError(f"missing {', '.join(flag(name) for name in required)} (from {source})")
    hints = typing.get_type_hints(cls)
    return cls(**{key: checked_type(key, value, hints[key], fields[key].default, source) for key, value in values.items()})


EXPECTED = {int: "a whole number", float: "a number", str: "a string"}


def checked_type(key: str, value: Any, annotation: Any, default: Any, source: str) -> Any:
    """``value`` if it fits ``annotation`` (``int``, ``float``, ``str``, ``X | None``); an int
    where a float is expected becomes a float. YAML can hold anything: ``batch_size: "many"``."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed):
        return value
    expected = " or ".join(EXPECTED.get(t, "null" if t is type(None) else t.__name__) for t in allowed)
    example = f" (e.g. {key}: {default})" if default not in (None, dataclasses.MISSING) else ""
    raise ConfigError(f"{source}: {key} must be {expected}{example}, got {value!r}")


def load_config(cls: type[T], path: str | None, overrides: dict[str, Any]) -> T:
    """YAML file (optional) + flags that were actually given (non-None) -> config.

    Local paths, in the YAML file as on the command line, are relative to the current
    directory and come out absolute: Ray's workers run elsewhere.
    """
    values: dict[str, Any] = {}
    if path:
        values.update(read_yaml(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, absolute_paths(values), source=f"--config {path}" if path else "flags")


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; syntax errors name the file, line and column."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise ConfigError(
            f"--config {path}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: "
            f"{err.problem}; fix the file (one 'key: value' per line)"
        ) from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values (key: value lines)")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


LAYOUTS = ("auto", "voc", "sbd", "generic")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str
    output: str
    model: str = "deeplabv3plus_resnet50"
    sbd: str | None = None  # with a VOC --data: train on the standard "train_aug" union
    layout: str = "auto"  # voc, sbd, generic; auto looks for VOC's ImageSets/ or SBD's dataset/
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 21
    image_size: int = 512
    batch_size: int = 16  # global, over all workers
    epochs: int = 30
    steps_per_epoch: int | None = None  # default: one pass over the training split
    learning_rate: float | None = None  # default: 0.007 * batch_size / 16 (the guide)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clipnorm: float = 10.0
    min_scale: float = 0.5
    max_scale: float = 2.0
    workers: int = 1  # one per node: each owns all of its node's GPUs
    gpus_per_worker: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    wait_for_resources_s: float = 0.0  # autoscaling clusters: how long to wait for nodes to join
    precision: str | None = None  # default: mixed_bfloat16 on GPU, float32 on CPU
    gallery: int = 4
    check_limit: int | None = None  # validate only the first N pairs before training (None: all)
    seed: int = 0

    def validate(self) -> None:
        positive = ("num_classes", "image_size", "batch_size", "epochs", "workers", "max_failures")
        for name in positive:
            if getattr(self, name) < (0 if name == "max_failures" else 1):
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.image_size % 32:
            raise ConfigError(f"--image-size must be a multiple of 32, got {self.image_size}")
        devices = self.workers * max(self.gpus_per_worker, 1)  # one CPU device per worker without GPUs
        if self.batch_size % devices:
            per = f" x --gpus-per-worker {self.gpus_per_worker}" if self.gpus_per_worker else ""
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}{per} "
                f"(= {devices} devices, each taking an equal share)"
            )
        if self.wait_for_resources_s < 0:
            raise ConfigError(f"--wait-for-resources-s must be >= 0, got {self.wait_for_resources_s}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(
                f"--min-scale/--max-scale must satisfy 0 < min <= max, got {self.min_scale}, {self.max_scale}"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"--steps-per-epoch must be >= 1, got {self.steps_per_epoch}")
        if self.precision not in (None, "float32", "mixed_bfloat16", "mixed_float16"):
            raise ConfigError(
                f"--precision must be float32, mixed_bfloat16 or mixed_float16, got {self.precision!r}"
            )
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
