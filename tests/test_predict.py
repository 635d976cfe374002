"""Segmenter: the one pixels-to-classes function, on both Keras backends it supports on CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from raydeeplab.model import load_model
from raydeeplab.predict import Segmenter

IMAGES = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(load_model(tiny_model), batch_size=4)


def test_masks_equal_a_plain_forward_pass_with_the_presets_normalisation(segmenter):
    converter = segmenter.model.preprocessor.image_converter
    x = IMAGES.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    reference = np.argmax(np.asarray(segmenter.model(x, training=False)), axis=-1)
    masks = segmenter.predict(IMAGES)
    assert masks.dtype == np.uint8 and masks.shape == (5, 64, 64)
    assert (masks == reference).mean() > 0.999  # same math; XLA may fuse differently


def test_padding_and_batch_boundaries_do_not_change_masks(segmenter):
    whole = segmenter.predict(IMAGES)  # 4 + 1 padded to 4
    one_by_one = np.concatenate([segmenter.predict(IMAGES[i : i + 1]) for i in range(5)])
    np.testing.assert_array_equal(whole, one_by_one)


def test_wrong_inputs_are_refused_with_what_was_received(segmenter):
    with pytest.raises(ValueError, match=r"got \(2, 64, 64, 3\) float32"):
        segmenter.predict(IMAGES[:2].astype("float32"))
    assert segmenter.predict(IMAGES[:0]).shape == (0, 64, 64)


def test_tensorflow_backend_gives_the_same_masks(segmenter, tiny_model):
    script = (
        "import json, sys, numpy as np\n"
        "from raydeeplab.model import load_model\nfrom raydeeplab.predict import Segmenter\n"
        "images = np.asarray(json.load(sys.stdin), np.uint8)\n"
        f"print(json.dumps(Segmenter(load_model({tiny_model!r}), 4).predict(images).tolist()))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(IMAGES.tolist()), env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    tf_masks = np.asarray(json.loads(out.stdout.strip().splitlines()[-1]), np.uint8)
    assert (tf_masks == segmenter.predict(IMAGES)).mean() > 0.999
