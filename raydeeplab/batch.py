"""Ray role: batch inference. A streaming Ray Data pipeline over the core:

    list inputs -> load_images (CPU) -> SegmenterPredictor (GPU actors) -> write_outputs (CPU)

Inputs: a folder or prefix of images (listed by parallel Ray tasks, one per subfolder, so the
driver never holds the names), a manifest of URIs, or Parquet shards of encoded image bytes
(``--image-column``, ``--id-column``: read by ``ray.data.read_parquet``, never object by object).

Outputs under ``OUT``:

- ``masks/<relative input path or id>.png`` (palette PNG, pixel = class; ``--masks png|both``;
  a name that would leave ``OUT`` - ``..``, absolute or drive segments - fails its row instead);
- ``predictions/part-*.parquet``, one row per input, errors included (:data:`PREDICTION_SCHEMA`):
  ``path`` (the input's URI, or a shard row's id; a row without an id: its shard's URI),
  ``error`` (null when ok, else ``"<reason>: <detail>"``), ``height``, ``width`` (source size),
  ``class_pixel_counts`` (one count per class), ``mask_path`` (null with ``--masks parquet``),
  ``model``, ``mask_png`` (the palette PNG's bytes with ``--masks parquet|both``, else null:
  :func:`read_mask` turns a row back into the mask);
- ``_run.json``: :class:`RunSummary`'s fields, ``model`` and ``arguments`` (the config).

A Parquet row is the commit record of an input: it is written after its PNG, atomically,
so a rerun skips exactly the inputs whose outputs are complete (a streaming filter against
8-byte hashes of the recorded names, not a set of the names in the driver).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
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
    decode_mask_png,
    encode_mask_png,
    resize_image,
    resize_mask,
)
from raydeeplab.errors import UserError
from raydeeplab.tta import TestTimeAugmentation

logger = logging.getLogger(__name__)

PATH, RELPATH, IMAGE, MASK, HEIGHT, WIDTH, ERROR = (
    "path", "relpath", "image", "mask", "height", "width", "error",
)  # fmt: skip
CLASS_PIXELS, MASK_PATH, MODEL, MASK_PNG = "class_pixel_counts", "mask_path", "model", "mask_png"
BYTES = "bytes"  # a shard row's encoded image, dropped once decoded
MASKS_DIR, PREDICTIONS_DIR, RUN_SUMMARY = "masks", "predictions", "_run.json"
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
# --masks parquet: rows per predictions file, so N images make N / 1024 files, not N objects
ROWS_PER_FILE = 1024

PREDICTION_SCHEMA = pa.schema(
    [
        (PATH, pa.string()),
        (ERROR, pa.string()),
        (HEIGHT, pa.int32()),
        (WIDTH, pa.int32()),
        (CLASS_PIXELS, pa.list_(pa.int64())),
        (MASK_PATH, pa.string()),
        (MODEL, pa.string()),
        (MASK_PNG, pa.binary()),
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


def manifest_inputs(input_uri: str) -> list[tuple[str, str]]:
    """``(uri, relative path)`` for every manifest entry (the manifest is the user's own list).

    A manifest entry's relative path is its canonical location without the scheme: local
    entries are made absolute (so ``..`` is resolved the way the OS opens them, and workers
    in other folders read the same file); S3 keys stay literal and are checked on writing.
    """
    uris = [u if storage.is_remote(u) else storage.normalize(u) for u in read_manifest(input_uri)]
    return [(u, u.split("://", 1)[-1].lstrip("/")) for u in uris]


def listing_units(root: str) -> list[tuple[str, bool]]:
    """``(uri, recursive)`` pieces of listing work below ``root``: its own files (not recursive)
    and each subfolder (recursive), each listed by its own Ray task. One request here: a top
    level of more than one page (a flat prefix of many keys) is one recursive unit instead."""
    fs, path = storage.filesystem(root)
    if fs.isfile(path):
        return [(root, False)]
    if root.startswith("s3://"):
        bucket, _, key = path.partition("/")
        prefix = key + "/" if key else ""
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/")
        if page.get("IsTruncated"):
            return [(root, True)]
        subfolders = [f"s3://{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", [])]
    else:
        subfolders = [entry.path for entry in os.scandir(path) if entry.is_dir()]
    return [(root, False)] + [(folder, True) for folder in sorted(subfolders)]


def list_unit(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """{"unit", "recursive"} -> {PATH, RELPATH} of the images in those listing units."""
    uris = []
    for unit, recursive in zip(batch["unit"], batch["recursive"]):
        if recursive:
            uris += storage.list_files(str(unit), IMAGE_EXTENSIONS)
        else:
            fs, path = storage.filesystem(str(unit))
            names = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"] if fs.isdir(path) else [path]
            uris += [storage.unstrip(fs, n) for n in names if is_image_name(posixpath.basename(n))]
    return {PATH: np.array(uris, dtype=object), RELPATH: np.array([storage.relative_to(u, root) for u in uris], dtype=object)}


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def shard_files(input_uri: str) -> list[str]:
    """The Parquet shards of ``--input``: one file, a folder of them, or a glob (``part-*.parquet``).
    Shards are few (each holds many images), so listing them here is cheap."""
    fs, path = storage.filesystem(input_uri)
    if any(c in path for c in "*?["):
        return [storage.unstrip(fs, p) for p in sorted(fs.glob(path)) if fs.isfile(p)]
    return storage.list_files(input_uri, (".parquet",))


def check_shards(cfg: PredictConfig) -> list[str]:
    """The shards, after checking the first has both columns; names the flag at fault."""
    if not (cfg.image_column and cfg.id_column):
        raise ConfigError("--image-column and --id-column go together: Parquet shards need both (the id names each output)")
    shards = shard_files(cfg.input)
    if not shards:
        raise ConfigError(f"--input {cfg.input}: no .parquet shards match; check the path, folder or glob")
    fs, path = storage.filesystem(shards[0])
    with fs.open(path, "rb") as f:
        columns = pq.read_schema(f).names
    for flag, column in (("--image-column", cfg.image_column), ("--id-column", cfg.id_column)):
        if column not in columns:
            raise ConfigError(f"{flag} {column!r} is not a column of {shards[0]}; its columns are {', '.join(columns)}")
    return shards


def shard_rows(batch: dict[str, np.ndarray], image_column: str, id_column: str, scheme: str) -> dict[str, np.ndarray]:
    """A shard batch -> {PATH: id, RELPATH: id, BYTES, ERROR}; a row without an id keeps its shard's
    URI as PATH and fails with "missing id"."""
    shards = [scheme + str(p) for p in batch["path"]]  # read_parquet(include_paths=True): no scheme
    ids = [None if v is None or v != v else str(v) for v in batch[id_column]]  # v != v: NaN
    missing = [f"missing id: a row of {shard} has no {id_column}" for shard in shards]
    return {
        PATH: np.array([key or str(shard) for key, shard in zip(ids, shards)], dtype=object),
        RELPATH: np.array([key or "" for key in ids], dtype=object),
        BYTES: batch[image_column],
        ERROR: np.array(["" if key else why for key, why in zip(ids, missing)], dtype=object),
    }


def read_mask(row: dict) -> np.ndarray:
    """A predictions row -> its (H, W) uint8 mask: from ``mask_png`` when the table holds it,
    else from the PNG at ``mask_path``."""
    data = row.get(MASK_PNG) or storage.read_bytes(row[MASK_PATH])
    return decode_mask_png(data)


def check_predict_config(cfg: PredictConfig):
    """Every check that needs no cluster: fails fast with the flag's name. Returns the ModelInfo."""
    with storage.reaching("--input", cfg.input, "read"):
        storage.check_reachable(cfg.input)
        shards = bool(cfg.image_column or cfg.id_column)
        if shards:
            check_shards(cfg)
        elif not storage.exists(cfg.input):
            raise ConfigError(f"--input {cfg.input}: {storage.why_missing(cfg.input)}")
        folder = not shards and not is_manifest(cfg.input)
        if folder and not storage.has_files(cfg.input, IMAGE_EXTENSIONS):
            raise ConfigError(
                f"--input {cfg.input}: no images under it ({', '.join(IMAGE_EXTENSIONS)}); "
                "check the path or prefix, or pass a manifest"
            )
    # a glob's folder: predictions written there would be read as shards by the next run
    source = posixpath.dirname(cfg.input) if shards and any(c in cfg.input for c in "*?[") else cfg.input
    if (folder or shards) and storage.is_inside(cfg.output, source):
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
    """{PATH} (read from storage) or {PATH, BYTES, ERROR} (shard rows) -> adds IMAGE (n, S, S, 3)
    uint8, HEIGHT, WIDTH, ERROR ("" when ok); drops BYTES."""
    encoded, failed = batch.pop(BYTES, None), batch.get(ERROR)
    n = len(batch[PATH])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = []
    for i, uri in enumerate(batch[PATH]):
        try:
            if failed is not None and failed[i]:
                raise ImageError(str(failed[i]))
            data = read_input(uri) if encoded is None else (encoded[i] or b"")
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


class ModelLoadError(UserError):
    """A user error an actor met loading the model. Ray Data appends retry advice to a UDF's
    error on new lines, which is no help here: the message is the first line."""

    def __str__(self) -> str:
        return super().__str__().split("\n", 1)[0]


class SegmenterPredictor:
    """{IMAGE: (b, S, S, 3) uint8} -> {MASK: (b, S, S) uint8}; the model is loaded once per actor.

    A user error while loading (a preset whose weights do not fit its head) is kept and raised
    by the first call: raised here, Ray would restart the actor for ~80 s before giving up;
    raised by a call (with ``raise_original_map_exception``), it fails the job at once and
    reaches the CLI as a UserError (exit 2).
    """

    def __init__(self, cfg: ActorOptions, on_gpu: bool):
        from raydeeplab.presets import load_model
        from raydeeplab.segmenter import Segmenter, enable_compilation_cache

        started = time.perf_counter()
        self.load_error: UserError | None = None
        try:
            enable_compilation_cache(cfg.compile_cache)
            precision = inference_precision(cfg.precision, on_gpu)
            model = load_model(cfg.model, cfg.num_classes, cfg.image_size, precision, cfg.model_cache)
        except UserError as err:
            logger.exception("the model did not load")
            self.load_error = err
            return
        self.segmenter = Segmenter(model, cfg.batch_size, TestTimeAugmentation.parse(cfg.tta))
        self.segmenter.warmup()
        logger.info("segmenter ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_error is not None:
            raise ModelLoadError(str(self.load_error)) from self.load_error
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
    batch: dict[str, np.ndarray], output: str, model_id: str, num_classes: int, masks: str = "png"
) -> dict[str, np.ndarray]:
    """Masks as PNG objects (``masks`` png|both) and/or in the table (parquet|both), then the
    batch's Parquet part (the commit record); returns {PATH, ERROR}."""
    rows = collections.defaultdict(list)
    objects, in_table = masks in ("png", "both"), masks in ("parquet", "both")
    for i, uri in enumerate(batch[PATH]):
        error = str(batch[ERROR][i])
        counts, mask_uri, png = None, None, None
        if not error and objects:
            try:  # a name with '..', a root or a drive would put its mask outside --output
                mask_uri = storage.child(storage.join(output, MASKS_DIR), f"{batch[RELPATH][i]}.png")
            except storage.UnsafePathError as err:
                error = f"unsafe path: {err}"
        if not error:
            height, width = int(batch[HEIGHT][i]), int(batch[WIDTH][i])
            mask = resize_mask(batch[MASK][i], height, width)
            png = encode_mask_png(mask)
            counts = np.bincount(mask.ravel(), minlength=num_classes).tolist()
            try:
                if objects:
                    storage.write_bytes(mask_uri, png)
                    telemetry.bytes_written(len(png))
            except OSError as err:
                error, mask_uri, counts = f"write failed: {type(err).__name__}: {err}", None, None
        rows[PATH].append(str(uri))
        rows[ERROR].append(error or None)
        rows[HEIGHT].append(int(batch[HEIGHT][i]) if not error else None)
        rows[WIDTH].append(int(batch[WIDTH][i]) if not error else None)
        rows[CLASS_PIXELS].append(counts)
        rows[MASK_PATH].append(mask_uri)
        rows[MODEL].append(model_id)
        rows[MASK_PNG].append(png if in_table and not error else None)
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


def read_inputs(cfg: PredictConfig):
    """The inputs as a Dataset of {PATH, RELPATH} rows (plus BYTES, ERROR for shards); lazy.

    Folders and prefixes are listed by one Ray task per :func:`listing_units` unit, so the
    driver holds no names; shards are read by ``read_parquet`` in parallel.
    """
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if cfg.image_column:
        shards = shard_files(cfg.input)
        fs, _ = storage.filesystem(shards[0])
        paths = [storage.filesystem(uri)[1] for uri in shards]
        scheme = "s3://" if cfg.input.startswith("s3://") else ""
        return ray.data.read_parquet(
            paths, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=[cfg.image_column, cfg.id_column],
            include_paths=True, file_extensions=None,
        ).map_batches(
            shard_rows, batch_format="numpy",
            fn_kwargs={"image_column": cfg.image_column, "id_column": cfg.id_column, "scheme": scheme},
        ).repartition(target_num_rows_per_block=cfg.decode_batch_size)  # fmt: skip
        # a shard is one block of thousands of rows: cut, so decoding spreads over tasks and the
        # first masks do not wait for a whole shard to be decoded by one task
    if is_manifest(cfg.input):
        items = [{PATH: uri, RELPATH: rel} for uri, rel in manifest_inputs(cfg.input)]
        return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.decode_batch_size + 1, 10_000)))
    root = storage.normalize(cfg.input)
    units = [{"unit": unit, "recursive": recursive} for unit, recursive in listing_units(root)]
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        list_unit, batch_size=1, batch_format="numpy", fn_kwargs={"root": root}
    )


def name_hashes(names) -> np.ndarray:
    """64-bit BLAKE2b hashes of input names, (n,) uint64: what resume keeps of a name (8 bytes, not a
    Python string in a set). Two of 10 million names collide with probability ~3e-6."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "little") for name in names],
        np.uint64,
    )


def completed_hashes(output: str) -> np.ndarray:
    """Sorted :func:`name_hashes` of the inputs that already have a row under ``output`` (ok or
    failed), read one Parquet part at a time."""
    chunks = [np.zeros(0, np.uint64)]
    for part in storage.list_files(storage.join(output, PREDICTIONS_DIR), (".parquet",)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=[PATH])
        chunks.append(name_hashes(name for name in table.column(PATH).to_pylist() if name is not None))
    return np.unique(np.concatenate(chunks))


def drop_completed(batch: dict[str, np.ndarray], done: np.ndarray) -> dict[str, np.ndarray]:
    """Rows whose PATH has no row yet (``done``: :func:`completed_hashes`); a streaming filter."""
    keep = ~np.isin(name_hashes(batch[PATH]), done)
    return {column: values[keep] for column, values in batch.items()}


def build_pipeline(cfg: PredictConfig, inputs, info):
    """The Ray Data plan over ``inputs`` (:func:`read_inputs`; lazy: nothing runs until it is
    consumed); ``info`` is the model's ModelInfo from :func:`check_predict_config`."""
    import ray

    gpus_per_actor, actors = actor_resources(cfg)
    inputs.context.raise_original_map_exception = True  # a UserError reaches the CLI as itself
    return (
        inputs
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
            # --masks parquet: one predictions file per ROWS_PER_FILE rows instead of one per block
            batch_size=None if cfg.masks == "png" else ROWS_PER_FILE,
            fn_kwargs={"output": cfg.output, "model_id": cfg.model, "num_classes": info.num_classes, "masks": cfg.masks},
        )
    )


def run_predict(cfg: PredictConfig, info=None) -> RunSummary:
    """List, skip what is done, run the pipeline, write ``_run.json``. Ray must be initialised.

    ``info`` is what :func:`check_predict_config` returned when the caller already checked.
    """
    info = info or check_predict_config(cfg)
    started = time.perf_counter()
    done = completed_hashes(cfg.output)
    todo = read_inputs(cfg)
    if len(done):
        todo = todo.map_batches(drop_completed, batch_format="numpy", fn_kwargs={"done": done})
    summary = RunSummary(inputs=0, skipped=len(done))
    reasons: collections.Counter = collections.Counter()
    for batch in build_pipeline(cfg, todo, info).iter_batches(batch_size=None, batch_format="numpy"):
        if summary.first_output_seconds is None:
            summary.first_output_seconds = time.perf_counter() - started
        failed = batch[ERROR] != ""
        summary.failed += int(failed.sum())
        summary.ok += int((~failed).sum())
        reasons.update(reason_of(error) for error in batch[ERROR][failed])
    summary.inputs = summary.processed + summary.skipped
    summary.errors_by_reason = dict(reasons)
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.processed / summary.seconds if summary.seconds else 0.0
    record = {**dataclasses.asdict(summary), "model": cfg.model, "arguments": cfg.model_dump()}
    storage.write_bytes(storage.join(cfg.output, RUN_SUMMARY), json.dumps(record, indent=2).encode())
    from raydeeplab.report import write_run_report  # here: report imports this module's column names

    write_run_report(cfg.output, info.class_names)
    return summary
