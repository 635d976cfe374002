"""`evaluate` on Ray against a plain-numpy reference at the source resolution."""

import numpy as np
import pytest

from raydeeplab.data import synthetic, voc
from raydeeplab.data.images import resize_image, resize_mask
from raydeeplab.evaluate import EvaluateConfig, run_evaluate
from raydeeplab.model import load_model
from raydeeplab.predict import Segmenter


def test_evaluate_matches_an_independent_computation(ray_local, tmp_path, tiny_model):
    data = str(tmp_path / "voc")
    synthetic.make_shapes_dataset(data, 20, size=(50, 70), num_classes=5, layout="voc")
    scores = run_evaluate(EvaluateConfig(data=data, model=tiny_model, batch_size=4, output=str(tmp_path / "eval"), gallery=2))

    segmenter = Segmenter(load_model(tiny_model), batch_size=4)
    intersection, union = np.zeros(5), np.zeros(5)
    correct = counted = 0
    for pair in voc.voc_pairs(data, "val"):
        image, truth = voc.load_example(pair["image_uri"], pair["mask_uri"])
        pred = resize_mask(segmenter.predict(resize_image(image, 64)[None])[0], *truth.shape)
        valid = truth != 255
        correct += np.sum((pred == truth) & valid)
        counted += valid.sum()
        for c in range(5):
            intersection[c] += np.sum((pred == c) & (truth == c) & valid)
            union[c] += np.sum(((pred == c) | (truth == c)) & valid)
    seen = union > 0
    assert scores["images"] == 5
    assert scores["pixels"] == counted  # every labelled source pixel, once
    assert scores["pixel_accuracy"] == pytest.approx(correct / counted, abs=1e-3)
    assert scores["mean_iou"] == pytest.approx(np.mean(intersection[seen] / union[seen]), abs=1e-3)
    assert (tmp_path / "eval" / "eval_val.json").exists() and (tmp_path / "eval" / "gallery.png").exists()
