"""``raydeeplab model export``: the ONNX model run by ONNX Runtime and the SavedModel loaded by
TensorFlow, with nothing of ours, give the masks and confidence ``Segmenter`` gives on the same
JPEG photos.

Tolerance: the class maps agree on >= 99.9% of pixels, and where they differ the exported class
is a tie with the top class at float rounding (its probability, by keras-hub's own forward pass
and numpy's softmax, within 1e-4 of the top one); confidence within 1e-5. Measured: identical.
Two exports through the CLI (about a minute each on 2 cores: TensorFlow and tf2onnx start in
child processes).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydeeplab import storage
from raydeeplab.data.images import decode_image, fit_image
from raydeeplab.presets import load_model
from raydeeplab.segmenter import Segmenter
from tests.test_cli import SCRIPT, raydeeplab, succeeded

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # scikit-image's; camera is grey
TIE = 1e-4  # probability gap below which two classes are a tie at float rounding


@pytest.fixture(scope="module")
def photos(tiny_model) -> np.ndarray:
    """(5, 64, 64, 3) uint8: real photos through JPEG bytes, decoded and resized as predict does."""
    import skimage.data

    size = load_model(tiny_model).preprocessor.image_converter.image_size[0]
    jpegs = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return np.stack([fit_image(decode_image(data), size)[0] for data in jpegs])


@pytest.fixture(scope="module")
def reference(tiny_model, photos):
    """Segmenter's masks and confidence, and keras-hub's own class probabilities (numpy softmax)."""
    segmenter = Segmenter(load_model(tiny_model), batch_size=4)
    converter = segmenter.model.preprocessor.image_converter
    x = photos.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    logits = np.asarray(segmenter.model(x, training=False), "float64")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return segmenter.segment(photos), probs / probs.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, moto_s3) -> Path:
    """From a temp cwd: ``onnx/`` from a relative preset folder (dynamic batch), and ``saved_model/``
    exported from an s3:// preset to s3:// with ``--batch-size 5``, then downloaded."""
    cwd = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_model, cwd / "tiny5")
    bucket = "s3://exports"
    storage.filesystem(bucket)[0].mkdir("exports")
    storage.upload_dir(tiny_model, f"{bucket}/presets/tiny5")
    out = succeeded(raydeeplab(cwd, "model", "export", "--model", "tiny5", "--format", "onnx", "--output", "onnx"))
    assert "wrote" in out[-1] and (cwd / "onnx/model.onnx").is_file(), out
    succeeded(raydeeplab(cwd, "model", "export", "--model", f"{bucket}/presets/tiny5", "--format", "saved_model",
                         "--output", f"{bucket}/saved_model", "--batch-size", "5"))  # fmt: skip
    storage.download_dir(f"{bucket}/saved_model", str(cwd / "saved_model"))
    return cwd


def assert_same_masks(masks: np.ndarray, expected: np.ndarray, probs: np.ndarray) -> None:
    differ = masks != expected
    assert masks.dtype == np.uint8 and masks.shape == expected.shape
    assert differ.mean() <= 0.001, differ.mean()
    given = np.take_along_axis(probs, masks[..., None].astype(int), axis=-1)[..., 0]
    assert np.all(probs.max(-1)[differ] - given[differ] < TIE)


def test_onnx_runtime_gives_segmenters_masks_and_confidence_at_any_batch(exported, photos, reference):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported / "onnx/model.onnx"), providers=["CPUExecutionProvider"])
    [spec] = session.get_inputs()
    assert (spec.name, spec.type, spec.shape[1:]) == ("images", "tensor(uint8)", [64, 64, 3])
    names = [o.name for o in session.get_outputs()]
    prediction, probs = reference
    for rows in (slice(0, 5), slice(2, 3)):  # 5 images, then 1: the batch dimension is free
        outputs = dict(zip(names, session.run(None, {"images": photos[rows]})))
        assert_same_masks(outputs["masks"], prediction.masks[rows], probs[rows])
        np.testing.assert_allclose(outputs["confidence"], prediction.confidence[rows], atol=1e-5)
        np.testing.assert_allclose(outputs["low_confidence_fraction"], prediction.low_confidence_fraction[rows], atol=1e-5)
    sidecar = json.loads((exported / "onnx/raydeeplab.json").read_text())
    assert (sidecar["image_size"], len(sidecar["class_names"]), sidecar["file"]) == (64, 5, "model.onnx")


@pytest.mark.large  # an end-to-end repeat of what a default test covers; CI time (pytest -m large)
def test_tensorflow_loads_the_saved_model_with_segmenters_masks(exported, photos, reference):
    import tensorflow as tf

    serve = tf.saved_model.load(str(exported / "saved_model")).signatures["serving_default"]
    assert serve.structured_input_signature[1]["images"].shape.as_list() == [5, 64, 64, 3]  # --batch-size 5
    outputs = {k: v.numpy() for k, v in serve(images=tf.constant(photos)).items()}
    prediction, probs = reference
    assert_same_masks(outputs["masks"], prediction.masks, probs)
    np.testing.assert_allclose(outputs["confidence"], prediction.confidence, atol=1e-5)


def test_an_unknown_format_is_refused_naming_the_choices(tmp_path):
    run = subprocess.run([SCRIPT, "model", "export", "--model", "tiny", "--format", "tflite", "--output", "out"],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2
    assert "--format: invalid choice: 'tflite' (choose from 'saved_model', 'onnx')" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()
