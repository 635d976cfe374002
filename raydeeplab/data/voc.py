"""Dataset layouts: Pascal VOC 2012, SBD, "train_aug" and a generic images/masks layout.

Readers only *list*: they return ``[{"image_uri": ..., "mask_uri": ...}]`` built from
split files, manifests or directory listings, so the driver never holds pixels. Workers
read, decode and check one example with :mod:`raydeeplab.data.examples`. Local paths and
``s3://`` URIs work alike. Where each layout keeps its files is :data:`LAYOUTS`, the one
definition that :mod:`raydeeplab.data.synthetic` also writes by.

Problems are :class:`DatasetError` messages that start with the file at fault, e.g.
``s3://b/voc/ImageSets/Segmentation/val.txt: split file not found``.
"""

from __future__ import annotations

import os
import posixpath
from typing import NamedTuple

from raydeeplab import storage
from raydeeplab.data.images import IMAGE_EXTENSIONS
from raydeeplab.data.manifests import ManifestError, read_manifest
from raydeeplab.errors import UserError

IMAGE_URI = "image_uri"
MASK_URI = "mask_uri"
MANIFEST_COLUMNS = ("image", "mask")

ExampleURIs = dict[str, str]  # {IMAGE_URI: ..., MASK_URI: ...}: one example, not yet read


class Layout(NamedTuple):
    """Where a layout keeps its files, relative to its root; ``{}`` is an image id or a split."""

    image: str
    mask: str
    split: str | None  # None: a folder per split, every file in it


GENERIC_IMAGES, GENERIC_MASKS = "images", "masks"  # generic: any image name, a PNG mask per image
LAYOUTS = {
    "voc": Layout("JPEGImages/{}.jpg", "SegmentationClass/{}.png", "ImageSets/Segmentation/{}.txt"),
    "sbd": Layout("dataset/img/{}.jpg", "dataset/cls/{}.mat", "dataset/{}.txt"),
    "generic": Layout(f"{GENERIC_IMAGES}/{{}}.jpg", f"{GENERIC_MASKS}/{{}}.png", None),
}


class DatasetError(UserError):
    """A dataset that cannot be trained on; the message names the file(s) at fault."""


def example_uris(image_uri: str, mask_uri: str) -> ExampleURIs:
    return {IMAGE_URI: image_uri, MASK_URI: mask_uri}


def layout_file(root: str, template: str, name: str) -> str:
    return storage.join(root, *template.format(name).split("/"))


def read_split(split_uri: str, expected: str) -> list[str]:
    """Image ids, one per line; a missing or empty file is an error naming it."""
    if not storage.exists(split_uri):
        raise DatasetError(f"{split_uri}: split file not found (expected {expected})")
    ids = list(storage.iter_lines(split_uri))
    if not ids:
        raise DatasetError(f"{split_uri}: split file lists no images")
    return ids


LAYOUT_NAMES = {"voc": "Pascal VOC 2012", "sbd": "SBD"}


def layout_ids(root: str, layout: str, split: str) -> list[str]:
    template = LAYOUTS[layout].split
    where = f"{LAYOUT_NAMES[layout]}: root/{template.format('<split>')}"
    return read_split(layout_file(root, template, split), where)


def layout_example(root: str, layout: str, image_id: str) -> ExampleURIs:
    files = LAYOUTS[layout]
    return example_uris(layout_file(root, files.image, image_id), layout_file(root, files.mask, image_id))


def layout_pairs(root: str, layout: str, split: str) -> list[ExampleURIs]:
    """A split file's ids -> their files, for a layout that has split files (VOC, SBD)."""
    return [layout_example(root, layout, i) for i in layout_ids(root, layout, split)]


def voc_pairs(root: str, split: str) -> list[ExampleURIs]:
    """Pascal VOC 2012: ``root/ImageSets/Segmentation/{split}.txt`` lists the ids of
    ``root/JPEGImages/<id>.jpg`` and ``root/SegmentationClass/<id>.png``."""
    return layout_pairs(root, "voc", split)


def sbd_pairs(root: str, split: str) -> list[ExampleURIs]:
    """SBD (benchmark_RELEASE): ``root/dataset/{split}.txt`` lists the ids of
    ``root/dataset/img/<id>.jpg`` and ``root/dataset/cls/<id>.mat``."""
    return layout_pairs(root, "sbd", split)


def train_aug_pairs(voc_root: str, sbd_root: str) -> list[ExampleURIs]:
    """The usual "train_aug" set: VOC train + SBD train + SBD val, minus VOC val; sorted by id.

    VOC val stays out so that validating on it stays honest; ids in VOC train keep VOC's
    PNG mask (finer, with ignore borders), the others use SBD's image and ``.mat``.
    """
    sbd_all = layout_ids(sbd_root, "sbd", "train") + layout_ids(sbd_root, "sbd", "val")
    chosen = {i: layout_example(sbd_root, "sbd", i) for i in sbd_all}
    for image_id in layout_ids(voc_root, "voc", "val"):
        chosen.pop(image_id, None)
    chosen.update((i, layout_example(voc_root, "voc", i)) for i in layout_ids(voc_root, "voc", "train"))
    return [chosen[i] for i in sorted(chosen)]


def resolve_layout(root: str, layout: str = "auto") -> str:
    """``auto`` -> ``voc`` (has ImageSets/Segmentation), ``sbd`` (has dataset/cls) or ``generic``."""
    if layout != "auto":
        return layout
    for layout in ("voc", "sbd"):  # the split files' folder for VOC, the masks' folder for SBD
        marker = LAYOUTS[layout].split if layout == "voc" else LAYOUTS[layout].mask
        if storage.exists(storage.join(root, *posixpath.dirname(marker).split("/"))):
            return layout
    return "generic"


def split_pairs(root: str, layout: str, split: str) -> list[ExampleURIs]:
    """One split of a dataset in any layout; generic datasets keep a folder per split."""
    layout = resolve_layout(root, layout)
    if LAYOUTS[layout].split:
        return layout_pairs(root, layout, split)
    return generic_pairs(storage.join(root, split))


def generic_pairs(root: str) -> list[ExampleURIs]:
    """``root/images/**`` + ``root/masks/<same relative path>.png``, or a manifest file.

    A manifest is CSV or Parquet with columns ``image,mask``, or text lines
    ``image_uri mask_uri``; relative entries are relative to the manifest's folder.
    """
    if not storage.exists(root):
        raise DatasetError(f"{root}: no such dataset folder or manifest")
    if not storage.isdir(root):
        base = parent(root)
        return [example_uris(resolve(base, im), resolve(base, mask)) for im, mask in manifest_rows(root)]
    images_dir, masks_dir = storage.join(root, GENERIC_IMAGES), storage.join(root, GENERIC_MASKS)
    images = storage.list_files(images_dir, IMAGE_EXTENSIONS) if storage.isdir(images_dir) else []
    if not images:
        raise DatasetError(f"{images_dir}: no images (expected root/images/* and root/masks/*.png)")
    out = []
    for image_uri in images:
        stem = posixpath.splitext(storage.relative_to(image_uri, images_dir))[0]
        out.append(example_uris(image_uri, storage.join(masks_dir, *f"{stem}.png".split("/"))))
    return out


def manifest_rows(uri: str) -> list[tuple[str, str]]:
    """``(image, mask)`` entries of a CSV, Parquet or whitespace-separated text manifest."""
    try:
        columns = read_manifest(uri, MANIFEST_COLUMNS)
    except ManifestError as err:
        raise DatasetError(str(err)) from None
    return list(zip(columns["image"], columns["mask"]))


def parent(uri: str) -> str:
    if storage.is_remote(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(os.path.abspath(uri))


def resolve(base: str, uri: str) -> str:
    """A manifest entry: URIs and absolute paths as written, anything else below ``base``."""
    if storage.is_remote(uri) or os.path.isabs(uri):
        return uri
    return storage.join(base, *uri.split("/"))
