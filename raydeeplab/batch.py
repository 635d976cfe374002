"""Ray role: batch inference. A streaming Ray Data pipeline over the core:

    list inputs -> load_images (CPU) -> SegmenterPredictor (GPU actors) -> write_outputs (CPU)

Outputs under ``OUT``: ``masks/<relative input path>.png`` (palette PNG, pixel = class;
a path that would leave ``OUT`` - ``..``, absolute or drive segments - fails its row instead),
``predictions/part-*.parquet`` (one row per input, errors included) and ``_run.json``.
A Parquet row is the commit record of an input: it is written after its PNG, atomically,
so a rerun skips exactly the inputs whose outputs are complete.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydeeplab import storage, telemetry
from raydeeplab.config import ActorOptions, ConfigError, PredictConfig, default_gpus, inference_precision
from raydeeplab.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    decode_image,
    encode_mask_png,
    resize_image,
    resize_mask,
)

logger = logging.getLogger(__name__)

PATH, RELPATH, IMAGE, MASK, HEIGHT, WIDTH, ERROR = (
    "path", "relpath", "image", "mask", "height", "width", "error",
)  # fmt: skip
CLASS_PIXELS, MASK_PATH, MODEL = "class_pixel_counts", "mask_path", "model"
MASKS_DIR, PREDICTIONS_DIR, RUN_SUMMARY = "masks", "predictions", "_run.json"
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")

PREDICTION_SCHEMA = pa.schema(
    [
        (PATH, pa.string()),
        (ERROR, pa.string()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (CLASS_PIXELS, pa.list_(pa.int64())),
        (MASK_PATH, pa.string()),
        (MODEL, pa.string()),
    ]
)


# ---------------------------------------------------------------- driver side, no Ray


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS) and not storage.isdir(uri)


def read_manifest(uri: str) -> list[str]:
    """Parquet/CSV with a ``path`` (or first) column, or a text file of one URI per line."""
    lower = uri.lower()
    if lower.endswith(".txt"):
        return list(storage.iter_lines(uri))
    data = storage.read_bytes(uri)
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(io.BytesIO(data))
    column = PATH if PATH in table.column_names else table.column_names[0]
    return [str(v) for v in table.column(column).to_pylist() if v]


def list_inputs(input_uri: str) -> list[tuple[str, str]]:
    """``(uri, relative path)`` for every input image; only names are held, never bytes.

    A manifest entry's relative path is its canonical location without the scheme: local
    entries are made absolute (so ``..`` is resolved the way the OS opens them, and workers
    in other folders read the same file); S3 keys stay literal and are checked on writing.
    """
    if is_manifest(input_uri):
        uris = [u if storage.is_remote(u) else storage.normalize(u) for u in read_manifest(input_uri)]
        return [(u, u.split("://", 1)[-1].lstrip("/")) for u in uris]
    root = storage.normalize(input_uri)
    return [(u, storage.relative_to(u, root)) for u in storage.list_files(root, IMAGE_EXTENSIONS)]


def completed_inputs(output: str) -> set[str]:
    """Input URIs that already have a Parquet row under ``output`` (ok or failed)."""
    parts = storage.list_files(storage.join(output, PREDICTIONS_DIR), (".parquet",))
    done: set[str] = set()
    for part in parts:
        table = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=[PATH])
        done.update(table.column(PATH).to_pylist())
    return done


def check_predict_config(cfg: PredictConfig):
    """Every check that needs no cluster: fails fast with the flag's name. Returns the ModelInfo."""
    with storage.reaching("--input", cfg.input, "read"):
        storage.check_reachable(cfg.input)
        if not storage.exists(cfg.input):
            raise ConfigError(f"--input {cfg.input}: {storage.why_missing(cfg.input)}")
        folder = not is_manifest(cfg.input)
        if folder and not storage.has_files(cfg.input, IMAGE_EXTENSIONS):
            raise ConfigError(
                f"--input {cfg.input}: no images under it ({', '.join(IMAGE_EXTENSIONS)}); "
                "check the path or prefix, or pass a manifest"
            )
    if folder and storage.is_inside(cfg.output, cfg.input):
        raise ConfigError(
            f"--output {cfg.output} is inside --input {cfg.input}: outputs would be read back as inputs"
        )
    from raydeeplab.presets import check_sizes_agree, describe_model  # keras-hub: not for CPU stages

    info = describe_model(cfg.model, cfg.num_classes, cfg.image_size)
    check_sizes_agree(cfg.model, info, cfg.given("num_classes"), cfg.image_size)
    with storage.reaching("--output", cfg.output, "write"):  # last: a failed check leaves no folder behind
        storage.check_writable(cfg.output)
    return info


# ---------------------------------------------------------------- pipeline stages


def load_images(batch: dict[str, np.ndarray], image_size: int, max_pixels: int) -> dict:
    """{PATH} -> adds IMAGE (n, S, S, 3) uint8, HEIGHT, WIDTH, ERROR ("" when ok)."""
    n = len(batch[PATH])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = []
    for i, uri in enumerate(batch[PATH]):
        try:
            data = read_input(uri)
            telemetry.bytes_read(len(data))
            image = decode_image(data, max_pixels)
        except ImageError as err:
            errors.append(str(err))
            continue
        heights[i], widths[i] = image.shape[:2]
        images[i] = resize_image(image, image_size)
        errors.append("")
    return {**batch, IMAGE: images, HEIGHT: heights, WIDTH: widths, ERROR: np.array(errors)}


def read_input(uri: str) -> bytes:
    """Bytes of one input; a missing or unreadable object is an :class:`ImageError`, not a crash."""
    try:
        return storage.read_bytes(uri)
    except Exception as err:  # FileNotFoundError, PermissionError, botocore errors...
        raise ImageError(f"unreadable: {type(err).__name__}: {err}") from None


class SegmenterPredictor:
    """{IMAGE: (b, S, S, 3) uint8} -> {MASK: (b, S, S) uint8}; the model is loaded once per actor."""

    def __init__(self, cfg: ActorOptions, on_gpu: bool):
        from raydeeplab.presets import load_model
        from raydeeplab.segmenter import Segmenter, enable_compilation_cache

        started = time.perf_counter()
        enable_compilation_cache(cfg.compile_cache)
        precision = inference_precision(cfg.precision, on_gpu)
        model = load_model(cfg.model, cfg.num_classes, cfg.image_size, precision, cfg.model_cache)
        self.segmenter = Segmenter(model, cfg.batch_size)
        self.segmenter.warmup()
        logger.info("segmenter ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop(IMAGE)
        ok = batch[ERROR] == ""
        if ok.all():  # the usual case: no boolean-index copies (24 ms of host time per 64 x 512^2 batch)
            batch[MASK] = self.predict(images)
        else:  # failed rows carry a zero image: don't spend the device on them
            batch[MASK] = np.zeros(images.shape[:3], np.uint8)
            if ok.any():
                batch[MASK][ok] = self.predict(images[ok])
        return batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        masks = self.segmenter.predict(images)
        if len(images):
            calls = -(-len(images) // self.segmenter.batch_size)
            fill = len(images) / (calls * self.segmenter.batch_size)
            telemetry.device_batch(time.perf_counter() - started, fill, role="batch")
        return masks


def write_outputs(
    batch: dict[str, np.ndarray], output: str, model_id: str, num_classes: int
) -> dict[str, np.ndarray]:
    """Masks as PNG, then the batch's Parquet part (the commit record); returns {PATH, ERROR}."""
    rows = collections.defaultdict(list)
    for i, uri in enumerate(batch[PATH]):
        error = str(batch[ERROR][i])
        counts, mask_uri = None, None
        if not error:
            try:  # a name with '..', a root or a drive would put its mask outside --output
                mask_uri = storage.child(storage.join(output, MASKS_DIR), f"{batch[RELPATH][i]}.png")
            except storage.UnsafePathError as err:
                error = f"unsafe path: {err}"
        if not error:
            height, width = int(batch[HEIGHT][i]), int(batch[WIDTH][i])
            mask = resize_mask(batch[MASK][i], height, width)
            try:
                png = encode_mask_png(mask)
                storage.write_bytes(mask_uri, png)
                telemetry.bytes_written(len(png))
                counts = np.bincount(mask.ravel(), minlength=num_classes).tolist()
            except OSError as err:
                error, mask_uri = f"write failed: {type(err).__name__}: {err}", None
        rows[PATH].append(str(uri))
        rows[ERROR].append(error or None)
        rows[HEIGHT].append(int(batch[HEIGHT][i]) if not error else None)
        rows[WIDTH].append(int(batch[WIDTH][i]) if not error else None)
        rows[CLASS_PIXELS].append(counts)
        rows[MASK_PATH].append(mask_uri)
        rows[MODEL].append(model_id)
    table = pa.table(dict(rows), schema=PREDICTION_SCHEMA)
    # Named by content: a retried task overwrites its own part instead of duplicating rows.
    digest = hashlib.sha1("\n".join(rows[PATH]).encode()).hexdigest()[:20]
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(output, PREDICTIONS_DIR, f"part-{digest}.parquet"), sink.getvalue())
    telemetry.bytes_written(sink.tell())
    telemetry.images_processed(sum(e is None for e in rows[ERROR]))
    for error in rows[ERROR]:
        if error:
            telemetry.image_failed(reason_of(error))
    return {PATH: np.array(rows[PATH]), ERROR: np.array([e or "" for e in rows[ERROR]])}


# ---------------------------------------------------------------- the job


def reason_of(error: str) -> str:
    """The short kind of an error message ("corrupt image: ..." -> "corrupt image")."""
    return error.split(":", 1)[0]


@dataclasses.dataclass
class RunSummary:
    inputs: int
    skipped: int
    ok: int = 0
    failed: int = 0
    errors_by_reason: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    first_output_seconds: float | None = None

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.processed if self.processed else 0.0

    def line(self) -> str:
        return (
            f"raydeeplab predict: {self.ok} ok, {self.failed} failed, {self.skipped} skipped "
            f"(already done) in {self.seconds:.1f}s, {self.images_per_second:.1f} img/s"
        )


def actor_resources(cfg: ActorOptions) -> tuple[float, int]:
    """(GPUs per actor, actors): one actor per GPU by default; one CPU actor without GPUs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else default_gpus(gpus)
    actors = cfg.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    return gpus_per_actor, actors


def decode_task_memory(cfg: PredictConfig, image_size: int) -> int:
    """Bytes a decode task holds: a worker's baseline (~120 MiB measured) plus its output batch
    and the source images (~4x the model size each).

    Declaring it also keeps Ray Data from fusing decoding into the GPU actor (their resource
    requests differ), so decoding runs in tasks on other cores while the actor feeds the device.
    """
    return 128 * 2**20 + cfg.decode_batch_size * image_size * image_size * 3 * 5


def build_pipeline(cfg: PredictConfig, todo: list[tuple[str, str]], info):
    """The Ray Data plan for ``todo`` inputs (lazy: nothing runs until it is consumed);
    ``info`` is the model's ModelInfo from :func:`check_predict_config`."""
    import ray

    gpus_per_actor, actors = actor_resources(cfg)
    num_blocks = max(1, min(len(todo) // cfg.decode_batch_size + 1, 10_000))
    items = [{PATH: uri, RELPATH: rel} for uri, rel in todo]
    return (
        ray.data.from_items(items, override_num_blocks=num_blocks)
        .map_batches(
            load_images,
            batch_size=cfg.decode_batch_size,
            batch_format="numpy",
            fn_kwargs={"image_size": info.image_size, "max_pixels": cfg.max_pixels},
            memory=decode_task_memory(cfg, info.image_size),
        )
        .map_batches(
            SegmenterPredictor,
            fn_constructor_kwargs={"cfg": cfg, "on_gpu": gpus_per_actor > 0},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            num_gpus=gpus_per_actor,
            num_cpus=cfg.cpus_per_actor,
            # Two calls in flight per actor: one batch is copied in while the other computes.
            compute=ray.data.ActorPoolStrategy(
                size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
            ),
        )
        .map_batches(
            write_outputs,
            batch_format="numpy",
            fn_kwargs={"output": cfg.output, "model_id": cfg.model, "num_classes": info.num_classes},
        )
    )


def run_predict(cfg: PredictConfig, info=None) -> RunSummary:
    """List, skip what is done, run the pipeline, write ``_run.json``. Ray must be initialised.

    ``info`` is what :func:`check_predict_config` returned when the caller already checked.
    """
    info = info or check_predict_config(cfg)
    started = time.perf_counter()
    inputs = list_inputs(cfg.input)
    done = completed_inputs(cfg.output)
    todo = [(uri, rel) for uri, rel in inputs if uri not in done]
    summary = RunSummary(inputs=len(inputs), skipped=len(inputs) - len(todo))
    reasons: collections.Counter = collections.Counter()
    if todo:
        for batch in build_pipeline(cfg, todo, info).iter_batches(batch_size=None, batch_format="numpy"):
            if summary.first_output_seconds is None:
                summary.first_output_seconds = time.perf_counter() - started
            failed = batch[ERROR] != ""
            summary.failed += int(failed.sum())
            summary.ok += int((~failed).sum())
            reasons.update(reason_of(error) for error in batch[ERROR][failed])
    summary.errors_by_reason = dict(reasons)
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.processed / summary.seconds if summary.seconds else 0.0
    record = {**dataclasses.asdict(summary), "model": cfg.model, "arguments": cfg.model_dump()}
    storage.write_bytes(storage.join(cfg.output, RUN_SUMMARY), json.dumps(record, indent=2).encode())
    from raydeeplab.report import write_run_report  # here: report imports this module's column names

    write_run_report(cfg.output, info.class_names)
    return summary
