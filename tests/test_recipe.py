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
    segmenter = recipe.initial_model(cfg)

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


def test_validation_counts_are_numpys_and_scored_by_the_one_confusion_matrix():
    """The Keras metric hands back counts only; the score is metrics.ConfusionMatrix's."""
    from raydeeplab.metrics import ConfusionMatrix

    cfg = TrainConfig(data="d", output="o", model="tiny", num_classes=3, image_size=64, batch_size=2)
    trainable = recipe.trainable_model(recipe.initial_model(cfg))
    metric = recipe.compile_for_training(trainable, cfg, total_steps=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (2, 64, 64), dtype=np.uint8)
    masks[:, :8] = 255  # ignored: VOC borders, padding

    logs = trainable.test_on_batch(images, masks, return_dict=True)
    pred = np.argmax(np.asarray(trainable.predict_on_batch(images)), axis=-1)
    valid = masks != 255
    expected = np.bincount(3 * masks[valid].astype(int) + pred[valid], minlength=9).reshape(3, 3)
    np.testing.assert_array_equal(recipe.confusion_matrix(metric), expected)
    np.testing.assert_array_equal(np.asarray(logs["confusion"]), expected)
    scores = ConfusionMatrix.from_matrix(recipe.confusion_matrix(metric)).compute()
    reference = ConfusionMatrix(3)
    reference.update(masks, pred)
    assert scores == reference.compute()


def test_validation_loads_one_batch_ahead_and_covers_every_example_once(monkeypatch):
    """``pool.map`` over a worker's whole share decoded all of it before the first batch (VOC val
    on one worker at 512 px: 1.4 GiB held every epoch); now the next batch loads while this one
    is used. Every example still comes once, in order, then the all-ignore padding."""
    from raydeeplab.data import examples, voc

    loaded = []

    def load(image_uri, mask_uri, num_classes):
        loaded.append(image_uri)
        index = int(image_uri.split("-")[1])
        return np.full((8, 8, 3), index, np.uint8), np.full((8, 8), index % num_classes, np.uint8)

    monkeypatch.setattr(examples, "load_training_example", load)
    pairs = [{voc.IMAGE_URI: f"img-{i}", voc.MASK_URI: f"mask-{i}"} for i in range(50)] + [None]
    batches = recipe.val_batches(pairs, size=8, batch=4, num_classes=3)
    first = next(batches)
    assert len(loaded) <= 2 * 4, f"{len(loaded)} examples loaded for a batch of 4"
    images = np.concatenate([first[0], *(b[0] for b in batches)])
    assert images.shape[0] == 52  # 50 examples, the None, one more row of padding
    np.testing.assert_array_equal(images[:50, 0, 0, 0], np.arange(50))
    assert sorted(loaded) == sorted(f"img-{i}" for i in range(50))
