"""Batch inference end to end on a real local Ray cluster, against real files and a real S3 server."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydeeplab import storage
from raydeeplab.batch import CLASS_PIXELS, CONFIDENCE, ERROR, LOW_FRACTION, MASK_PATH, PATH, read_mask, run_predict
from raydeeplab.cli import main
from raydeeplab.config import ConfigError, PredictConfig
from raydeeplab.data.images import VOC_PALETTE, decode_image, decode_mask_png, encode_jpeg, resize_image, resize_mask
from tests.corpus import BOMB_LIMIT, photo, write_corpus
from tests.padding import padded_reference


def read_rows(output: str) -> list[dict]:
    rows = []
    for part in storage.list_files(storage.join(output, "predictions"), (".parquet",)):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()
    return rows


def write_photos(folder: str, count: int, subdir: str = "") -> list[str]:
    """JPEGs of varied sizes (so masks must come back at each source size)."""
    uris = []
    for i in range(count):
        uri = storage.join(folder, subdir, f"img_{i:03d}.jpg") if subdir else storage.join(folder, f"img_{i:03d}.jpg")
        storage.write_bytes(uri, encode_jpeg(photo(30 + 7 * i, 50 + 3 * i)))
        uris.append(uri)
    return uris


def config(input_uri: str, output: str, model: str, **kwargs) -> PredictConfig:
    return PredictConfig(input=input_uri, output=output, model=model, batch_size=4, decode_batch_size=4, **kwargs)


def test_s3_to_s3_every_input_gets_one_row_and_a_valid_mask(ray_local, bucket, tiny_model):
    write_photos(f"{bucket}/in", 6)
    write_photos(f"{bucket}/in", 3, subdir="nested/deeper")
    summary = run_predict(config(f"{bucket}/in", f"{bucket}/out", tiny_model))

    assert (summary.ok, summary.failed, summary.skipped) == (9, 0, 0)
    rows = read_rows(f"{bucket}/out")
    inputs = storage.list_files(f"{bucket}/in")
    assert sorted(r[PATH] for r in rows) == sorted(inputs)
    for row in rows:
        assert row[ERROR] is None
        assert row[MASK_PATH] == row[PATH].replace(f"{bucket}/in/", f"{bucket}/out/masks/") + ".png"
        mask = decode_mask_png(storage.read_bytes(row[MASK_PATH]))
        assert mask.shape == (row["height"], row["width"])
        assert mask.max() < 5  # tiny_model has 5 classes
        np.testing.assert_array_equal(row[CLASS_PIXELS], np.bincount(mask.ravel(), minlength=5))
    record = json.loads(storage.read_bytes(f"{bucket}/out/_run.json"))
    assert record["ok"] == 9 and record["model"] == tiny_model


def test_bad_inputs_are_recorded_row_by_row_and_the_rest_succeeds(ray_local, tmp_path, tiny_model):
    expectations = write_corpus(str(tmp_path / "in"))
    with open(os.fsencode(str(tmp_path / "in")) + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 bytes: not UTF-8
        f.write(encode_jpeg(photo()))  # it ended the whole job (no Parquet string or hash takes it)
    expectations["caf\\xe9.jpg"] = "unreadable name: not UTF-8"
    summary = run_predict(config(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model, max_pixels=BOMB_LIMIT))

    rows = {r[PATH].rsplit("/", 1)[-1]: r for r in read_rows(str(tmp_path / "out"))}
    assert set(rows) == set(expectations)
    for name, expected in expectations.items():
        row = rows[name]
        if isinstance(expected, str):
            assert row[ERROR].startswith(expected), (name, row[ERROR])
            assert row[MASK_PATH] is None
        else:
            assert row[ERROR] is None, (name, row[ERROR])
            mask = decode_mask_png(storage.read_bytes(row[MASK_PATH]))
            assert mask.shape == expected, name  # EXIF-rotated: the upright size
    failures = sum(isinstance(e, str) for e in expectations.values())
    assert (summary.ok, summary.failed) == (len(expectations) - failures, failures)
    assert summary.errors_by_reason == {"empty file": 1, "corrupt image": 1, "not an image": 1, "too many pixels": 1, "unreadable name": 1}


@pytest.fixture(scope="module")
def confident_model(tiny_model, tmp_path_factory) -> str:
    """The tiny preset with its classifier scaled x12: top-class probabilities spread over (0.2, 1),
    so the low-confidence fraction is neither 0 nor 1 (the random preset is below 0.5 everywhere)."""
    from raydeeplab.presets import load_model, save_model

    model = load_model(tiny_model)
    model.output_conv.kernel.assign(model.output_conv.kernel * 12.0)
    path = str(tmp_path_factory.mktemp("models") / "confident")
    save_model(model, path)
    return path


def keras_hub_probabilities(model, square: np.ndarray) -> np.ndarray:
    """float64 softmax of the keras-hub model's own output (``training=False``) for one uint8 square."""
    converter = model.preprocessor.image_converter
    x = square[None].astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    logits = np.asarray(model(x, training=False), np.float64)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_confidence_columns_and_resize_policy_match_the_keras_hub_model(ray_local, bucket, confident_model, resize):
    """Reference per JPEG: the model's softmax over numpy's own stretch (resize_image) or pad
    (np.pad of the scaled image); confidence = mean top-class probability over the image's part."""
    from raydeeplab.presets import load_model
    from raydeeplab.segmenter import LOW_CONFIDENCE, Segmenter

    uris = write_photos(f"{bucket}/in", 3)  # 30x50, 37x53, 44x56: not square, so pad differs from stretch
    run_predict(config(f"{bucket}/in", f"{bucket}/out", confident_model, resize=resize, masks="both", overlays=True))
    rows = {r[PATH]: r for r in read_rows(f"{bucket}/out")}
    model = load_model(confident_model)
    segmenter = Segmenter(model, batch_size=4)  # the actors' batch: the same compiled program
    size = segmenter.image_size
    lows = []
    for uri in uris:
        image = decode_image(storage.read_bytes(uri))
        height, width = image.shape[:2]
        row = rows[uri]
        assert row[ERROR] is None
        if resize == "stretch":
            inner, square = (size, size), resize_image(image, size)
        else:
            inner = (round(height * size / max(height, width)), round(width * size / max(height, width)))
            scaled = resize_image(image, inner)
            square = np.stack([np.pad(scaled[..., c], ((0, size - inner[0]), (0, size - inner[1])), constant_values=m)
                               for c, m in enumerate((124, 116, 104))], -1)  # fmt: skip
        probs = keras_hub_probabilities(model, square)[: inner[0], : inner[1]]
        top = probs.max(-1)
        assert row[CONFIDENCE] == pytest.approx(top.mean(), abs=1e-3), uri
        assert row[LOW_FRACTION] == pytest.approx((top < LOW_CONFIDENCE).mean(), abs=0.01), uri
        lows.append(row[LOW_FRACTION])
        mask = read_mask(row)
        assert mask.shape == (height, width)
        # the keras-hub argmax, brought back by hand; only float-rounding ties may differ
        assert (mask == resize_mask(np.argmax(probs, -1).astype(np.uint8), height, width)).mean() > 0.99
        # --overlays: half source, half palette colour where the class is not background
        shown = decode_image(storage.read_bytes(uri.replace("/in/", "/out/overlays/") + ".jpg"))
        expected = np.where(mask[..., None] > 0, 0.5 * image + 0.5 * VOC_PALETTE[mask], image).astype(np.uint8)
        expected = decode_image(encode_jpeg(expected)).astype(float)  # through JPEG too: chroma bleeds
        assert shown.shape == image.shape and np.abs(shown - expected).mean() < 1.5, uri
        if resize == "pad":
            reference, confidence = padded_reference(segmenter, image)
            np.testing.assert_array_equal(mask, reference)
            assert row[CONFIDENCE] == pytest.approx(confidence, abs=1e-6)
    assert any(0.02 < low < 0.98 for low in lows), lows  # the fraction column is exercised, not constant


def test_padding_does_not_change_masks(ray_local, tmp_path, tiny_model):
    """7 images through batch 4 (one padded batch) and batch 7 (none) give identical masks."""
    write_photos(str(tmp_path / "in"), 7)
    masks = []
    for batch_size in (4, 7):
        out = tmp_path / f"out{batch_size}"
        cfg = PredictConfig(input=str(tmp_path / "in"), output=str(out), model=tiny_model, batch_size=batch_size)
        run_predict(cfg)
        masks.append({p.name: decode_mask_png(p.read_bytes()) for p in (out / "masks").glob("*.png")})
    assert len(masks[0]) == 7 and masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        np.testing.assert_array_equal(masks[0][name], masks[1][name])


def test_rerun_skips_completed_inputs_and_processes_new_ones(ray_local, tmp_path, tiny_model):
    write_photos(str(tmp_path / "in"), 5)
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
    assert run_predict(cfg).ok == 5
    storage.write_bytes(str(tmp_path / "in" / "late.jpg"), encode_jpeg(photo()))
    again = run_predict(cfg)
    assert (again.skipped, again.ok) == (5, 1)
    paths = [r[PATH] for r in read_rows(str(tmp_path / "out"))]
    assert len(paths) == len(set(paths)) == 6


def test_manifest_input(ray_local, bucket, tmp_path, tiny_model):
    uris = write_photos(f"{bucket}/photos", 3)
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(uris + [f"{bucket}/photos/missing.jpg"]) + "\n")
    summary = run_predict(config(str(manifest), str(tmp_path / "out"), tiny_model))
    assert (summary.ok, summary.failed) == (3, 1)
    assert summary.errors_by_reason == {"unreadable": 1}


def test_cli_fails_the_job_when_error_rate_exceeds_the_limit(ray_local, tmp_path, tiny_model, capsys):
    write_photos(str(tmp_path / "in"), 2)
    (tmp_path / "in" / "junk.jpg").write_bytes(b"junk")
    args = ["predict", "--input", str(tmp_path / "in"), "--model", tiny_model, "--batch-size", "2"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0  # default 1.0: never fails
    assert main([*args, "--output", str(tmp_path / "b"), "--max-error-rate", "0.2"]) == 1
    assert "1/3 inputs failed" in capsys.readouterr().err


# ---------------------------------------------------------------- names that would leave --output


def files_under(root) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def assert_inside(uris, output: str) -> None:
    escaped = [u for u in uris if not storage.is_inside(u, output) or ".." in u.replace("\\", "/").split("/")]
    assert escaped == [], f"written outside {output}: {escaped}"


ESCAPING_KEYS = ["in/../../escaped.jpg", "in/a/../../../up.jpg", "in/C:/drive.jpg", "in/x\\..\\..\\back.jpg"]


def test_s3_keys_with_dot_dot_or_drives_fail_their_row_and_nothing_lands_outside_output(
    ray_local, bucket, tmp_path, tiny_model
):
    """S3 keys are literal: `in/../../escaped.jpg` lists under `in/` and passes a prefix check."""
    write_photos(f"{bucket}/in", 2)
    for key in ESCAPING_KEYS:
        storage.write_bytes(f"{bucket}/{key}", encode_jpeg(photo()))
    inputs = set(storage.list_files(bucket))
    assert len(inputs) == 6  # the escaping keys are really there, and listed under in/

    local_out = str(tmp_path / "base" / "out")  # a local or PVC output: '..' would really climb
    s3_out = f"{bucket}/out"
    for output in (local_out, s3_out):
        summary = run_predict(config(f"{bucket}/in", output, tiny_model))
        assert (summary.ok, summary.failed) == (2, 4)
        assert summary.errors_by_reason == {"unsafe path": 4}
        rows = {r[PATH]: r for r in read_rows(output)}
        for key in ESCAPING_KEYS:
            row = rows[f"{bucket}/{key}"]
            assert row[ERROR].startswith("unsafe path:") and row[MASK_PATH] is None, row

    assert_inside(files_under(tmp_path), local_out)
    assert_inside(set(storage.list_files(bucket)) - inputs, s3_out)


def test_manifest_and_local_names_never_write_outside_output(ray_local, bucket, tmp_path, tiny_model, monkeypatch):
    """The reproduced escape: entry `../../escaped.jpg` with `--output base/out` wrote `base/escaped.jpg.png`."""
    work = tmp_path / "base" / "work"
    work.mkdir(parents=True)
    storage.write_bytes(str(tmp_path / "base" / "escaped.jpg"), encode_jpeg(photo()))
    storage.write_bytes(f"{bucket}/p/../../s3escaped.jpg", encode_jpeg(photo()))
    manifest = work / "manifest.txt"
    manifest.write_text(f"../escaped.jpg\n{bucket}/p/../../s3escaped.jpg\n")
    folder = tmp_path / "folder"
    for name in ("a\\..\\..\\..\\evil.jpg", "two..dots.jpg"):  # legal POSIX file names
        storage.write_bytes(str(folder / name), encode_jpeg(photo()))
    output = str(tmp_path / "base" / "out")
    before = files_under(tmp_path)

    monkeypatch.chdir(work)  # manifest entries are relative to the driver's folder
    summary = run_predict(config(str(manifest), output, tiny_model))
    assert (summary.ok, summary.failed, summary.errors_by_reason) == (1, 1, {"unsafe path": 1})
    rows = {r[PATH]: r for r in read_rows(output)}
    local = str(tmp_path / "base" / "escaped.jpg")  # '..' resolved, as the OS opens it
    assert rows[local][MASK_PATH] == storage.join(output, "masks", local.lstrip("/") + ".png")
    assert rows[f"{bucket}/p/../../s3escaped.jpg"][ERROR].startswith("unsafe path:")

    summary = run_predict(config(str(folder), output, tiny_model))
    assert (summary.ok, summary.failed) == (1, 1)
    rows = {r[PATH].rsplit("/", 1)[-1]: r for r in read_rows(output)}
    assert rows["a\\..\\..\\..\\evil.jpg"][ERROR].startswith("unsafe path:")
    assert rows["two..dots.jpg"][ERROR] is None  # dots inside a name are not a '..' segment

    assert_inside(files_under(tmp_path) - before, output)


@pytest.mark.parametrize(
    "relpath, reason",
    [
        ("../x.png", "'..' segment"),
        ("a/../../x.png", "'..' segment"),
        ("a\\..\\..\\x.png", "'..' segment"),
        ("/etc/x.png", "absolute"),
        ("\\\\server\\share\\x.png", "absolute"),
        ("C:/x.png", "drive"),
        ("a/d:x.png", "drive"),
    ],
)
def test_child_refuses_names_that_leave_the_root(relpath, reason):
    with pytest.raises(storage.UnsafePathError, match=reason):
        storage.child("s3://b/out", relpath)
    assert storage.child("s3://b/out", "a/two..dots/x.png") == "s3://b/out/a/two..dots/x.png"


def test_a_long_but_legal_mask_name_is_written(tmp_path):
    """The atomic write's temporary sibling was named after the file plus 42 bytes: a mask name of
    214-255 bytes (70 CJK characters and an extension) failed with ENAMETOOLONG, for good (its
    row said "write failed", and a rerun skips it)."""
    name = "图" * 80 + ".jpg.png"  # 248 bytes in UTF-8: legal, as its source image's name was
    assert len(name.encode()) <= 255
    storage.write_bytes(str(tmp_path / name), b"mask")
    assert (tmp_path / name).read_bytes() == b"mask" and os.listdir(tmp_path) == [name]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--input", "/nonexistent/photos"], "--input /nonexistent/photos: no such file"),
        (["--model", "resnet_9000"], "--model 'resnet_9000' is not"),
        (["--output", "{input}/out"], "is inside --input"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-error-rate", "2"], "--max-error-rate must be <= 1.0, got 2.0"),
        (["--image-size", "100"], "--image-size must be a multiple of 32, got 100"),
        (["--input", "{tmp}/list.parquet"], "list.parquet: not a readable manifest"),  # a JPEG so named
    ],
)
def test_bad_flags_fail_before_any_cluster_work(tmp_path, tiny_model, capsys, flags, message, monkeypatch):
    import raydeeplab.cli

    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.jpg").write_bytes(encode_jpeg(photo()))  # an empty --input fails first
    (tmp_path / "list.parquet").write_bytes(encode_jpeg(photo()))
    started = []
    monkeypatch.setattr(raydeeplab.cli, "init_ray", lambda address: started.append(address))
    base = {"--input": str(tmp_path / "in"), "--output": str(tmp_path / "out"), "--model": tiny_model}
    base.update(dict(zip(flags[::2], [v.format(input=tmp_path / "in", tmp=tmp_path) for v in flags[1::2]])))
    argv = ["predict", *[x for kv in base.items() for x in kv]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert started == []  # Ray was never started


def test_unknown_config_key_names_the_key(tmp_path):
    from raydeeplab.config import load_config

    path = tmp_path / "predict.yaml"
    path.write_text("input: a\noutput: b\nmodel: tiny\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key.*batchsize"):
        load_config(PredictConfig, str(path), {})
