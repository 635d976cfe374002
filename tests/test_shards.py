"""Parquet shards of image bytes in, masks packed in Parquet out (issue 11, items 2 and 3):
real JPEG/PNG bytes, a real S3 server, a real local Ray cluster, and the CLI from a temp cwd."""

from __future__ import annotations

import io
import math
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydeeplab import storage
from raydeeplab.batch import CLASS_PIXELS, ERROR, MASK_PATH, MASK_PNG, PATH, ROWS_PER_FILE, read_mask, run_predict
from raydeeplab.config import MAX_PIXELS, PredictConfig
from raydeeplab.data.images import decode_mask_png, encode_jpeg, encode_mask_png
from tests.corpus import BOMB_LIMIT, corpus, photo, png
from tests.test_cli import SCRIPT


def write_shard(uri: str, ids: list, images: list[bytes]) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"key": ids, "jpeg": pa.array(images, pa.binary()), "note": ["x"] * len(ids)}), sink)
    storage.write_bytes(uri, sink.getvalue())


def read_rows(output: str) -> list[dict]:
    rows = []
    for part in storage.list_files(storage.join(output, "predictions"), (".parquet",)):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()
    return rows


def test_s3_shards_keep_their_ids_and_bad_rows_fail_one_by_one(ray_local, bucket, tiny_model):
    cases = corpus()  # id -> (bytes, expected size or error reason)
    names = sorted(cases)
    half = len(names) // 2
    write_shard(f"{bucket}/shards/part-0.parquet", names[:half], [cases[n][0] for n in names[:half]])
    rest = [*names[half:], None, "../escaped.jpg"]  # a row without an id; an id that would leave --output
    write_shard(f"{bucket}/shards/part-1.parquet", rest, [cases[n][0] if n in cases else encode_jpeg(photo()) for n in rest])
    write_shard(f"{bucket}/shards/other.parquet", ["never-read"], [encode_jpeg(photo())])  # outside the glob
    storage.write_bytes(f"{bucket}/shards/part-2.parquet", encode_jpeg(photo()))  # not Parquet
    sink = io.BytesIO()
    pq.write_table(pa.table({"key": ["no-image"]}), sink)  # no image column (the first shard has it)
    storage.write_bytes(f"{bucket}/shards/part-3.parquet", sink.getvalue())
    output = f"{bucket}/out"

    cfg = PredictConfig(
        input=f"{bucket}/shards/part-*.parquet", output=output, model=tiny_model, image_column="jpeg",
        id_column="key", masks="both", batch_size=4, decode_batch_size=4, max_pixels=BOMB_LIMIT,
    )  # fmt: skip
    summary = run_predict(cfg)

    rows = read_rows(output)
    assert len(rows) == len(names) + 4
    by_path = {r[PATH]: r for r in rows}
    for name in names:
        row, expected = by_path[name], cases[name][1]
        if isinstance(expected, str):
            assert row[ERROR].startswith(expected), (name, row[ERROR])
            assert row[MASK_PATH] is None and row[MASK_PNG] is None
            continue
        assert row[ERROR] is None, (name, row[ERROR])
        assert row[MASK_PATH] == f"{output}/masks/{name}.png"  # the id names the mask
        mask = decode_mask_png(storage.read_bytes(row[MASK_PATH]))
        assert mask.shape == expected
        np.testing.assert_array_equal(read_mask(row), mask)  # the table's PNG is the object's
        np.testing.assert_array_equal(row[CLASS_PIXELS], np.bincount(mask.ravel(), minlength=5))
    row_number = rest.index(None)
    missing = by_path[f"{bucket}/shards/part-1.parquet#{row_number}"]  # one row per missing id, numbered
    assert missing[ERROR] == f"missing id: row {row_number} of {bucket}/shards/part-1.parquet has no key"
    assert by_path["../escaped.jpg"][ERROR].startswith("unsafe path:")
    assert "never-read" not in by_path
    for shard in ("part-2", "part-3"):  # one row each, and the other shards went on
        assert by_path[f"{bucket}/shards/{shard}.parquet"][ERROR].startswith("unreadable shard: ")
    assert summary.errors_by_reason == {
        "empty file": 1, "corrupt image": 1, "not an image": 1, "too many pixels": 1, "missing id": 1, "unsafe path": 1,
        "unreadable shard": 2,
    }  # fmt: skip
    assert (summary.ok, summary.failed) == (len(names) - 4, 8)
    assert all(storage.is_inside(u, output) for u in storage.list_files(bucket) if "/shards/" not in u)

    again = run_predict(cfg)  # resume: every id already has a row
    assert (again.ok, again.failed) == (0, 0) and len(read_rows(output)) == len(rows)


def test_read_mask_decodes_a_scene_past_the_default_pixel_limit_and_names_a_row_without_one():
    """Tiled scenes pass ``--max-pixels``' default (the README's example allows 400 MP); a row's
    own size bounds the decode instead."""
    side = math.isqrt(MAX_PIXELS) + 1
    mask = np.zeros((side, side), np.uint8)
    mask[-1, -3:] = [1, 2, 3]
    row = {PATH: "scene", ERROR: None, "height": side, "width": side, MASK_PNG: encode_mask_png(mask), MASK_PATH: None}
    np.testing.assert_array_equal(read_mask(row), mask)
    with pytest.raises(ValueError, match=f"scene: mask is {side}x{side}, the row says {side}x{side + 1}"):
        read_mask({**row, "height": side + 1})  # (a smaller row fails the pixel bound first)
    with pytest.raises(ValueError, match=r"scene: this row has no mask \(corrupt image: truncated\)"):
        read_mask({**row, ERROR: "corrupt image: truncated", MASK_PNG: None})


@pytest.mark.parametrize("tile, masks", [(None, "png"), (64, "both")])  # a write per block; per scene
def test_ids_repeated_across_shards_keep_every_row_and_are_counted(ray_local, bucket, tiny_model, tile, masks):
    """Ids should be unique, but nothing can check that across shards (each shard's row numbers as
    ids are common). Before, a write batch's part file was named by its ids alone, so the second
    shard's replaced the first's (7 inputs, 4 rows); tiles meet their scene by its bytes too
    (tests/test_tiling.py)."""
    small = [encode_jpeg(photo(40 + i, 50)) for i in range(3)]
    large = [encode_jpeg(photo(90 + i, 130)) for i in range(3)]
    write_shard(f"{bucket}/dup/part-0.parquet", ["0", "1", "2"], small)  # a block each: 3 rows
    write_shard(f"{bucket}/dup/part-1.parquet", ["0", "1", "2"], large)
    write_shard(f"{bucket}/dup/part-2.parquet", ["copy"], large[:1])
    output = f"{bucket}/dup-out-{tile}"
    cfg = PredictConfig(
        input=f"{bucket}/dup/part-*.parquet", output=output, model=tiny_model, image_column="jpeg", id_column="key",
        masks=masks, batch_size=3, decode_batch_size=3, tile=tile, overlap=16,
    )  # fmt: skip
    summary = run_predict(cfg)

    assert (summary.ok, summary.failed, summary.repeated_paths) == (7, 0, 3)
    rows = read_rows(output)
    sizes = sorted((r[PATH], r["height"], r["width"]) for r in rows)
    assert sizes == sorted([(str(i), 40 + i, 50) for i in range(3)] + [(str(i), 90 + i, 130) for i in range(3)] + [("copy", 90, 130)])
    if masks == "both":  # masks/0.png is one file; the table holds each row's own mask
        same_scene = [read_mask(r) for r in rows if (r[PATH], r["height"]) in (("0", 90), ("copy", 90))]
        np.testing.assert_array_equal(*same_scene)


@pytest.mark.large  # an end-to-end repeat of what a default test covers; CI time (pytest -m large)
def test_cli_local_shards_with_masks_in_parquet_write_a_few_files_not_one_per_image(tmp_path, tiny_model):
    """`--masks parquet`: N images make O(N / rows-per-file) files, counted on disk."""
    sizes = [(30 + 3 * i, 40 + 5 * i) for i in range(40)]
    images = [encode_jpeg(photo(h, w)) for h, w in sizes]
    (tmp_path / "shards").mkdir()
    write_shard(str(tmp_path / "shards/part-0.parquet"), list(range(0, 20)), images[:20])  # integer ids
    write_shard(str(tmp_path / "shards/part-1.parquet"), list(range(20, 40)), images[20:])

    argv = ["predict", "--input", "shards/part-*.parquet", "--image-column", "jpeg", "--id-column", "key",
            "--output", "out", "--model", tiny_model, "--masks", "parquet", "--batch-size", "4"]  # fmt: skip
    run = subprocess.run([SCRIPT, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("raydeeplab predict: 40 ok, 0 failed"), run.stdout

    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    parts = [p for p in written if p.parent.name == "predictions"]
    assert not (tmp_path / "out/masks").exists()
    assert 1 <= len(parts) <= 4 and len(written) <= 8, sorted(map(str, written))  # not 40 mask objects
    assert ROWS_PER_FILE >= 40
    rows = {r[PATH]: r for r in read_rows(str(tmp_path / "out"))}
    assert set(rows) == {str(i) for i in range(40)}
    for i, (height, width) in enumerate(sizes):
        row = rows[str(i)]
        assert row[MASK_PATH] is None
        mask = read_mask(row)
        assert mask.shape == (height, width) and mask.max() < 5
        np.testing.assert_array_equal(row[CLASS_PIXELS], np.bincount(mask.ravel(), minlength=5))


def test_shard_flags_are_checked_before_any_cluster_work(tmp_path, tiny_model):
    from raydeeplab.batch import check_predict_config
    from raydeeplab.config import ConfigError

    write_shard(str(tmp_path / "shards/part-0.parquet"), ["a"], [encode_jpeg(photo())])
    base = {"input": str(tmp_path / "shards/part-*.parquet"), "output": str(tmp_path / "out"), "model": tiny_model}
    for flags, message in (
        ({"image_column": "jpeg"}, "--image-column and --id-column go together"),
        ({"image_column": "png", "id_column": "key"}, "--image-column 'png' is not a column of .*part-0.parquet; its columns are key, jpeg, note"),
        ({"image_column": "jpeg", "id_column": "key", "input": str(tmp_path / "nothing-*.parquet")}, "no .parquet shards match"),
        ({"image_column": "jpeg", "id_column": "key", "output": str(tmp_path / "shards/out")}, "is inside --input"),
        ({"image_column": "note", "id_column": "key"}, "--image-column 'note' of .*part-0.parquet is string: it must hold encoded image bytes"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_predict_config(PredictConfig(**{**base, **flags}))
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_image_column_is_read_by_its_bytes(tmp_path):
    """``datasets`` writes an Image feature as ``struct<bytes, path>``; every row failed with
    ``not an image: TypeError`` before."""
    from raydeeplab.batch import BYTES, check_shards, read_shard
    from raydeeplab.data.images import decode_image

    images = [photo(30, 40), photo(50, 20)]
    column = [{"bytes": png(image), "path": f"{i}.png"} for i, image in enumerate(images)]
    pq.write_table(pa.table({"image": column, "id": ["a", "b"]}), tmp_path / "hf.parquet")
    cfg = PredictConfig(input=str(tmp_path / "hf.parquet"), output=str(tmp_path / "out"), model="tiny", image_column="image", id_column="id")
    assert check_shards(cfg) == [str(tmp_path / "hf.parquet")]
    (rows,) = read_shard({"shard": np.array([str(tmp_path / "hf.parquet")])}, "image", "id", 64)
    assert list(rows[PATH]) == ["a", "b"] and not any(rows[ERROR])
    for data, image in zip(rows[BYTES], images):
        np.testing.assert_array_equal(decode_image(data), image)
