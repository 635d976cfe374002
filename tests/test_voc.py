import io
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydeeplab import storage
from raydeeplab.data import synthetic
from raydeeplab.data.examples import load_example, validate_pairs
from raydeeplab.data.voc import DatasetError, generic_pairs, sbd_pairs, train_aug_pairs, voc_pairs

SIZE = (48, 64)  # (height, width): small keeps the S3 round trips cheap


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh, empty dataset root: a local folder, then an S3 prefix."""
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('bucket')}/{uuid.uuid4().hex[:8]}"


def ids(pairs):
    return [os.path.splitext(p["image_uri"].replace("\\", "/").rsplit("/", 1)[1])[0] for p in pairs]


def test_voc_reader_lists_split_and_loads_palette_masks(root):
    splits = synthetic.make_shapes_dataset(root, 8, size=SIZE, layout="voc")
    pairs = voc_pairs(root, "train")
    assert ids(pairs) == splits["train"] and len(pairs) == 6
    assert pairs[0]["mask_uri"] == storage.join(root, "SegmentationClass", "img_000000.png")
    image, mask = load_example(**pairs[0])
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == SIZE and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 255} and 255 in mask  # VOC-style borders
    assert ids(voc_pairs(root, "val")) == splits["val"]
    assert validate_pairs(pairs, num_classes=4) == 6


def test_sbd_reader_loads_mat_masks(root):
    splits = synthetic.make_shapes_dataset(root, 8, size=SIZE, layout="sbd")
    pairs = sbd_pairs(root, "val")
    assert ids(pairs) == splits["val"]
    assert pairs[0]["mask_uri"].endswith("/dataset/cls/img_000003.mat")
    image, mask = load_example(**pairs[0])
    assert mask.shape == image.shape[:2] == SIZE and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and mask.max() > 0
    assert validate_pairs(sbd_pairs(root, "train"), num_classes=4) == 6


def test_train_aug_is_voc_train_plus_sbd_minus_voc_val(root):
    voc_root, sbd_root = storage.join(root, "voc"), storage.join(root, "sbd")
    voc = synthetic.make_shapes_dataset(voc_root, 8, size=SIZE, layout="voc")  # ids 0-7
    sbd = synthetic.make_shapes_dataset(sbd_root, 12, size=SIZE, layout="sbd", first_index=4)
    pairs = train_aug_pairs(voc_root, sbd_root)
    expected = sorted(set(voc["train"]) | set(sbd["train"] + sbd["val"]) - set(voc["val"]))
    assert ids(pairs) == expected
    assert "img_000007" not in ids(pairs)  # in SBD val but also VOC val: held out
    by_id = dict(zip(ids(pairs), pairs))
    assert by_id["img_000004"]["mask_uri"].endswith(".png")  # in both: VOC's mask wins
    assert by_id["img_000008"]["mask_uri"].endswith(".mat")
    # the two copies of an id are the same picture; VOC only adds ignore borders
    voc_image, voc_mask = load_example(**by_id["img_000004"])
    sbd_image, sbd_mask = load_example(**sbd_pairs(sbd_root, "train")[0])
    np.testing.assert_array_equal(voc_image, sbd_image)
    keep = voc_mask != 255
    np.testing.assert_array_equal(voc_mask[keep], sbd_mask[keep])


def test_generic_folders_and_manifests_list_the_same_pairs(root):
    synthetic.make_shapes_dataset(root, 4, size=SIZE, layout="generic")
    pairs = generic_pairs(root)
    assert ids(pairs) == [f"img_{i:06d}" for i in range(4)]
    assert pairs[1]["mask_uri"] == storage.join(root, "masks", "img_000001.png")
    assert validate_pairs(pairs, num_classes=4) == 4

    relative = [(f"images/{i}.jpg", f"masks/{i}.png") for i in ids(pairs)]
    csv_text = "image,mask\n" + "".join(f"{a},{b}\n" for a, b in relative)
    storage.write_bytes(storage.join(root, "list.csv"), csv_text.encode())
    text = "".join(f"{a} {b}\n" for a, b in relative)
    storage.write_bytes(storage.join(root, "list.txt"), text.encode())
    images, masks = [p["image_uri"] for p in pairs], [p["mask_uri"] for p in pairs]
    table = pa.table({"image": images, "mask": masks})  # absolute URIs this time
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(root, "list.parquet"), buffer.getvalue())
    for name in ("list.csv", "list.txt", "list.parquet"):
        assert generic_pairs(storage.join(root, name)) == pairs, name

    storage.write_bytes(storage.join(root, "bad.csv"), b"path,label\na.jpg,a.png\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: no column image, mask \(its header: 'path', 'label'\)"):
        generic_pairs(storage.join(root, "bad.csv"))


def test_missing_split_file_names_it(root):
    synthetic.make_shapes_dataset(root, 4, size=SIZE, layout="voc")
    split_uri = storage.join(root, "ImageSets", "Segmentation", "trian.txt")
    with pytest.raises(DatasetError, match="split file not found") as err:
        voc_pairs(root, "trian")
    assert str(err.value).startswith(split_uri)
    with pytest.raises(DatasetError, match="dataset.trainval.txt: split file not found"):
        sbd_pairs(root, "trainval")
    with pytest.raises(DatasetError, match="no images"):
        generic_pairs(root)  # a VOC folder has no images/ subfolder


def test_class_colours_are_what_a_model_can_learn(tmp_path):
    synthetic.make_shapes_dataset(str(tmp_path), 8, size=(96, 128), num_classes=4, layout="generic")
    colours = synthetic.class_colours(4).astype(float)
    for example in generic_pairs(str(tmp_path)):
        image, mask = load_example(**example)
        for k in np.unique(mask[mask > 0]):
            inside = mask == k
            # away from the edges, which JPEG blurs
            inside[1:-1, 1:-1] &= inside[:-2, 1:-1] & inside[2:, 1:-1]
            mean = image[inside].astype(float).mean(axis=0)
            nearest = np.argmin(np.abs(colours[1:] - mean).sum(axis=1)) + 1
            assert nearest == k


def test_photo_backgrounds(tmp_path):
    photo = np.zeros((30, 40, 3), np.uint8)
    photo[:] = (10, 200, 30)
    image, mask = synthetic.draw_example(np.random.default_rng(0), *SIZE, 4, photos=[photo])
    assert (image[mask == 0] == (10, 200, 30)).all()  # the photo, scaled up to cover the image
    synthetic.make_shapes_dataset(str(tmp_path), 3, size=SIZE, layout="generic", photos=True)
    assert validate_pairs(generic_pairs(str(tmp_path)), num_classes=4) == 3  # scikit-image's photos
