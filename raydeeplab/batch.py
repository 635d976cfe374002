"""Ray role: batch inference. A streaming Ray Data pipeline over the core:

    list inputs -> load_images (CPU) -> SegmenterPredictor (GPU actors) -> write_outputs (CPU)
    --tile:  list -> split_tiles (CPU: a row per tile) -> SegmenterPredictor -> MaskAssembler
             (one actor: a scene's mask from its tiles) -> write_outputs

Inputs: a folder or prefix of images (listed by parallel Ray tasks: an S3 prefix split into key
prefixes, a local folder by subfolder, so the driver never holds the names), a manifest of URIs
(read by a Ray task, a chunk at a time), or Parquet shards of encoded image bytes (``--image-column``,
``--id-column``: one Ray task per shard, a record batch at a time, never object by object).

Outputs under ``OUT``:

- ``masks/<relative input path or id>.png`` (palette PNG, pixel = class; ``--masks png|both``;
  a name that would leave ``OUT`` - ``..``, absolute or drive segments - fails its row instead);
- ``predictions/part-*.parquet``, one row per input, errors included (:data:`PREDICTION_SCHEMA`):
  ``path`` (the input's URI, or a shard row's id; a row without an id: its shard's URI),
  ``error`` (null when ok, else ``"<reason>: <detail>"``), ``height``, ``width`` (source size),
  ``class_pixel_counts`` (one count per class), ``mask_path`` (null with ``--masks parquet``),
  ``model``, ``mask_png`` (the palette PNG's bytes with ``--masks parquet|both``, else null:
  :func:`read_mask` turns a row back into the mask), ``confidence`` (mean top-class probability
  over the image) and ``low_confidence_fraction`` (share of its pixels below
  ``segmenter.LOW_CONFIDENCE``): sort by them to find what to relabel;
- ``overlays/<relative input path or id>.jpg`` with ``--overlays``: the source blended with the
  coloured mask, at source size;
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
from raydeeplab.config import MAX_PIXELS, ActorOptions, ConfigError, PredictConfig, default_gpus, inference_precision
from raydeeplab.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    decode_image,
    decode_mask_png,
    encode_jpeg,
    encode_mask_png,
    fit_image,
    overlay,
    restore_mask,
    reuse_freed_memory,
)
from raydeeplab.data.manifests import ManifestError, is_manifest, iter_manifest
from raydeeplab.errors import UserError
from raydeeplab.hub import keras_without_tensorflow
from raydeeplab.tiling import SceneAssembler, TileGrid, check_tiling
from raydeeplab.tta import TestTimeAugmentation

logger = logging.getLogger(__name__)

PATH, RELPATH, IMAGE, MASK, HEIGHT, WIDTH, ERROR = (
    "path", "relpath", "image", "mask", "height", "width", "error",
)  # fmt: skip
CLASS_PIXELS, MASK_PATH, MODEL, MASK_PNG = "class_pixel_counts", "mask_path", "model", "mask_png"
BYTES = "bytes"  # a shard row's encoded image, dropped once decoded (kept for --overlays)
BOX = "box"  # (y0, y1, x0, x1): where the image lies in the model's square (a tile: its centre cell)
CONFIDENCE, LOW_FRACTION = "confidence", "low_confidence_fraction"
# --tile: a tile's index in its scene (-1: the scene's one failed row), its device outputs, and an
# assembled scene's mask as raw (H * W) uint8 bytes with the assembler's peak memory so far
TILE, TOP_SUM, LOW_COUNT, BANDS = "tile", "top_sum", "low_count", "bands"
SCENE = "scene"  # --tile: a digest of the scene's bytes; with PATH, the assembler its tiles join
SCENE_MASK, ASSEMBLY_BYTES, ASSEMBLER_RSS = "scene_mask", "assembly_bytes", "assembler_rss"
MASKS_DIR, OVERLAYS_DIR, PREDICTIONS_DIR, RUN_SUMMARY = "masks", "overlays", "predictions", "_run.json"
# a prefix is listed by this many Ray tasks per cluster CPU (at least 8), each a key prefix:
# enough to keep the CPUs listing, few enough that splitting the prefix costs little
LISTING_UNITS_PER_CPU, MIN_LISTING_UNITS = 2, 8
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
        (CONFIDENCE, pa.float32()),
        (LOW_FRACTION, pa.float32()),
    ]
)


# ---------------------------------------------------------------- driver side, no Ray


def read_manifest_entries(batch: dict[str, np.ndarray], cwd: str):
    """{"manifest": URI} -> {PATH, RELPATH} of its entries (:func:`manifest_rows`), a chunk of
    :func:`iter_manifest` at a time: its ``path`` column, or its lines."""
    for uri in map(str, batch["manifest"]):
        for columns in iter_manifest(uri, (PATH,)):
            yield manifest_rows(columns[PATH], cwd)


def manifest_rows(entries: list[str], cwd: str) -> dict[str, np.ndarray]:
    """Manifest entries -> {PATH, RELPATH}, blanks dropped. The relative path is the entry's
    canonical location without the scheme: local entries are made absolute against the driver's
    folder ``cwd`` (so ``..`` resolves the way the OS opens them, and workers in other folders
    read the same file); S3 keys stay literal and are checked on writing."""
    uris = [u for u in (entry.strip() for entry in entries) if u]
    uris = [u if storage.is_remote(u) else storage.normalize(os.path.join(cwd, os.path.expanduser(u.removeprefix("file://")))) for u in uris]
    return {PATH: np.array(uris, dtype=object), RELPATH: np.array([u.split("://", 1)[-1].lstrip("/") for u in uris], dtype=object)}


def listing_units(root: str, want: int) -> list[tuple[str, str]]:
    """``(uri, kind)`` pieces of listing work below ``root``, each listed by its own Ray task:
    ``file`` (one input), ``folder`` (a local folder's own files), ``tree`` (a local folder and all
    below it, or every key starting with an S3 key prefix). A prefix is split into about ``want``
    key prefixes (:func:`storage.split_s3_prefix`), so a flat prefix of millions of keys is listed
    by many tasks at once; a local folder by its subfolders."""
    fs, path = storage.filesystem(root)
    if fs.isfile(path):
        return [(root, "file")]
    if root.startswith("s3://"):
        bucket, prefix = storage.s3_folder(path)
        keys, prefixes = storage.split_s3_prefix(bucket, prefix, want)
        return [(f"s3://{bucket}/{k}", "file") for k in keys] + [(f"s3://{bucket}/{p}", "tree") for p in prefixes]
    subfolders = sorted(entry.path for entry in os.scandir(path) if entry.is_dir())
    return [(root, "folder")] + [(folder, "tree") for folder in subfolders]


def list_unit(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """{"unit", "kind"} (:func:`listing_units`) -> {PATH, RELPATH, ERROR} of the images they hold.
    A local name that is not UTF-8 (Python keeps its bytes as surrogates, which no Parquet or
    hash takes: the job ended) fails its row, its bytes shown as ``\\xe9``."""
    uris = []
    for unit, kind in zip(map(str, batch["unit"]), batch["kind"]):
        if kind == "file":
            uris.append(unit)
        elif unit.startswith("s3://"):  # a key prefix, not a folder: "s3://b/in/img_0" holds in/img_01.jpg
            bucket, _, prefix = unit[len("s3://") :].partition("/")
            uris += [f"s3://{bucket}/{key}" for key in storage.iter_s3_keys(bucket, prefix)]
        elif kind == "tree":
            uris += storage.list_files(unit)
        else:
            uris += sorted(entry.path for entry in os.scandir(unit) if entry.is_file())
    uris = [uri for uri in uris if is_image_name(posixpath.basename(uri))]
    # --input one image: below itself it is "", and its mask was masks/.png
    relpaths = [storage.relative_to(u, root) or posixpath.basename(u) for u in uris]
    named = [is_utf8(u) for u in uris]
    return {
        PATH: np.array([u if ok else u.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for u, ok in zip(uris, named)], dtype=object),
        RELPATH: np.array(relpaths, dtype=object),
        ERROR: np.array(["" if ok else "unreadable name: not UTF-8; rename the file" for ok in named], dtype=object),
    }


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    with storage.open_input(shards[0]) as f:
        schema = pq.read_schema(f)
    for flag, column in (("--image-column", cfg.image_column), ("--id-column", cfg.id_column)):
        if column not in schema.names:
            raise ConfigError(f"{flag} {column!r} is not a column of {shards[0]}; its columns are {', '.join(schema.names)}")
    kind = schema.field(cfg.image_column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or image_struct(kind)):
        raise ConfigError(
            f"--image-column {cfg.image_column!r} of {shards[0]} is {kind}: it must hold encoded image bytes "
            "(binary, or a struct with a binary 'bytes' field, as Hugging Face datasets writes images)"
        )
    return shards


def image_struct(kind: pa.DataType) -> bool:
    """Hugging Face ``datasets``' Image feature in Parquet: ``struct<bytes: binary, path: string>``."""
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and pa.types.is_binary(kind.field("bytes").type)


def read_shard(batch: dict[str, np.ndarray], image_column: str, id_column: str, rows: int):
    """{"shard": URI} -> its rows as {PATH: id, RELPATH: id, BYTES, ERROR}, ``rows`` at a time
    (one Parquet record batch each). A row without an id fails with "missing id", its PATH the
    shard's URI and row number (``URI#17``); a shard that cannot be read (not Parquet, a column
    missing) is one failed row named by its URI, after whatever it yielded, and the other shards go on."""
    for uri in map(str, batch["shard"]):
        try:
            with storage.open_input(uri) as f:
                first = 0
                for part in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=[image_column, id_column]):
                    yield shard_rows(part, image_column, id_column, uri, first)
                    first += part.num_rows
        except Exception as err:  # pyarrow's ArrowInvalid/ArrowException, OSError, botocore errors...
            if (failure := storage.store_failure(err, "--input", uri, "read")) is not None:
                raise failure from err
            why = f"unreadable shard: {type(err).__name__}: {err}"
            yield {PATH: np.array([uri], object), RELPATH: np.array([""], object), BYTES: np.array([b""], object), ERROR: np.array([why], object)}


def shard_rows(part: pa.RecordBatch, image_column: str, id_column: str, shard: str, first: int = 0) -> dict[str, np.ndarray]:
    """One record batch of ``shard``, its rows numbered from ``first`` -> {PATH, RELPATH, BYTES,
    ERROR} (see :func:`read_shard`)."""
    ids = [None if v is None or v != v else str(v) for v in part.column(id_column).to_pylist()]  # v != v: NaN
    numbers = range(first, first + len(ids))
    images = part.column(image_column)
    if image_struct(images.type):
        images = images.field("bytes")
    return {
        PATH: np.array([key or f"{shard}#{n}" for key, n in zip(ids, numbers)], dtype=object),
        RELPATH: np.array([key or "" for key in ids], dtype=object),
        BYTES: images.to_numpy(zero_copy_only=False),
        ERROR: np.array(["" if key else f"missing id: row {n} of {shard} has no {id_column}" for key, n in zip(ids, numbers)], dtype=object),
    }


def read_mask(row: dict) -> np.ndarray:
    """A predictions row -> its (H, W) uint8 mask: from ``mask_png`` when the table holds it,
    else from the PNG at ``mask_path``. The row's own size bounds the decode (a tiled scene's
    mask may pass ``--max-pixels``' default)."""
    if row.get(ERROR) or not (row.get(MASK_PNG) or row.get(MASK_PATH)):
        raise ValueError(f"{row.get(PATH)}: this row has no mask ({row.get(ERROR) or 'mask_png and mask_path are empty'})")
    mask = decode_mask_png(row.get(MASK_PNG) or storage.read_bytes(row[MASK_PATH]), max(MAX_PIXELS, row[HEIGHT] * row[WIDTH]))
    if mask.shape != (row[HEIGHT], row[WIDTH]):
        raise ValueError(f"{row[PATH]}: mask is {mask.shape[1]}x{mask.shape[0]}, the row says {row[WIDTH]}x{row[HEIGHT]}")
    return mask


def check_predict_config(cfg: PredictConfig):
    """Every check that needs no cluster: fails fast with the flag's name. Returns the ModelInfo."""
    with storage.reaching("--input", cfg.input, "read"):
        storage.check_reachable(cfg.input)
        shards = bool(cfg.image_column or cfg.id_column)
        if shards:
            check_shards(cfg)
        elif not storage.exists(cfg.input):
            raise ConfigError(f"--input {cfg.input}: {storage.why_missing(cfg.input)}")
        manifest = not shards and is_manifest(cfg.input)  # on S3 a request: asked once
        if manifest:  # its first rows, so a manifest that is not one fails here
            try:
                next(iter_manifest(cfg.input, (PATH,), rows=1))
            except ManifestError as err:
                raise ConfigError(f"--input {err}") from None
        folder = not shards and not manifest
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
    if cfg.tile is not None:
        try:
            check_tiling(cfg.tile, cfg.overlap)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if cfg.given("resize") is not None:
            raise ConfigError(f"--resize {cfg.resize} does not apply with --tile: tiles are cut at the image's own scale, never resized")
    from raydeeplab.presets import check_sizes_agree, describe_model  # keras-hub: not for CPU stages

    info = describe_model(cfg.model, cfg.num_classes, cfg.image_size)
    check_sizes_agree(cfg.model, info, cfg.given("num_classes"), cfg.image_size)
    if cfg.tile is not None and cfg.tile != info.image_size:
        raise ConfigError(
            f"--tile {cfg.tile} must equal the model's input size {info.image_size} (tiles are never resized); "
            f"pass --tile {info.image_size}"
        )
    with storage.reaching("--output", cfg.output, "write"):  # last: a failed check leaves no folder behind
        storage.check_writable(cfg.output)
    return info


# ---------------------------------------------------------------- pipeline stages


def load_images(
    batch: dict[str, np.ndarray], image_size: int, max_pixels: int, resize: str = "stretch", keep_bytes: bool = False
) -> dict:
    """{PATH} (read from storage; ERROR too when listed) or {PATH, BYTES, ERROR} (shard rows) -> adds IMAGE (n, S, S, 3)
    uint8 fitted by ``resize`` (:func:`fit_image`), BOX (n, 4) int32, HEIGHT, WIDTH, ERROR ("" when
    ok); BYTES (the encoded image, for --overlays) only with ``keep_bytes``."""
    reuse_freed_memory()
    encoded, failed = batch.pop(BYTES, None), batch.get(ERROR)
    n = len(batch[PATH])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    boxes = np.zeros((n, 4), np.int32)
    heights, widths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    kept = np.full(n, b"", object)
    errors = []
    for i, uri in enumerate(batch[PATH]):
        try:
            image, kept[i] = decode_input(uri, None if encoded is None else encoded[i], failed, i, max_pixels)
        except ImageError as err:
            errors.append(str(err))
            continue
        heights[i], widths[i] = image.shape[:2]
        images[i], boxes[i] = fit_image(image, image_size, resize)
        errors.append("")
    out = {**batch, IMAGE: images, BOX: boxes, HEIGHT: heights, WIDTH: widths, ERROR: np.array(errors)}
    return {**out, BYTES: kept} if keep_bytes else out


def decode_input(uri, encoded: bytes | None, failed, i: int, max_pixels: int) -> tuple[np.ndarray, bytes]:
    """Row ``i``'s ``(H, W, 3) uint8`` image and its encoded bytes: from the shard row (``encoded``)
    or read from ``uri``; a row that already failed (``failed[i]``) raises its reason."""
    if failed is not None and failed[i]:
        raise ImageError(str(failed[i]))
    data = read_input(uri) if encoded is None else (encoded or b"")
    telemetry.bytes_read(len(data))
    return decode_image(data, max_pixels), data


def split_tiles(batch: dict[str, np.ndarray], tile: int, overlap: int, max_pixels: int, keep_bytes: bool, chunk: int):
    """Scenes -> one row per tile (:class:`TileGrid`, raster order), yielded ``chunk`` rows at a time:
    {PATH, RELPATH, SCENE, TILE, IMAGE (S, S, 3) uint8, BOX (the tile's centre box), HEIGHT, WIDTH
    (the scene's), ERROR}, and BYTES (the encoded scene on its tile 0, for --overlays). A scene that
    fails to decode is one row, TILE -1. Each scene is decoded once; a task holds it and one chunk."""
    reuse_freed_memory()
    encoded, failed = batch.pop(BYTES, None), batch.get(ERROR)
    rows: list[dict] = []
    for i, uri in enumerate(batch[PATH]):
        scene = {PATH: uri, RELPATH: batch[RELPATH][i]}
        try:
            image, data = decode_input(uri, None if encoded is None else encoded[i], failed, i, max_pixels)
        except ImageError as err:
            rows.append({**scene, SCENE: "", TILE: -1, IMAGE: None, BOX: (0, 0, 0, 0), HEIGHT: 0, WIDTH: 0, ERROR: str(err)})
            continue
        grid = TileGrid(*image.shape[:2], tile, overlap)
        scene[SCENE] = hashlib.blake2b(data, digest_size=8).hexdigest()  # two scenes under one id stay apart
        for index in range(len(grid)):
            rows.append({
                **scene, TILE: index, IMAGE: grid.crop(image, index), BOX: grid.centre_box(index),
                HEIGHT: grid.height, WIDTH: grid.width, ERROR: "", BYTES: data if keep_bytes and index == 0 else b"",
            })  # fmt: skip
            if len(rows) == chunk:
                yield tile_batch(rows, tile, keep_bytes)
                rows = []
    if rows:
        yield tile_batch(rows, tile, keep_bytes)


def tile_batch(rows: list[dict], tile: int, keep_bytes: bool) -> dict[str, np.ndarray]:
    """:func:`split_tiles`' rows as numpy columns; a failed scene's IMAGE is zeros."""
    blank = np.zeros((tile, tile, 3), np.uint8)
    out = {
        PATH: np.array([r[PATH] for r in rows], object),
        RELPATH: np.array([r[RELPATH] for r in rows], object),
        SCENE: np.array([r[SCENE] for r in rows], object),
        TILE: np.array([r[TILE] for r in rows], np.int32),
        IMAGE: np.stack([blank if r[IMAGE] is None else r[IMAGE] for r in rows]),
        BOX: np.array([r[BOX] for r in rows], np.int32),
        HEIGHT: np.array([r[HEIGHT] for r in rows], np.int32),
        WIDTH: np.array([r[WIDTH] for r in rows], np.int32),
        ERROR: np.array([r[ERROR] for r in rows], object),
    }
    if keep_bytes:
        out[BYTES] = np.array([r.get(BYTES, b"") for r in rows], object)
    return out


def read_input(uri: str) -> bytes:
    """Bytes of one input; a missing or unreadable object is an :class:`ImageError`, not a crash.
    A store that refuses every read (bucket gone, access denied, down past the retries) ends the
    job with a StorageError instead of failing, and marking done, each input that follows."""
    try:
        return storage.read_bytes(uri)
    except Exception as err:  # FileNotFoundError, PermissionError, botocore errors...
        if (failure := storage.store_failure(err, "--input", uri, "read")) is not None:
            raise failure from err
        raise ImageError(f"unreadable: {type(err).__name__}: {err}") from None


class ModelLoadError(UserError):
    """A user error an actor met loading the model. Ray Data appends retry advice to a UDF's
    error on new lines, which is no help here: the message is the first line."""

    def __str__(self) -> str:
        return super().__str__().split("\n", 1)[0]


class SegmenterPredictor:
    """{IMAGE: (b, S, S, 3) uint8, BOX} -> {MASK: (b, S, S) uint8, CONFIDENCE, LOW_FRACTION}; with
    ``--tile``, tiles and their centre boxes -> {MASK, TOP_SUM, LOW_COUNT, BANDS} for
    :class:`MaskAssembler` (``Segmenter.segment_tiles``). The model is loaded once per actor.

    A user error while loading (a preset whose weights do not fit its head) is kept and raised
    by the first call: raised here, Ray would restart the actor for ~80 s before giving up;
    raised by a call (with ``raise_original_map_exception``), it fails the job at once and
    reaches the CLI as a UserError (exit 2).
    """

    def __init__(self, cfg: ActorOptions, on_gpu: bool, overlap: int | None = None):
        keras_without_tensorflow()
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
        self.overlap = overlap  # tiles of --overlap (predict --tile); None: whole images
        self.segmenter.warmup(self.overlap)
        logger.info("segmenter ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_error is not None:
            raise ModelLoadError(str(self.load_error)) from self.load_error
        images = batch.pop(IMAGE)
        ok = batch[ERROR] == ""
        if ok.all():  # the usual case: no boolean-index copies (24 ms of host time per 64 x 512^2 batch)
            batch.update(self.predict(images, batch[BOX]))
            return batch
        # failed rows carry a zero image: don't spend the device on them
        for column, values in self.predict(images[ok], batch[BOX][ok]).items():
            batch[column] = np.zeros((len(ok), *values.shape[1:]), values.dtype)
            batch[column][ok] = values
        return batch

    def predict(self, images: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        if self.overlap is None:
            out = self.segmenter.segment(images, boxes)
            columns = {MASK: out.masks, CONFIDENCE: out.confidence, LOW_FRACTION: out.low_confidence_fraction}
        else:
            out = self.segmenter.segment_tiles(images, boxes, self.overlap)
            columns = {MASK: out.masks, TOP_SUM: out.top_sum, LOW_COUNT: out.low_count, BANDS: out.bands}
        if len(images):
            calls = -(-len(images) // self.segmenter.batch_size)
            fill = len(images) / (calls * self.segmenter.batch_size)
            telemetry.device_batch(time.perf_counter() - started, fill, role="batch")
        return columns


class MaskAssembler:
    """Tile rows, in any order from any segmenter actor -> one row per finished scene: {PATH, RELPATH,
    HEIGHT, WIDTH, ERROR, SCENE_MASK (H * W uint8 bytes), CONFIDENCE, LOW_FRACTION, ASSEMBLY_BYTES,
    ASSEMBLER_RSS} (+ BYTES with --overlays); a scene that failed to decode passes as its one row.

    One for the job (``ActorPoolStrategy(size=1)``): every tile of a scene must reach the same
    :class:`SceneAssembler`. It holds, per open scene, the uint8 mask and the band cells some but
    not all of their tiles have reached (``tiling``'s bound: ``H*W + 4 (W + S) v C 4`` bytes in
    raster order), never a scene's float probabilities. If it dies, Ray restarts it empty: scenes it
    had open never complete, so they get no predictions row and the next run (resume) redoes them.
    """

    def __init__(self, tile: int, overlap: int, num_classes: int, low_confidence: float, keep_bytes: bool):
        self.tile, self.overlap, self.num_classes, self.keep_bytes = tile, overlap, num_classes, keep_bytes
        self.low_confidence = low_confidence  # segmenter.LOW_CONFIDENCE, passed in: no keras in this process
        # (PATH, SCENE) -> [(assembler, RELPATH and BYTES)]: more than one when the same scene
        # comes twice (a file listed twice); a tile joins the first copy without its index
        self.scenes: dict[tuple[str, str], list[tuple[SceneAssembler, dict]]] = {}
        self.peak_bytes = 0

    def held_bytes(self) -> int:
        return sum(a.mask.nbytes + a.open_bytes + len(kept[BYTES]) for copies in self.scenes.values() for a, kept in copies)

    def __call__(self, batch: dict[str, np.ndarray]):
        import resource

        rows: list[dict] = []
        for i, uri in enumerate(batch[PATH]):
            height, width = int(batch[HEIGHT][i]), int(batch[WIDTH][i])
            if batch[ERROR][i]:
                rows.append({PATH: uri, RELPATH: batch[RELPATH][i], ERROR: str(batch[ERROR][i]), HEIGHT: 0, WIDTH: 0})
                continue
            key, index = (uri, batch[SCENE][i]), int(batch[TILE][i])
            copies = self.scenes.setdefault(key, [])
            entry = next((copy for copy in copies if index not in copy[0].seen), None)
            if entry is None:
                grid = TileGrid(height, width, self.tile, self.overlap)
                entry = SceneAssembler(grid, self.num_classes, self.low_confidence), {RELPATH: batch[RELPATH][i], BYTES: b""}
                copies.append(entry)
            assembler, kept = entry
            if self.keep_bytes and batch[BYTES][i]:
                kept[BYTES] = batch[BYTES][i]
            assembler.add(index, batch[MASK][i], batch[BANDS][i], batch[TOP_SUM][i], batch[LOW_COUNT][i])
            self.peak_bytes = max(self.peak_bytes, self.held_bytes())
            if assembler.done:
                copies.remove(entry)
                if not copies:
                    del self.scenes[key]
                confidence, low = assembler.confidence()
                rows.append({
                    PATH: uri, RELPATH: kept[RELPATH], ERROR: "", HEIGHT: height, WIDTH: width,
                    SCENE_MASK: assembler.mask.tobytes(), CONFIDENCE: confidence, LOW_FRACTION: low, BYTES: kept[BYTES],
                })  # fmt: skip
        if not rows:  # a generator that yields nothing: no empty blocks downstream
            return
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        yield {
            PATH: np.array([r[PATH] for r in rows], object),
            RELPATH: np.array([r[RELPATH] for r in rows], object),
            ERROR: np.array([r[ERROR] for r in rows], object),
            HEIGHT: np.array([r[HEIGHT] for r in rows], np.int32),
            WIDTH: np.array([r[WIDTH] for r in rows], np.int32),
            SCENE_MASK: np.array([r.get(SCENE_MASK, b"") for r in rows], object),
            CONFIDENCE: np.array([r.get(CONFIDENCE, 0.0) for r in rows], np.float32),
            LOW_FRACTION: np.array([r.get(LOW_FRACTION, 0.0) for r in rows], np.float32),
            ASSEMBLY_BYTES: np.full(len(rows), self.peak_bytes, np.int64),
            ASSEMBLER_RSS: np.full(len(rows), rss, np.int64),
            **({BYTES: np.array([r.get(BYTES, b"") for r in rows], object)} if self.keep_bytes else {}),
        }


def write_outputs(
    batch: dict[str, np.ndarray],
    output: str,
    model_id: str,
    num_classes: int,
    masks: str = "png",
    overlays: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Masks at source size as PNG objects (``masks`` png|both) and/or in the table (parquet|both),
    overlay JPEGs (``overlays``: BYTES decoded again), then the batch's Parquet part (the commit
    record); returns {PATH, ERROR} (+ the assembler's memory figures with --tile)."""
    rows = collections.defaultdict(list)
    objects, in_table = masks in ("png", "both"), masks in ("parquet", "both")
    content = hashlib.sha1()  # names the part (below)
    for i, uri in enumerate(batch[PATH]):
        error = str(batch[ERROR][i])
        counts, mask_uri, overlay_uri, png = None, None, None, None
        if not error:
            try:  # a name with '..', a root or a drive would put its mask outside --output
                if objects:
                    mask_uri = storage.child(storage.join(output, MASKS_DIR), f"{batch[RELPATH][i]}.png")
                if overlays:
                    overlay_uri = storage.child(storage.join(output, OVERLAYS_DIR), f"{batch[RELPATH][i]}.jpg")
            except storage.UnsafePathError as err:
                error, mask_uri = f"unsafe path: {err}", None
        if not error:
            height, width = int(batch[HEIGHT][i]), int(batch[WIDTH][i])
            mask = source_mask(batch, i, height, width)
            png = encode_mask_png(mask)
            counts = np.bincount(mask.ravel(), minlength=num_classes).tolist()
            target = mask_uri
            try:
                if objects:
                    storage.write_bytes(mask_uri, png)
                    telemetry.bytes_written(len(png))
                if overlays:
                    jpeg, target = overlay_jpeg(decode_image(batch[BYTES][i], max_pixels), mask), overlay_uri
                    storage.write_bytes(overlay_uri, jpeg)
                    telemetry.bytes_written(len(jpeg))
            except OSError as err:  # a full, read-only or refusing store ends the job: no row, not done
                if (failure := storage.store_failure(err, "--output", target, "write")) is not None:
                    raise failure from err
                error, mask_uri, counts = f"write failed: {type(err).__name__}: {err}", None, None
        content.update(b"%s\0%s\0%s\0" % (str(uri).encode(), error.encode(), png or b""))
        rows[PATH].append(str(uri))
        rows[ERROR].append(error or None)
        rows[HEIGHT].append(int(batch[HEIGHT][i]) if not error else None)
        rows[WIDTH].append(int(batch[WIDTH][i]) if not error else None)
        rows[CLASS_PIXELS].append(counts)
        rows[MASK_PATH].append(mask_uri)
        rows[MODEL].append(model_id)
        rows[MASK_PNG].append(png if in_table and not error else None)
        rows[CONFIDENCE].append(float(batch[CONFIDENCE][i]) if not error else None)
        rows[LOW_FRACTION].append(float(batch[LOW_FRACTION][i]) if not error else None)
    table = pa.table(dict(rows), schema=PREDICTION_SCHEMA)
    # Named by content (paths, errors, masks): a retried task overwrites its own part instead of
    # duplicating rows, and two batches of the same paths (an id in two shards) keep both parts.
    digest = content.hexdigest()[:20]
    sink = io.BytesIO()
    pq.write_table(table, sink)
    with storage.reaching("--output", output, "write"):
        storage.write_bytes(storage.join(output, PREDICTIONS_DIR, f"part-{digest}.parquet"), sink.getvalue())
    telemetry.bytes_written(sink.tell())
    telemetry.images_processed(sum(e is None for e in rows[ERROR]))
    for error in rows[ERROR]:
        if error:
            telemetry.image_failed(reason_of(error))
    done = {PATH: np.array(rows[PATH]), ERROR: np.array([e or "" for e in rows[ERROR]])}
    return {**done, **{k: batch[k] for k in (ASSEMBLY_BYTES, ASSEMBLER_RSS) if k in batch}}


def source_mask(batch: dict[str, np.ndarray], i: int, height: int, width: int) -> np.ndarray:
    """Row ``i``'s ``(height, width) uint8`` mask: an assembled scene's, or the model's square with
    :func:`fit_image` undone (:func:`restore_mask`)."""
    if SCENE_MASK in batch:
        return np.frombuffer(batch[SCENE_MASK][i], np.uint8).reshape(height, width)
    return restore_mask(batch[MASK][i], batch[BOX][i], height, width)


OVERLAY_ROWS = 1024  # rows blended at a time: a scene's overlay holds uint8 arrays, not float32 ones


def overlay_jpeg(image: np.ndarray, mask: np.ndarray) -> bytes:
    """:func:`overlay` of the source and its mask at source size, as JPEG; blended in strips."""
    out = np.empty_like(image)
    for top in range(0, len(image), OVERLAY_ROWS):
        out[top : top + OVERLAY_ROWS] = overlay(image[top : top + OVERLAY_ROWS], mask[top : top + OVERLAY_ROWS])
    return encode_jpeg(out)


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
    # segmenter actors Ray restarted after their process died (their batches ran again); None when
    # the cluster has no dashboard for Ray's state API to ask
    actor_restarts: int | None = None
    # --tile: the most bytes the assembler held at once (masks of open scenes + open band cells +
    # kept source bytes), and its process's peak RSS (Ray worker included); None without --tile
    assembly_peak_bytes: int | None = None
    assembler_peak_rss_bytes: int | None = None
    # paths (ids) that came more than once in this run: each time gets its row, but they share
    # a mask file (the last written stays) and a rerun counts them as one input
    repeated_paths: int = 0

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.processed if self.processed else 0.0

    def line(self) -> str:
        repeated = f"; {self.repeated_paths} paths or ids came more than once (see _run.json)" if self.repeated_paths else ""
        return (
            f"raydeeplab predict: {self.ok} ok, {self.failed} failed, {self.skipped} skipped "
            f"(already done) in {self.seconds:.1f}s, {self.images_per_second:.1f} img/s{repeated}"
        )


def segmenter_restarts() -> int | None:
    """Restarts so far of this job's :class:`SegmenterPredictor` actors, from Ray's state API (dead
    actors included); None when it does not answer for this cluster (no dashboard: none of our
    actors is listed)."""
    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    nodes = {node["NodeID"] for node in ray.nodes()}
    try:
        actors = list_actors(
            address=context.gcs_address, filters=[("job_id", "=", context.get_job_id())],
            detail=True, limit=10_000, raise_on_missing_output=False,  # the API server's most
        )  # fmt: skip
    except Exception as err:  # the state API lives in the dashboard, which a cluster may not run
        logger.info("actor restarts not counted: %s", err)
        return None
    ours = [a for a in actors if a.node_id in nodes and SegmenterPredictor.__name__ in (a.repr_name or a.class_name)]
    return sum(a.num_restarts for a in ours) if ours else None


def actor_resources(cfg: ActorOptions) -> tuple[float, int]:
    """(GPUs per actor, actors): one actor per GPU by default; one CPU actor without GPUs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else default_gpus(gpus)
    actors = cfg.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    return gpus_per_actor, actors


def write_resources(cfg: PredictConfig, actors: int) -> dict:
    """Ray options of the write tasks. Ray Data 2.60 reserves CPUs for operators upstream first,
    so with fewer CPUs than the segmenters' plus one each for listing, decoding and writing, the
    writes got none until every input was decoded: a long run on a small machine showed its first
    mask near its end. There the write tasks ask for no CPU (they mostly wait on storage; Ray
    Data's object-store budget still bounds how many run); on larger clusters each takes a CPU
    as any task does."""
    import ray

    spare = float(ray.cluster_resources().get("CPU", 0)) - actors * cfg.cpus_per_actor
    return {} if spare >= 3 else {"num_cpus": 0}


def decode_task_memory(cfg: PredictConfig, image_size: int) -> int:
    """Bytes a decode task holds: a worker's baseline (~120 MiB measured) plus its output batch
    and the source images (~4x the model size each).

    Declaring it also keeps Ray Data from fusing decoding into the GPU actor (their resource
    requests differ), so decoding runs in tasks on other cores while the actor feeds the device.
    """
    return 128 * 2**20 + cfg.decode_batch_size * image_size * image_size * 3 * 5


def scene_task_memory(cfg: PredictConfig, image_size: int) -> int:
    """Bytes a :func:`split_tiles` task holds: the baseline, one decoded scene at the pixel cap
    (3 bytes a pixel, plus Pillow's copy while converting) and a chunk of tiles on its way out."""
    return 128 * 2**20 + cfg.max_pixels * 3 * 2 + cfg.decode_batch_size * image_size * image_size * 3 * 2


def read_inputs(cfg: PredictConfig):
    """The inputs as a Dataset of {PATH, RELPATH} rows (plus BYTES, ERROR for shards); lazy.

    Folders and prefixes are listed by one Ray task per :func:`listing_units` unit, a manifest
    read by one (:func:`read_manifest_entries`), shards by one each (:func:`read_shard`): the
    driver holds no image names.
    """
    import ray

    if cfg.image_column:  # one task per shard, reading it with pyarrow a record batch at a time
        shards = shard_files(cfg.input)
        return (
            ray.data.from_items([{"shard": uri} for uri in shards], override_num_blocks=len(shards))
            .map_batches(
                read_shard, batch_size=1, batch_format="numpy",
                fn_kwargs={"image_column": cfg.image_column, "id_column": cfg.id_column, "rows": cfg.decode_batch_size},
            )
            .repartition(target_num_rows_per_block=cfg.decode_batch_size)
        )  # fmt: skip
    if is_manifest(cfg.input):  # one task, reading the manifest a chunk at a time
        return (
            ray.data.from_items([{"manifest": storage.normalize(cfg.input)}])
            .map_batches(read_manifest_entries, batch_size=1, batch_format="numpy", fn_kwargs={"cwd": os.getcwd()})
            .repartition(target_num_rows_per_block=cfg.decode_batch_size)
        )
    root = storage.normalize(cfg.input)
    want = max(MIN_LISTING_UNITS, LISTING_UNITS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    units = [{"unit": unit, "kind": kind} for unit, kind in listing_units(root, want)]
    return (
        ray.data.from_items(units, override_num_blocks=len(units))
        .map_batches(list_unit, batch_size=1, batch_format="numpy", fn_kwargs={"root": root})
        .repartition(target_num_rows_per_block=cfg.decode_batch_size)
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
    if cfg.tile:  # a scene becomes rows of tiles, so its tiles spread over every segmenter actor
        images = inputs.map_batches(
            split_tiles,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={
                "tile": cfg.tile, "overlap": cfg.overlap, "max_pixels": cfg.max_pixels,
                "keep_bytes": cfg.overlays, "chunk": cfg.decode_batch_size,
            },  # fmt: skip
            memory=scene_task_memory(cfg, info.image_size),
        )
    else:
        images = inputs.map_batches(
            load_images,
            batch_size=cfg.decode_batch_size,
            batch_format="numpy",
            fn_kwargs={
                "image_size": info.image_size, "max_pixels": cfg.max_pixels, "resize": cfg.resize,
                "keep_bytes": cfg.overlays,
            },  # fmt: skip
            memory=decode_task_memory(cfg, info.image_size),
        )
    predicted = images.map_batches(
        SegmenterPredictor,
        fn_constructor_kwargs={"cfg": cfg, "on_gpu": gpus_per_actor > 0, "overlap": cfg.overlap if cfg.tile else None},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        # Two calls in flight per actor: one batch is copied in while the other computes.
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
    )
    if cfg.tile:
        from raydeeplab.segmenter import LOW_CONFIDENCE  # keras, loaded by check_predict_config already

        predicted = predicted.map_batches(
            MaskAssembler,
            fn_constructor_kwargs={
                "tile": cfg.tile, "overlap": cfg.overlap, "num_classes": info.num_classes,
                "low_confidence": LOW_CONFIDENCE, "keep_bytes": cfg.overlays,
            },  # fmt: skip
            batch_size=None,
            batch_format="numpy",
            # numpy on band cells, mostly idle: holding a CPU slot would leave a 2-CPU node (one for
            # the segmenter, one for this) none for decoding and writing, and the job would hang
            num_cpus=0,
            compute=ray.data.ActorPoolStrategy(size=1),  # every tile of a scene meets its assembler
        )
    # one scene per write task (they are large, and get written in parallel); --masks parquet:
    # one predictions file per ROWS_PER_FILE photos instead of one per block
    rows_per_write = 1 if cfg.tile else None if cfg.masks == "png" else ROWS_PER_FILE
    return predicted.map_batches(
        write_outputs,
        batch_format="numpy",
        batch_size=rows_per_write,
        **write_resources(cfg, actors),
        fn_kwargs={
            "output": cfg.output, "model_id": cfg.model, "num_classes": info.num_classes, "masks": cfg.masks,
            "overlays": cfg.overlays, "max_pixels": cfg.max_pixels,
        },  # fmt: skip
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
    restarts_before = segmenter_restarts() or 0  # earlier runs of this driver (tests, notebooks)
    reasons: collections.Counter = collections.Counter()
    seen = []  # name_hashes of every row: 8 bytes an input
    for batch in build_pipeline(cfg, todo, info).iter_batches(batch_size=None, batch_format="numpy"):
        if summary.first_output_seconds is None:
            summary.first_output_seconds = time.perf_counter() - started
        seen.append(name_hashes(batch[PATH]))
        failed = batch[ERROR] != ""
        summary.failed += int(failed.sum())
        summary.ok += int((~failed).sum())
        reasons.update(reason_of(error) for error in batch[ERROR][failed])
        if ASSEMBLY_BYTES in batch and len(batch[ASSEMBLY_BYTES]):
            summary.assembly_peak_bytes = max(summary.assembly_peak_bytes or 0, int(batch[ASSEMBLY_BYTES].max()))
            summary.assembler_peak_rss_bytes = max(summary.assembler_peak_rss_bytes or 0, int(batch[ASSEMBLER_RSS].max()))
    summary.inputs = summary.processed + summary.skipped
    summary.errors_by_reason = dict(reasons)
    summary.repeated_paths = int((np.unique(np.concatenate([np.zeros(0, np.uint64), *seen]), return_counts=True)[1] > 1).sum())
    if (restarts := segmenter_restarts()) is not None:
        summary.actor_restarts = restarts - restarts_before
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.processed / summary.seconds if summary.seconds else 0.0
    record = {**dataclasses.asdict(summary), "model": cfg.model, "arguments": cfg.model_dump()}
    with storage.reaching("--output", cfg.output, "write"):
        storage.write_bytes(storage.join(cfg.output, RUN_SUMMARY), json.dumps(record, indent=2).encode())
    from raydeeplab.report import write_run_report  # here: report imports this module's column names

    write_run_report(cfg.output, info.class_names)
    return summary
