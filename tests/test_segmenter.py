"""Segmenter: the one pixels-to-classes function, on both Keras backends it supports on CPU."""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

from raydeeplab.data.images import resize_image
from raydeeplab.presets import create_model, load_model
from raydeeplab.segmenter import Segmenter

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
        "from raydeeplab.presets import load_model\nfrom raydeeplab.segmenter import Segmenter\n"
        "images = np.asarray(json.load(sys.stdin), np.uint8)\n"
        f"print(json.dumps(Segmenter(load_model({tiny_model!r}), 4).predict(images).tolist()))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(IMAGES.tolist()), env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    tf_masks = np.asarray(json.loads(out.stdout.strip().splitlines()[-1]), np.uint8)
    assert (tf_masks == segmenter.predict(IMAGES)).mean() > 0.999


@pytest.fixture(scope="module")
def seeded_model(tmp_path_factory) -> str:
    """A tiny preset whose random weights split a photo into two large regions (seed chosen for it)."""
    keras.utils.set_random_seed(1)
    path = str(tmp_path_factory.mktemp("models") / "seeded")
    create_model("tiny", num_classes=5, image_size=64, output=path)
    return path


@pytest.mark.parametrize("window", [(slice(None), slice(None)), (slice(100, 200), slice(150, 300))])
def test_masks_equal_keras_hubs_own_preprocessor_on_non_square_photos(seeded_model, window):
    """Geometry parity: the preset's converter stretches, as ``resize_image`` does, without antialias.

    Tolerance: >= 99% of pixels equal (measured 99.66% and 99.85%); the rest sit on class
    boundaries, where our uint8 rounding of the resized image can tip an argmax. Before the
    fix (keras-hub's default crop to aspect ratio, Pillow's antialiased resize) 56% and 79%.
    """
    import skimage.data

    photo = skimage.data.chelsea()[window]  # 300x451 and 100x150: both shrink to 64x64
    ours = Segmenter(load_model(seeded_model), batch_size=1).predict(resize_image(photo, 64)[None])[0]
    hub = keras_hub.models.ImageSegmenter.from_preset(seeded_model)
    theirs = np.argmax(hub.predict(photo[None], verbose=0), axis=-1)[0]
    assert np.sort(np.bincount(ours.ravel()))[-2] > 0.1 * ours.size  # two large regions: any shift shows
    assert (ours == theirs).mean() >= 0.99


def test_confidence_is_the_mean_top_class_softmax_of_the_models_own_output(segmenter):
    """Reference: keras-hub's forward pass (``training=False``), softmax and mean in float64 numpy;
    the pad policy's box keeps the mean pixel's padding out of the average."""
    from raydeeplab.data.images import fit_image
    from raydeeplab.segmenter import LOW_CONFIDENCE

    fitted = [fit_image(image[: 20 + 9 * i], 64, "pad") for i, image in enumerate(IMAGES)]
    images, boxes = np.stack([f[0] for f in fitted]), np.stack([f[1] for f in fitted])
    converter = segmenter.model.preprocessor.image_converter
    x = images.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    logits = np.asarray(segmenter.model(x, training=False), np.float64)
    top = (np.exp(logits - logits.max(-1, keepdims=True)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)).max(-1)
    out = segmenter.segment(images, boxes)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        inside = top[i, y0:y1, x0:x1]
        assert (y0, y1, x0, x1) == (0, 20 + 9 * i, 0, 64)  # wide images: full width, aspect kept
        assert out.confidence[i] == pytest.approx(inside.mean(), abs=1e-5)
        assert out.low_confidence_fraction[i] == pytest.approx((inside < LOW_CONFIDENCE).mean(), abs=1e-3)
    assert not np.allclose(out.confidence, top.mean(axis=(1, 2)), atol=1e-5)  # the box mattered


def test_classifier_before_upsampling_gives_keras_hubs_scores_in_less_memory(segmenter):
    """``class_scores`` reorders DeepLabV3+'s head; the scores must be keras-hub's own, and the
    full-resolution temp must shrink (JAX's compiled memory analysis)."""
    import jax

    from raydeeplab.segmenter import class_scores

    model = segmenter.model
    size = segmenter.image_size
    x = np.random.default_rng(1).uniform(-2, 2, (2, size, size, 3)).astype("float32")
    expected = np.asarray(model(x, training=False))
    got = np.asarray(class_scores(model, keras.ops.convert_to_tensor(x)))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())

    def temp_bytes(fn) -> int:
        variables = model.trainable_variables + model.non_trainable_variables

        def forward(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(x)

        state = [v.value for v in variables]

        return jax.jit(forward).lower(state, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(lambda x: class_scores(model, x)) < temp_bytes(lambda x: model(x, training=False)) / 2
