import numpy as np
import pytest

from raydeeplab.data import transforms
from raydeeplab.data.images import IGNORE_LABEL, MEAN_PIXEL, resize_image, resize_mask
from raydeeplab.architectures import IMAGENET_MEAN

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
    padded = out_mask == 255  # padding: ignore in the mask, the mean pixel in the image
    assert (out_image[padded] == MEAN_PIXEL).all()


def test_random_scale_stretches_both_to_one_square():
    image, mask = marked_pair(60, 80)
    rng = np.random.default_rng(3)
    for _ in range(10):
        out_image, out_mask = transforms.random_scale(image, mask, rng, 64, 0.5, 2.0)
        side = out_mask.shape[0]
        assert out_mask.shape == (side, side) and out_image.shape == (side, side, 3)
        assert 32 <= side <= 128
        np.testing.assert_array_equal(out_image, resize_image(image, side))
        np.testing.assert_array_equal(out_mask, resize_mask(mask, side, side))
    with pytest.raises(ValueError, match="min_scale"):
        transforms.random_scale(image, mask, rng, 64, 2.0, 1.0)


def test_training_at_scale_one_sees_exactly_what_inference_sees():
    """Same aspect distortion in training and inference: VOC's 500x375 is stretched in both."""
    image, mask = marked_pair(75, 100)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(10):
        out_image, out_mask = transforms.train_transform(image, mask, 64, rng, 1.0, 1.0)
        flipped = not np.array_equal(out_image, resize_image(image, 64))
        source = transforms.random_flip(image, mask, rng, p=float(flipped))
        expected_image, expected_mask = transforms.resize_for_eval(*source, 64)
        np.testing.assert_array_equal(out_image, expected_image)
        np.testing.assert_array_equal(out_mask, expected_mask)
        seen.add(flipped)
    assert seen == {True, False}


def test_padding_is_the_mean_pixel_in_the_image_and_ignore_in_the_mask():
    assert MEAN_PIXEL == tuple(round(255 * m) for m in IMAGENET_MEAN)  # normalises to ~0
    image, mask = marked_pair(20, 30)
    out_image, out_mask = transforms.pad_and_crop(image, mask, 32, np.random.default_rng(0))
    expected_image = np.stack(
        [np.pad(image[..., c], ((0, 12), (0, 2)), constant_values=v) for c, v in enumerate(MEAN_PIXEL)], -1
    )
    np.testing.assert_array_equal(out_image, expected_image)
    np.testing.assert_array_equal(out_mask, np.pad(mask, ((0, 12), (0, 2)), constant_values=IGNORE_LABEL))


def test_pad_and_crop_crops_large_inputs_at_a_random_window():
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
