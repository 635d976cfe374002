"""Test-time augmentation: the averaged views equal keras-hub's own model run on each view."""

import keras
import numpy as np
import pytest

from raydeeplab.presets import load_model
from raydeeplab.segmenter import Segmenter
from raydeeplab.tta import TestTimeAugmentation

IMAGES = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "text, flip, scales",
    [(None, False, (1.0,)), ("none", False, (1.0,)), ("flip", True, (1.0,)),
     ("scales=0.75,1,1.25", False, (0.75, 1.0, 1.25)), ("flip,scales=0.5,1", True, (0.5, 1.0))],
)  # fmt: skip
def test_settings_parse(text, flip, scales):
    tta = TestTimeAugmentation.parse(text)
    assert (tta.flip, tta.scales, tta.passes) == (flip, scales, len(scales) * (2 if flip else 1))


@pytest.mark.parametrize("text", ["flop", "flip,scales=", "scales=big", "scales=0.1,1"])
def test_bad_settings_name_the_flag(text):
    with pytest.raises(ValueError, match="--tta"):
        TestTimeAugmentation.parse(text)


def reference_probabilities(model: keras.Model, images: np.ndarray, tta: TestTimeAugmentation) -> np.ndarray:
    """keras-hub's model called on each view, built with numpy flips and Keras' Resizing layer."""
    converter = model.preprocessor.image_converter
    x = images.astype("float32") * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")
    size, views = x.shape[1], []
    for scale in tta.scales:
        side = max(32, round(size * scale / 32) * 32)
        scaled = np.asarray(keras.layers.Resizing(side, side)(x)) if side != size else x
        for flipped in (False, True) if tta.flip else (False,):
            logits = np.asarray(model(scaled[:, :, ::-1] if flipped else scaled, training=False), "float64")
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            probs = probs[:, :, ::-1] if flipped else probs
            views.append(np.asarray(keras.layers.Resizing(size, size)(probs.astype("float32"))) if side != size else probs)
    return np.mean(views, axis=0)


@pytest.mark.parametrize("text", ["flip,scales=0.5,1,1.5"])
def test_masks_and_confidence_equal_the_average_of_keras_hubs_own_views(tiny_model, text):
    model = load_model(tiny_model)
    tta = TestTimeAugmentation.parse(text)
    got = Segmenter(model, batch_size=2, tta=tta).segment(IMAGES)
    expected = reference_probabilities(model, IMAGES, tta)
    assert (got.masks == expected.argmax(-1)).mean() > 0.995  # ties at float rounding only
    np.testing.assert_allclose(got.confidence, expected.max(-1).mean(axis=(1, 2)), atol=2e-3)


def test_flip_tta_is_mirror_equivariant(tiny_model):
    """A mirrored image gets the mirrored mask: true of the average, not of one view."""
    segmenter = Segmenter(load_model(tiny_model), batch_size=4, tta=TestTimeAugmentation.parse("flip"))
    masks = segmenter.predict(IMAGES)
    mirrored = segmenter.predict(np.ascontiguousarray(IMAGES[:, :, ::-1]))
    assert (mirrored[:, :, ::-1] == masks).mean() > 0.999


def test_scales_that_meet_at_one_input_side_are_refused():
    tta = TestTimeAugmentation.parse("scales=0.75,1,1.25")
    assert tta.sides(512) == (384, 512, 640)
    with pytest.raises(ValueError, match="give inputs of 64, 64, 64 px for this 64 px model"):
        tta.sides(64)
