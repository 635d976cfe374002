"""Loading and checking examples (raydeeplab/data/examples.py): every bad file named, locally and on S3."""

import numpy as np
import pytest

from raydeeplab import storage
from raydeeplab.data import synthetic
from raydeeplab.data.examples import load_example, validate_pairs
from raydeeplab.data.images import encode_mask_png
from raydeeplab.data.voc import DatasetError, voc_pairs
from tests import test_voc
from tests.test_voc import SIZE

root = test_voc.root  # the same dataset roots: a local folder, then an S3 prefix


def remove(uri):
    fs, path = storage.filesystem(uri)
    fs.rm(path)


def test_validation_lists_every_bad_file_by_name(root):
    synthetic.make_shapes_dataset(root, 8, size=SIZE, layout="voc")
    pairs = voc_pairs(root, "trainval")
    small, wrong_class, missing = pairs[1], pairs[2], pairs[4]
    storage.write_bytes(small["mask_uri"], encode_mask_png(np.zeros((10, 12), np.uint8)))
    too_large = np.zeros(SIZE, np.uint8)
    too_large[:5, :5] = 37
    storage.write_bytes(wrong_class["mask_uri"], encode_mask_png(too_large))
    remove(missing["image_uri"])

    with pytest.raises(DatasetError) as err:
        validate_pairs(pairs, num_classes=21)
    message = str(err.value)
    assert message.startswith("3 of 8 examples checked cannot be used")
    assert f"{small['mask_uri']}: mask size 12x10 != image size 64x48" in message
    assert f"{wrong_class['mask_uri']}: class value 37 >= --num-classes 21" in message
    assert f"{missing['image_uri']}: file not found" in message

    assert validate_pairs(pairs, num_classes=21, check_limit=1) == 1  # the first pair is fine
    two_bad = np.zeros(SIZE, np.uint8)
    two_bad[0, :2] = (9, 5)
    storage.write_bytes(pairs[3]["mask_uri"], encode_mask_png(two_bad))
    with pytest.raises(DatasetError, match="class values 5, 9 >= --num-classes 4"):
        validate_pairs(pairs[3:4], num_classes=4)
    with pytest.raises(DatasetError, match=small["mask_uri"].replace("\\", "\\\\")):
        load_example(**small)


def test_a_mask_of_an_exif_rotated_photo_drawn_on_its_stored_pixels_is_told_why_it_does_not_fit(tmp_path):
    """Photos are read upright (EXIF applied), masks as stored: a mask drawn on the stored,
    sideways pixels has the image's size turned, and the error says why."""
    from tests.corpus import exif_rotated_jpeg

    storage.write_bytes(str(tmp_path / "a.jpg"), exif_rotated_jpeg())  # stored 60 x 40, upright 40 x 60
    storage.write_bytes(str(tmp_path / "sideways.png"), encode_mask_png(np.zeros((40, 60), np.uint8)))
    storage.write_bytes(str(tmp_path / "upright.png"), encode_mask_png(np.zeros((60, 40), np.uint8)))
    image, mask = load_example(str(tmp_path / "a.jpg"), str(tmp_path / "upright.png"))
    assert image.shape[:2] == mask.shape == (60, 40)
    with pytest.raises(DatasetError, match="mask size 60x40 != image size 40x60 .*EXIF orientation applied"):
        load_example(str(tmp_path / "a.jpg"), str(tmp_path / "sideways.png"))
