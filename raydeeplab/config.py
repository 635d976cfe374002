"""Typed run configurations: one pydantic model per verb, whose fields carry their constraints
and help text once. The CLI's flags, the YAML files (``--config``), the jobs' entrypoints and the
Serve application's ``args`` all become one of these models, and every value is checked before
any cluster work: an error is one line naming the flag (or the YAML key and file) and the value
received. The defaults several Ray roles share (pixel caps, precision, GPUs) live here too.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import typing
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydeeplab.cluster import PATH_KEYS, absolute_paths
from raydeeplab.errors import UserError
from raydeeplab.tta import TestTimeAugmentation

# ---------------------------------------------------------------- policies the roles share

MAX_PIXELS = 100_000_000  # 100 MP: far above any photo, far below a decompression bomb
SERVE_MAX_PIXELS = 40_000_000  # per request: a 40 MP photo decodes to 120 MB, many decode at once
MAX_BODY_BYTES = 20 * 1024 * 1024  # per request body


def default_gpus(cluster_gpus: float) -> float:
    """GPUs per batch actor or Serve replica when none is asked for: one where the cluster has GPUs."""
    return 1.0 if cluster_gpus else 0.0


def inference_precision(precision: str | None, on_gpu: bool) -> str | None:
    """The compute dtype of ``predict``/``evaluate``/``serve``: bfloat16 on GPUs (half the memory
    traffic, the same masks to within a pixel or two), Keras' float32 (``None``) on CPUs."""
    return precision or ("bfloat16" if on_gpu else None)


def training_precision(precision: str | None, on_gpu: bool) -> str:
    """The dtype policy of ``train``: mixed bfloat16 on GPUs (float32 weights), float32 on CPUs."""
    return precision or ("mixed_bfloat16" if on_gpu else "float32")


# ---------------------------------------------------------------- errors


class ConfigError(UserError):
    """A bad flag or config value; the message names the field."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


EXPECTED = {
    "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "string_type": "a string",
    "string_too_short": "a non-empty string", "dict_type": "a mapping of keys to values",
    "bool_parsing": "true or false", "bool_type": "true or false",
}  # fmt: skip
BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def choices(annotation: Any) -> tuple[str, ...]:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) field accepts, else ()."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return tuple(c for arg in typing.get_args(annotation) for c in choices(arg))


def expected(error: dict, annotation: Any) -> str:
    """What a field needed, in words: ``>= 1``, ``a multiple of 32``, ``one of voc, guide``."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in BOUNDS:
        return f"{BOUNDS[kind]} {next(iter(ctx.values()))}"
    if kind == "multiple_of":
        return f"a multiple of {ctx['multiple_of']}"
    if kind == "literal_error":
        return f"one of {', '.join(map(str, choices(annotation)))}"
    return EXPECTED.get(kind, error["msg"])


def explain(cls: type[Config], err: ValidationError, where: dict[str, str]) -> str:
    """A pydantic error as one line. ``where`` maps a key to where it came from (``--config
    run.yaml``, ``serve arguments``); keys missing from it were flags or Python arguments."""
    errors = err.errors()
    fields = cls.model_fields
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(key, fields, n=1)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        source = where.get(unknown[0])
        return f"{source + ': ' if source else ''}unknown key(s) {', '.join(unknown)}; {hint}the keys are {', '.join(fields)}"
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    if missing:
        sources = sorted(set(where.values()))
        return f"missing {', '.join(flag(k) for k in missing)} (from {', '.join(sources) if sources else 'flags'})"
    lines = []
    for error in errors:
        if not error["loc"]:  # a model validator: its message names the flags already
            lines.append(str(error.get("ctx", {}).get("error", error["msg"])))
            continue
        key = str(error["loc"][0])
        field = fields[key]
        if error["type"] == "value_error":  # a field validator's message names the flag and the fix
            lines.append(f"{where[key] + ': ' if key in where else ''}{error['ctx']['error']}")
            continue
        if key in where:  # a YAML or Serve key: as written there, with an example for a wrong type
            example = (
                f" (e.g. {key}: {field.default})"
                if error["type"] in EXPECTED and field.default is not None and not field.is_required()
                else ""
            )
            named = f"{where[key]}: {key} must be {expected(error, field.annotation)}{example}"
        else:
            named = f"{flag(key)} must be {expected(error, field.annotation)}"
        lines.append(f"{named}, got {error['input']!r}")
    return "; ".join(lines)


URI_KEYS = (*PATH_KEYS, "model")  # keys that may hold an s3:// URI

# where each key being validated came from; empty for Python arguments (see Config.from_dict)
WHERE: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("WHERE", default={})


class Config(BaseModel):
    """Frozen, unknown keys refused; built from Python arguments, a ``dict`` or YAML + flags, a
    bad value is a :class:`ConfigError` naming the flag or key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(explain(type(self), err, WHERE.get())) from None

    SOURCE: ClassVar[str | None] = None  # where from_dict's values come from unless told

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None, where: dict[str, str] | None = None):
        """``values`` -> config; errors name ``source`` (or ``where[key]``) beside each key."""
        source = source or cls.SOURCE
        token = WHERE.set(where if where is not None else {k: source for k in values} if source else {})
        try:
            return cls(**values)  # model_validate() would wrap the ConfigError in a ValidationError
        finally:
            WHERE.reset(token)

    def given(self, name: str) -> Any:
        """The field's value if the user set it, else None (a preset's own size then applies)."""
        return getattr(self, name) if name in self.model_fields_set else None

    @field_validator(*URI_KEYS, check_fields=False)
    @classmethod
    def _a_bucket_is_named(cls, value: Any, info) -> Any:
        """``s3://`` alone (or ``s3:///key``) joined outputs into a local folder named ``s3:``."""
        if isinstance(value, str) and value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
            raise ValueError(f"{flag(info.field_name)} {value}: no bucket; write s3://BUCKET or s3://BUCKET/prefix")
        return value


def load_config(cls: type[Config], path: str | None, overrides: dict[str, Any]):
    """YAML file (optional) + flags that were actually given (non-None) -> config.

    Local paths, in the YAML file as on the command line, are relative to the current
    directory and come out absolute: Ray's workers run elsewhere.
    """
    values = read_yaml(path) if path else {}
    where = {key: f"--config {path}" for key in values}
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            where.pop(key, None)
    # a relative default (quickstart's output folder) is as relative as a typed one
    defaults = {
        k: f.default for k, f in cls.model_fields.items()
        if k in PATH_KEYS and k not in values and not f.is_required() and f.default
    }  # fmt: skip
    return cls.from_dict(absolute_paths({**defaults, **values}), where=where)


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


# ---------------------------------------------------------------- inference: predict, evaluate, serve

InferencePrecision = Literal["float32", "bfloat16", "float16"]
Layout = Literal["auto", "voc", "sbd", "generic"]
MODEL_HELP = "architecture name, preset folder, s3:// preset, or keras-hub preset name"


class ModelOptions(Config):
    """What loading a model for inference needs (``predict``, ``evaluate`` and ``serve``)."""

    model: str = Field(min_length=1, description=MODEL_HELP)
    num_classes: int = Field(21, ge=1, description="number of classes (architecture names; presets carry their own)")
    image_size: int | None = Field(
        None, ge=32, multiple_of=32, description="input size (architecture names; presets carry their own)"
    )
    precision: InferencePrecision | None = Field(
        None, description="compute dtype (default: bfloat16 on GPUs, float32 on CPUs)"
    )
    compile_cache: str | None = Field(None, description="persistent XLA compilation cache folder")
    model_cache: str | None = Field(None, description="local cache folder for s3:// presets")
    resize: Literal["stretch", "pad"] = Field(
        "stretch", description="to the model's square: stretch (the Keras guide) or keep aspect and pad"
    )
    tta: str | None = Field(
        None,
        description="test-time augmentation: flip, scales=0.75,1,1.25 or both (flip,scales=...); "
        "probabilities averaged on the device, cost = views x one pass",
    )

    @field_validator("tta")
    @classmethod
    def _tta_parses(cls, value: str | None) -> str | None:
        TestTimeAugmentation.parse(value)  # raises with what is wrong
        return value


class ActorOptions(ModelOptions):
    """The batch-inference actors (``predict`` and ``evaluate``): a device batch, how many, where."""

    batch_size: int = Field(16, ge=1, description="device batch size (fixed shape: a last partial batch is padded)")
    actors: int | None = Field(None, ge=1, description="GPU actors (default: one per GPU; one on a CPU-only cluster)")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per actor (default: 1 when the cluster has GPUs, else 0)"
    )
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs per actor")


class PredictConfig(ActorOptions):
    """``raydeeplab predict``: images in, palette PNG masks and a Parquet table out."""

    input: str = Field(min_length=1, description="folder, s3://bucket/prefix, or a manifest (.parquet/.csv/.txt of URIs)")
    output: str = Field(min_length=1, description="folder or s3://bucket/prefix for the outputs")
    # 64, not 32: each Ray task, its blocks and its Parquet part cost CPU in the raylet, GCS and
    # workers whatever their size; on 2 cores 32 left the segmenter one core of two (README: Speed)
    decode_batch_size: int = Field(64, ge=1, description="images per decoding task (about one Parquet part each)")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are recorded as errors (decompression bombs)")
    max_error_rate: float = Field(
        1.0, ge=0, le=1, description="exit non-zero when more than this fraction of inputs fails (1: never)"
    )
    tile: int | None = Field(
        None, ge=1, description="sliding-window inference in tiles of the model's input size (e.g. 512); no resize"
    )
    overlap: int = Field(64, ge=0, description="--tile: pixels neighbouring tiles share and blend (< tile / 2)")
    overlays: bool = Field(False, description="also write overlays/<path>.jpg: the image blended with its coloured mask")
    image_column: str | None = Field(
        None, min_length=1, description="--input is Parquet shards (file, folder or glob): the column of image bytes"
    )
    id_column: str | None = Field(
        None, min_length=1, description="with --image-column: the column of row ids (masks/<id>.png, the path column)"
    )
    masks: Literal["png", "parquet", "both"] = Field(
        "png", description="png: one PNG object per image; parquet: the mask's PNG bytes in the predictions table"
    )


class EvaluateConfig(ActorOptions):
    """``raydeeplab evaluate``: mean IoU and pixel accuracy of a model over a labelled split."""

    data: str = Field(min_length=1, description="dataset root: Pascal VOC, SBD or generic (images/ + masks/) layout")
    split: str = Field("val", description="split to score")
    layout: Layout = Field("auto", description="dataset layout (auto: found from the folders)")
    output: str | None = Field(None, description="folder for the metrics JSON and gallery.png")
    gallery: int = Field(0, ge=0, description="write a gallery PNG of this many images")
    protocol: Literal["voc", "guide"] = Field(
        "voc",
        description="voc: label 255 ignored, scored at the source size; "
        "guide: the Keras guide's (255 = background, at the model size)",
    )


class Knobs(Config):
    """``user_config``: applied by ``reconfigure()`` on live replicas, no redeploy."""

    SOURCE = "user_config"

    model: str = Field(min_length=1, description=MODEL_HELP)
    max_batch_size: int = Field(8, ge=1, description="requests per forward pass (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="how long a batch waits to fill up")


class ServeConfig(ModelOptions):
    """The Serve application's ``args`` (``app_builder``; ``serve run raydeeplab.serve:app_builder
    key=value``, ``serve deploy``): Serve hands them over as a dict, validated here."""

    SOURCE = "serve arguments"

    model: str = Field("tiny", min_length=1, description=MODEL_HELP)
    replicas: int = Field(1, ge=1, description="replicas (the minimum when --max-replicas autoscales)")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve's AutoscalingConfig; replaces replicas")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="GPUs per replica")
    cpus_per_replica: float = Field(1.0, ge=0.0, description="CPUs per replica")
    max_batch_size: int = Knobs.model_fields["max_batch_size"]
    batch_wait_timeout_s: float = Knobs.model_fields["batch_wait_timeout_s"]
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="per replica (default: max(2 x --max-batch-size, 8))"
    )
    max_queued_requests: int = Field(
        64, ge=1, description="requests waiting for a replica, per proxy; more get 503 with Retry-After at once"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header (seconds) of a 503 for a full queue")
    request_timeout_s: float = Field(
        60.0, gt=0, description="a request not answered this long after a replica took it gets 504"
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="on shutdown (SIGTERM, Ctrl-C, redeploy) replicas finish in-flight requests this long at most"
    )
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1, description="larger request bodies get 413")
    max_pixels: int = Field(SERVE_MAX_PIXELS, ge=1, description="larger images get 400 (decompression bombs)")
    auth_token_env: str | None = Field(
        None, description="require 'Authorization: Bearer <token>', the token in this env var on the replicas"
    )
    auth_token_file: str | None = Field(
        None, description="require a bearer token, read from this file on the replicas' nodes"
    )
    keras_backend: str = Field(
        default_factory=lambda: os.environ.get("KERAS_BACKEND", "jax"),
        description="Keras backend of the replicas (default: this process's KERAS_BACKEND)",
        json_schema_extra={"flag": False},
    )

    @model_validator(mode="after")
    def _exclusive(self) -> ServeConfig:
        if self.auth_token_env and self.auth_token_file:
            raise ValueError("give auth_token_env or auth_token_file, not both")
        if self.autoscaling_config is not None and "replicas" in self.model_fields_set:
            raise ValueError("give replicas or autoscaling_config, not both")
        return self

    def knobs(self) -> Knobs:
        return Knobs(model=self.model, max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s)


class ServeCommand(ServeConfig):
    """``raydeeplab serve``: the application's arguments, plus where this process listens and
    how replicas autoscale; :meth:`app_args` turns it into ``app_builder``'s ``args``."""

    model: str = Field(min_length=1, description=MODEL_HELP)
    gpus_per_replica: float | None = Field(
        None, ge=0.0, description="GPUs per replica (default: 1 when the cluster has GPUs, else 0)"
    )
    max_replicas: int | None = Field(None, ge=1, description="autoscale between --replicas and this many replicas")
    host: str = Field("127.0.0.1", description="HTTP host (0.0.0.0 to listen on every interface)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")

    @model_validator(mode="after")
    def _replica_range(self) -> ServeCommand:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"--max-replicas must be >= --replicas ({self.replicas}), got {self.max_replicas}")
        if self.max_replicas is not None and self.autoscaling_config is not None:  # one would replace the other
            raise ValueError("--max-replicas and autoscaling_config both set autoscaling: give one, not both")
        return self

    def app_args(self, cluster_gpus: float = 0.0) -> dict[str, Any]:
        """``app_builder`` arguments: the options that were given, GPUs resolved for this cluster."""
        args = {k: getattr(self, k) for k in self.model_fields_set & set(ServeConfig.model_fields)}
        args["gpus_per_replica"] = self.gpus_per_replica if self.gpus_per_replica is not None else default_gpus(cluster_gpus)
        if self.max_replicas is not None:
            args.pop("replicas", None)
            args["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.max_batch_size,
            }
        return args


# ---------------------------------------------------------------- training


class TrainConfig(Config):
    """``raydeeplab train``: the Keras guide's recipe on Ray Train workers."""

    data: str = Field(min_length=1, description="dataset root: Pascal VOC, SBD or generic (images/ + masks/) layout; local or s3://")
    output: str = Field(min_length=1, description="folder or s3://bucket/prefix for checkpoints, presets and the gallery")
    model: str = Field(
        "deeplabv3plus_resnet50", min_length=1,
        description="architecture name, backbone or segmenter preset to start from (folder, s3:// or keras-hub name)",
    )  # fmt: skip
    sbd: str | None = Field(None, description="SBD root: with a VOC --data, train on the standard train_aug union")
    layout: Layout = Field("auto", description="dataset layout (auto: VOC's ImageSets/ or SBD's dataset/)")
    train_split: str = Field("train", description="training split")
    val_split: str = Field("val", description="validation split")
    num_classes: int = Field(21, ge=1, description="number of classes")
    image_size: int = Field(512, ge=32, multiple_of=32, description="training crop size")
    batch_size: int = Field(16, ge=1, description="global batch size, split evenly over the devices")
    epochs: int = Field(30, ge=1, description="epochs")
    steps_per_epoch: int | None = Field(None, ge=1, description="steps per epoch (default: one pass over the training split)")
    learning_rate: float | None = Field(None, gt=0, description="initial learning rate (default: 0.007 x batch size / 16, the guide's)")
    momentum: float = Field(0.9, ge=0, le=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    clipnorm: float = Field(10.0, gt=0, description="gradient norm clip")
    min_scale: float = Field(0.5, gt=0, description="smallest random scale of an example")
    max_scale: float = Field(2.0, gt=0, description="largest random scale of an example")
    workers: int = Field(
        1, ge=1, description="Ray Train workers, each with --gpus-per-worker GPUs and --cpus-per-worker CPUs on one node"
    )
    gpus_per_worker: int = Field(0, ge=0, description="GPUs per worker (one node's, all of them)")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs per worker")
    max_failures: int = Field(3, ge=0, description="worker failures to resume from before giving up")
    wait_for_resources_s: float = Field(
        0.0, ge=0, description="on an autoscaling cluster: ask for the workers' nodes and wait this long (0: fail at once)"
    )
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] | None = Field(
        None, description="dtype policy (default: mixed_bfloat16 on GPUs, float32 on CPUs)"
    )
    gallery: int = Field(4, ge=0, description="write a gallery PNG of this many validation images")
    check_limit: int | None = Field(None, ge=0, description="check only the first N pairs before training (default: all)")
    seed: int = Field(0, description="random seed")

    @model_validator(mode="after")
    def _shares(self) -> TrainConfig:
        devices = self.workers * max(self.gpus_per_worker, 1)  # one CPU device per worker without GPUs
        if self.batch_size % devices:
            per = f" x --gpus-per-worker {self.gpus_per_worker}" if self.gpus_per_worker else ""
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}{per} "
                f"(= {devices} devices, each taking an equal share)"
            )
        if self.min_scale > self.max_scale:
            raise ValueError(f"--min-scale/--max-scale must satisfy min <= max, got {self.min_scale}, {self.max_scale}")
        return self


# ---------------------------------------------------------------- the small verbs


class CreateModelConfig(Config):
    """``raydeeplab model create``: a random-init preset, offline."""

    arch: str = Field(min_length=1, description="architecture name")
    num_classes: int = Field(21, ge=1, description="number of classes")
    image_size: int | None = Field(None, ge=32, multiple_of=32, description="input size (default: the architecture's)")
    output: str = Field(min_length=1, description="folder or s3:// prefix to write the preset to")


ExportFormat = Literal["saved_model", "onnx"]


class ExportModelConfig(Config):
    """``raydeeplab model export``: uint8 images in, class map out, as files needing nothing of ours."""

    model: str = Field(min_length=1, description=MODEL_HELP)
    format: ExportFormat = Field(description="saved_model (TensorFlow) or onnx (ONNX Runtime and others)")
    output: str = Field(min_length=1, description="folder or s3:// prefix to write to")
    batch_size: int | None = Field(None, ge=1, description="fix the batch dimension (default: dynamic)")
    num_classes: int = ModelOptions.model_fields["num_classes"]
    image_size: int | None = ModelOptions.model_fields["image_size"]
    model_cache: str | None = ModelOptions.model_fields["model_cache"]


class QuickstartConfig(Config):
    """``raydeeplab quickstart``: the offline demo."""

    output: str = Field("quickstart_out", min_length=1, description="folder for everything it writes")
    images: int = Field(48, ge=1, description="labelled examples to generate")
    epochs: int = Field(8, ge=1, description="training epochs")
