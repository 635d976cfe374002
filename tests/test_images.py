import numpy as np
import pytest

from raydeeplab.data import images
from tests.corpus import BOMB_LIMIT, corpus, photo


@pytest.mark.parametrize("name", sorted(corpus()))
def test_every_corpus_file_decodes_or_fails_with_its_reason(name):
    data, expected = corpus()[name]
    if isinstance(expected, str):
        with pytest.raises(images.ImageError, match=f"^{expected}"):
            images.decode_image(data, max_pixels=BOMB_LIMIT)
        return
    decoded = images.decode_image(data, max_pixels=BOMB_LIMIT)
    assert decoded.shape == (*expected, 3) and decoded.dtype == np.uint8


def test_exif_rotation_moves_pixels_not_just_the_shape():
    data, _ = corpus()["rotated.jpg"]
    decoded = images.decode_image(data).astype(int)
    expected = np.rot90(photo(40, 60), k=-1).astype(int)  # orientation 6 = 90 degrees clockwise
    assert np.abs(decoded - expected).mean() < 12  # JPEG noise only


def test_sixteen_bit_keeps_its_range():
    data, _ = corpus()["gray16.png"]
    decoded = images.decode_image(data)
    assert decoded.max() > 200 and decoded.min() < 10  # rescaled, not clipped to white


def test_pixel_limit_is_configurable():
    data, _ = corpus()["bomb.png"]
    assert images.decode_image(data, max_pixels=30_000_000).shape == (5000, 5000, 3)


def test_mask_png_round_trip_keeps_class_values_and_palette():
    mask = np.random.default_rng(0).integers(0, 21, (33, 47)).astype(np.uint8)
    mask[0, 0] = images.IGNORE_LABEL
    data = images.encode_mask_png(mask)
    from PIL import Image
    import io

    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P"
    assert opened.getpalette()[3:6] == [128, 0, 0]  # class 1 is VOC's aeroplane red
    np.testing.assert_array_equal(images.decode_mask_png(data), mask)


def test_resize_mask_never_invents_classes():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 7
    resized = images.resize_mask(mask, 37, 23)
    assert resized.shape == (37, 23) and set(np.unique(resized)) == {0, 7}


@pytest.mark.parametrize(
    "height, width, size",
    [(100, 150, 64), (375, 500, 512), (900, 600, 128), (7, 5, 64), (1500, 2000, 256), (60, 900, 128), (900, 60, 128)],
)
def test_resize_matches_keras_resizing_that_keras_hub_preprocessors_use(height, width, size):
    """Enlarging and shrinking (where Pillow's antialiasing would differ by up to ~130 levels), by more
    than 2x on both axes or one (where ``resize_image`` picks taps first and changes the pass order)."""
    import keras

    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (height, width), dtype=np.uint8)
    bilinear = keras.layers.Resizing(size, size, crop_to_aspect_ratio=False)
    nearest = keras.layers.Resizing(size, size, interpolation="nearest", crop_to_aspect_ratio=False)
    reference = np.asarray(bilinear(image[None].astype("float32")))[0]
    assert np.abs(images.resize_image(image, size) - reference).max() <= 0.501  # uint8 rounding only
    reference_mask = np.asarray(nearest(mask[None, :, :, None].astype("float32")))[0, :, :, 0]
    np.testing.assert_array_equal(images.resize_mask(mask, size, size), reference_mask)
