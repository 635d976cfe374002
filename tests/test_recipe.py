"""The training recipe against what keras-hub and Keras compute themselves."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np

from raydeeplab import recipe
from raydeeplab.config import TrainConfig
from raydeeplab.architectures import TINY_RESNET, build_resnet, deeplab_v3_plus
from raydeeplab.presets import save_model


def softmax_segmenter(num_classes: int = 3):
    """A segmenter with a softmax head, as the Keras guide builds it."""
    plain = deeplab_v3_plus(build_resnet(TINY_RESNET), num_classes, image_size=64)
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=plain.backbone, num_classes=num_classes, preprocessor=plain.preprocessor, activation="softmax"
    )


def test_a_softmax_headed_preset_trains_on_its_logits_not_on_probabilities(tmp_path):
    guide = softmax_segmenter()
    guide.save_to_preset(str(tmp_path / "guide"))
    cfg = TrainConfig(data="d", output="o", model=str(tmp_path / "guide"), num_classes=3, image_size=64)
    segmenter = recipe.initial_segmenter(cfg)

    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    probabilities = np.asarray(guide(x, training=False))
    logits = np.asarray(segmenter(x, training=False))
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(exp / exp.sum(-1, keepdims=True), probabilities, atol=1e-5)
    # The recipe's from-logits loss on these logits is Keras' own loss on the guide's probabilities.
    truth = np.random.default_rng(1).integers(0, 3, (2, 64, 64))
    ours = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(truth, logits)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=False)(truth, probabilities)
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-4)


def test_saved_presets_stretch_like_our_decoder_whatever_the_source_preset_did(tmp_path):
    """keras-hub's default converter crops to the aspect ratio; our checkpoints must not."""
    guide = softmax_segmenter()
    cropping = keras_hub.layers.DeepLabV3ImageConverter(image_size=(64, 64), crop_to_aspect_ratio=True)
    guide.preprocessor.image_converter = cropping
    save_model(guide, str(tmp_path / "saved"))
    loaded = keras_hub.models.ImageSegmenter.from_preset(str(tmp_path / "saved"))
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 96, 3)).astype("float32")
    # keras-hub's own preprocessor, on a 1:3 image: a stretch keeps the left and right edges.
    converted = np.asarray(loaded.preprocessor.image_converter(image))
    stretched = np.asarray(keras.layers.Resizing(64, 64, crop_to_aspect_ratio=False)(image))
    cropped = np.asarray(keras.layers.Resizing(64, 64, crop_to_aspect_ratio=True)(image))
    np.testing.assert_allclose(converted, stretched, atol=1e-3)
    assert np.abs(converted - cropped).max() > 10
