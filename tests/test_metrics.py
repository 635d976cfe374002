import math

import numpy as np
import pytest

from raydeeplab.metrics import ConfusionMatrix

IGNORE = 255


def reference_iou(truth, pred, num_classes):
    """Per-class IoU by set operations on boolean masks; None where the union is empty."""
    valid = truth != IGNORE
    out = []
    for c in range(num_classes):
        t, p = (truth == c) & valid, (pred == c) & valid
        union = (t | p).sum()
        out.append((t & p).sum() / union if union else None)
    return out


def random_pair(rng, shape, num_classes, ignore_fraction=0.1):
    truth = rng.integers(0, num_classes, shape).astype(np.uint8)
    noise = rng.integers(0, num_classes, shape)
    pred = np.where(rng.random(shape) < 0.6, truth, noise).astype(np.uint8)
    truth[rng.random(shape) < ignore_fraction] = IGNORE
    return truth, pred


def test_matches_set_operations_with_ignore_pixels():
    rng = np.random.default_rng(0)
    truth, pred = random_pair(rng, (4, 37, 53), 6)
    cm = ConfusionMatrix(6)
    cm.update(truth, pred)
    scores = cm.compute()
    expected = reference_iou(truth, pred, 6)
    assert scores["per_class_iou"] == pytest.approx(expected)
    assert scores["mean_iou"] == pytest.approx(np.mean(expected))
    valid = truth != IGNORE
    assert scores["pixels"] == valid.sum()
    assert scores["pixel_accuracy"] == pytest.approx((truth == pred)[valid].mean())
    recalls = [((truth == c) & (pred == c)).sum() / (truth == c).sum() for c in range(6)]
    assert scores["mean_accuracy"] == pytest.approx(np.mean(recalls))
    assert cm.matrix.dtype == np.int64 and cm.matrix.shape == (6, 6)
    assert cm.matrix[2].sum() == (truth == 2).sum()  # rows are truth


def test_classes_never_seen_nor_predicted_are_left_out_of_the_mean():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 3]], np.uint8)  # 3 only under an ignore pixel
    cm = ConfusionMatrix(4)
    cm.update(truth, pred)
    scores = cm.compute()
    assert scores["per_class_iou"] == pytest.approx([3 / 4, 3 / 4, None, None])
    assert scores["mean_iou"] == pytest.approx(3 / 4)


def test_predicted_but_absent_class_counts_as_zero():
    truth = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 2]], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(truth, pred)
    assert cm.compute()["per_class_iou"] == pytest.approx([3 / 4, None, 0.0])
    assert cm.compute()["mean_iou"] == pytest.approx(3 / 8)


def test_summed_batch_matrices_equal_the_whole():
    """Evaluation and training sum per-batch counts: exact, whatever the split into batches."""
    rng = np.random.default_rng(1)
    truth, pred = random_pair(rng, (8, 32, 32), 5)
    whole = ConfusionMatrix(5)
    whole.update(truth, pred)
    halves = [ConfusionMatrix(5), ConfusionMatrix(5)]
    halves[0].update(truth[:3], pred[:3])
    halves[1].update(truth[3:], pred[3:])
    summed = ConfusionMatrix.from_matrix(halves[0].matrix + halves[1].matrix)
    np.testing.assert_array_equal(summed.matrix, whole.matrix)
    assert summed.compute() == whole.compute()


def test_empty_matrix_gives_nan_not_an_error():
    scores = ConfusionMatrix(3).compute()
    assert math.isnan(scores["mean_iou"]) and math.isnan(scores["pixel_accuracy"])
    assert scores["per_class_iou"] == [None, None, None]


def test_bad_inputs_name_the_value():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="truth has class value 7"):
        cm.update(np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"square \(n, n\) matrix, got shape \(3, 4\)"):
        ConfusionMatrix.from_matrix(np.zeros((3, 4)))
