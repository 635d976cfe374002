"""`evaluate` on Ray, both protocols, against plain numpy (VOC) and Keras' own MeanIoU (guide)."""

import keras
import numpy as np
import pytest

from raydeeplab.config import ConfigError, EvaluateConfig
from raydeeplab.data import synthetic, voc
from raydeeplab.data.examples import load_example
from raydeeplab.data.images import resize_image, resize_mask
from raydeeplab.evaluate import run_evaluate
from raydeeplab.presets import load_model
from raydeeplab.segmenter import Segmenter
from tests.padding import padded_reference

CLASSES, SIZE = 5, 64


def numpy_confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Rows truth, columns prediction; truth values >= CLASSES (255) are not counted."""
    valid = truth < CLASSES
    return np.bincount(CLASSES * truth[valid].astype(int) + pred[valid], minlength=CLASSES**2).reshape(CLASSES, CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model):
    """A VOC-layout split with 255 borders at 50x70, and each image's mask as the model predicts it."""
    data = str(tmp_path_factory.mktemp("voc"))
    synthetic.make_shapes_dataset(data, 20, size=(50, 70), num_classes=CLASSES, layout="voc")
    segmenter = Segmenter(load_model(tiny_model), batch_size=4)
    examples = [load_example(p["image_uri"], p["mask_uri"]) for p in voc.voc_pairs(data, "val")]
    predicted = segmenter.predict(np.stack([resize_image(image, SIZE) for image, _ in examples]))
    return data, [truth for _, truth in examples], predicted


def test_voc_protocol_ignores_255_at_the_source_size(ray_local, tmp_path, tiny_model, dataset):
    data, truths, predicted = dataset
    out = tmp_path / "eval"
    scores = run_evaluate(EvaluateConfig(data=data, model=tiny_model, batch_size=4, output=str(out), gallery=2))

    assert any((t == 255).any() for t in truths)  # the protocols differ on these pixels
    matrix = sum(numpy_confusion(t, resize_mask(p, *t.shape)) for t, p in zip(truths, predicted))
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    seen = union > 0
    assert scores["images"] == 5 and scores["protocol"] == "voc"
    assert scores["pixels"] == sum(int((t != 255).sum()) for t in truths)  # labelled source pixels, once
    assert scores["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    assert scores["mean_iou"] == pytest.approx(np.mean(np.diag(matrix)[seen] / union[seen]), abs=1e-6)
    assert (out / "eval_val.json").exists() and (out / "gallery.png").exists()


def test_guide_protocol_counts_255_as_background_at_the_model_size(ray_local, tmp_path, tiny_model, dataset):
    """The guide's definition: masks resized by keras' Resizing, 255 -> 0, keras.metrics.MeanIoU."""
    data, truths, predicted = dataset
    scores = run_evaluate(EvaluateConfig(data=data, model=tiny_model, batch_size=4, protocol="guide", output=str(tmp_path)))

    resizing = keras.layers.Resizing(SIZE, SIZE, interpolation="nearest", crop_to_aspect_ratio=False)
    guide_truth = np.stack([np.asarray(resizing(t[None, :, :, None].astype("float32")))[0, :, :, 0] for t in truths])
    guide_truth = np.where(guide_truth == 255, 0, guide_truth).astype("int32")
    mean_iou = keras.metrics.MeanIoU(num_classes=CLASSES)
    mean_iou.update_state(guide_truth, predicted)
    assert scores["protocol"] == "guide" and scores["pixels"] == 5 * SIZE * SIZE  # every pixel counts
    assert scores["pixel_accuracy"] == pytest.approx((guide_truth == predicted).mean(), abs=1e-6)
    assert scores["mean_iou"] == pytest.approx(float(mean_iou.result()), abs=1e-6)
    assert (tmp_path / "eval_val_guide.json").exists()  # beside the VOC protocol's eval_val.json


def test_pad_policy_scores_numpys_own_pad_cropped_back(ray_local, tiny_model, dataset):
    """``--resize pad`` on 50x70 images: the counts are those of the Segmenter on numpy's own pad
    of each image, its mask cropped back to the source (tests/padding.py)."""
    data, truths, stretched = dataset
    segmenter = Segmenter(load_model(tiny_model), batch_size=1)
    images = [image for image, _ in (load_example(p["image_uri"], p["mask_uri"]) for p in voc.voc_pairs(data, "val"))]
    padded = [padded_reference(segmenter, image)[0] for image in images]
    assert any((p != resize_mask(s, *p.shape)).any() for p, s in zip(padded, stretched))  # the policies differ

    scores = run_evaluate(EvaluateConfig(data=data, model=tiny_model, batch_size=4, resize="pad"))
    matrix = sum(numpy_confusion(t, p) for t, p in zip(truths, padded))
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    seen = union > 0
    assert scores["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    assert scores["mean_iou"] == pytest.approx(np.mean(np.diag(matrix)[seen] / union[seen]), abs=1e-6)


def test_protocol_flag_is_parsed_and_an_unknown_one_refused_before_ray_starts():
    from raydeeplab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["evaluate", "--data", "d", "--model", "tiny", "--protocol", "guide"])
    assert config_from_args(EvaluateConfig, args).protocol == "guide"
    with pytest.raises(ConfigError, match="--protocol must be one of voc, guide, got 'coco'"):
        EvaluateConfig(data="d", model="tiny", protocol="coco")
