import numpy as np
import pytest

from raydeeplab.data import transforms
from raydeeplab.data.images import resize_image

RED = (255, 0, 0)


def marked_pair(height=60, width=80):
    """Gray image with a red block, mask 1 under the block, 2 in a stripe, 0 elsewhere."""
    image = np.full((height, width, 3), 128, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[5:25, 4:24] = RED  # top-left: a flip must move it right in both
    mask[5:25, 4:24] = 1
    mask[40:, :] = 2
    return image, mask


def red(image):
    return (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)


def test_flip_moves_image_and_mask_together():
    image, mask = marked_pair()
    rng = np.random.default_rng(0)
    flipped_image, flipped_mask = transforms.random_flip(image, mask, rng, p=1.0)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    np.testing.assert_array_equal(red(flipped_image), flipped_mask == 1)
    same = transforms.random_flip(image, mask, np.random.default_rng(0), p=0.0)
    assert same[0] is image and same[1] is mask


@pytest.mark.parametrize("seed", range(20))
def test_train_transform_keeps_image_and_mask_aligned(seed):
    image, mask = marked_pair()
    out_image, out_mask = transforms.train_transform(image, mask, 64, np.random.default_rng(seed))
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.uint8
    assert out_mask.shape == (64, 64) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1, 2, 255}
    marker = out_mask == 1
    if marker.sum() > 20:  # the crop may miss the block; where it does not, red sits on class 1
        overlap = (red(out_image) & marker).sum() / (red(out_image) | marker).sum()
        assert overlap > 0.85  # bilinear vs nearest differ only on the block's edge
    padded = out_mask == 255  # padding: ignore in the mask, black in the image
    assert (out_image[padded] == 0).all()


def test_random_scale_resizes_both_by_one_factor():
    image, mask = marked_pair(60, 80)
    rng = np.random.default_rng(3)
    for _ in range(10):
        out_image, out_mask = transforms.random_scale(image, mask, rng, 0.5, 2.0)
        h, w = out_mask.shape
        assert out_image.shape == (h, w, 3)
        assert 30 <= h <= 120 and 40 <= w <= 160
        assert abs(h / 60 - w / 80) < 0.03
        assert set(np.unique(out_mask)) <= {0, 1, 2}  # nearest: no invented classes
    with pytest.raises(ValueError, match="min_scale"):
        transforms.random_scale(image, mask, rng, 2.0, 1.0)


def test_pad_and_crop_pads_small_and_crops_large():
    image, mask = marked_pair(20, 30)
    out_image, out_mask = transforms.pad_and_crop(image, mask, 32, np.random.default_rng(0))
    assert out_mask.shape == (32, 32)
    np.testing.assert_array_equal(out_mask[20:], 255)
    np.testing.assert_array_equal(out_image[20:], 0)
    np.testing.assert_array_equal(out_mask[:20, :30], mask)

    rows, cols = np.mgrid[0:50, 0:70]
    coords = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    labels = (rows % 3).astype(np.uint8)
    crop_image, crop_mask = transforms.pad_and_crop(coords, labels, 32, np.random.default_rng(5))
    top, left = int(crop_image[0, 0, 0]), int(crop_image[0, 0, 1])
    np.testing.assert_array_equal(crop_image, coords[top : top + 32, left : left + 32])
    np.testing.assert_array_equal(crop_mask, labels[top : top + 32, left : left + 32])


def test_resize_for_eval_is_deterministic_and_matches_predict():
    image, mask = marked_pair(60, 80)
    out_image, out_mask = transforms.resize_for_eval(image, mask, 64)
    np.testing.assert_array_equal(out_image, resize_image(image, 64))
    assert out_mask.shape == (64, 64) and set(np.unique(out_mask)) <= {0, 1, 2}
    again = transforms.resize_for_eval(image, mask, 64)
    np.testing.assert_array_equal(again[1], out_mask)


def test_mismatched_pair_is_refused_with_shapes():
    image, mask = marked_pair(60, 80)
    with pytest.raises(ValueError, match=r"\(60, 80, 3\) and \(60, 79\)"):
        transforms.train_transform(image, mask[:, :-1], 32, np.random.default_rng(0))
