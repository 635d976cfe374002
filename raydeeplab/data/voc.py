"""Dataset readers: Pascal VOC 2012, SBD, "train_aug" and a generic images/masks layout.

Readers only *list*: they return ``[{"image_uri": ..., "mask_uri": ...}]`` built from
split files or directory listings, so the driver never holds pixels. Workers read and
decode one pair with :func:`load_example`. Local paths and ``s3://`` URIs work alike.

Problems are :class:`DatasetError` messages that start with the file at fault, e.g.
``s3://b/voc/SegmentationClass/x.png: class value 37 >= --num-classes 21``.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import scipy.io

from raydeeplab import storage
from raydeeplab.errors import UserError
from raydeeplab.data.images import (
    IGNORE_LABEL,
    IMAGE_EXTENSIONS,
    ImageError,
    decode_image,
    decode_mask_png,
)

IMAGE_URI = "image_uri"
MASK_URI = "mask_uri"
MANIFEST_COLUMNS = ("image", "mask")
MAX_PROBLEMS = 20  # enough to see a pattern, short enough to read

Pair = dict[str, str]


class DatasetError(UserError):
    """A dataset that cannot be trained on; the message names the file(s) at fault."""


def pair(image_uri: str, mask_uri: str) -> Pair:
    return {IMAGE_URI: image_uri, MASK_URI: mask_uri}


def read_split(split_uri: str, expected: str) -> list[str]:
    """Image ids, one per line; a missing or empty file is an error naming it."""
    if not storage.exists(split_uri):
        raise DatasetError(f"{split_uri}: split file not found (expected {expected})")
    ids = list(storage.iter_lines(split_uri))
    if not ids:
        raise DatasetError(f"{split_uri}: split file lists no images")
    return ids


def voc_ids(root: str, split: str) -> list[str]:
    split_uri = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    return read_split(split_uri, "Pascal VOC 2012: root/ImageSets/Segmentation/<split>.txt")


def voc_pair(root: str, image_id: str) -> Pair:
    return pair(
        storage.join(root, "JPEGImages", f"{image_id}.jpg"),
        storage.join(root, "SegmentationClass", f"{image_id}.png"),
    )


def voc_pairs(root: str, split: str) -> list[Pair]:
    """Pascal VOC 2012: ``root/ImageSets/Segmentation/{split}.txt`` lists the ids of
    ``root/JPEGImages/<id>.jpg`` and ``root/SegmentationClass/<id>.png``."""
    return [voc_pair(root, i) for i in voc_ids(root, split)]


def sbd_ids(root: str, split: str) -> list[str]:
    split_uri = storage.join(root, "dataset", f"{split}.txt")
    return read_split(split_uri, "SBD: root/dataset/<split>.txt")


def sbd_pair(root: str, image_id: str) -> Pair:
    return pair(
        storage.join(root, "dataset", "img", f"{image_id}.jpg"),
        storage.join(root, "dataset", "cls", f"{image_id}.mat"),
    )


def sbd_pairs(root: str, split: str) -> list[Pair]:
    """SBD (benchmark_RELEASE): ``root/dataset/{split}.txt`` lists the ids of
    ``root/dataset/img/<id>.jpg`` and ``root/dataset/cls/<id>.mat``."""
    return [sbd_pair(root, i) for i in sbd_ids(root, split)]


def train_aug_pairs(voc_root: str, sbd_root: str) -> list[Pair]:
    """The usual "train_aug" set: VOC train + SBD train + SBD val, minus VOC val; sorted by id.

    VOC val stays out so that validating on it stays honest; ids in VOC train keep VOC's
    PNG mask (finer, with ignore borders), the others use SBD's image and ``.mat``.
    """
    sbd_all = sbd_ids(sbd_root, "train") + sbd_ids(sbd_root, "val")
    chosen = {i: sbd_pair(sbd_root, i) for i in sbd_all}
    for image_id in voc_ids(voc_root, "val"):
        chosen.pop(image_id, None)
    chosen.update((i, voc_pair(voc_root, i)) for i in voc_ids(voc_root, "train"))
    return [chosen[i] for i in sorted(chosen)]


def resolve_layout(root: str, layout: str = "auto") -> str:
    """``auto`` -> ``voc`` (has ImageSets/Segmentation), ``sbd`` (has dataset/cls) or ``generic``."""
    if layout != "auto":
        return layout
    if storage.exists(storage.join(root, "ImageSets", "Segmentation")):
        return "voc"
    if storage.exists(storage.join(root, "dataset", "cls")):
        return "sbd"
    return "generic"


def split_pairs(root: str, layout: str, split: str) -> list[Pair]:
    """One split of a dataset in any layout; generic datasets keep a folder per split."""
    layout = resolve_layout(root, layout)
    if layout == "voc":
        return voc_pairs(root, split)
    if layout == "sbd":
        return sbd_pairs(root, split)
    return generic_pairs(storage.join(root, split))


def generic_pairs(root: str) -> list[Pair]:
    """``root/images/**`` + ``root/masks/<same relative path>.png``, or a manifest file.

    A manifest is CSV or Parquet with columns ``image,mask``, or text lines
    ``image_uri mask_uri``; relative entries are relative to the manifest's folder.
    """
    if not storage.exists(root):
        raise DatasetError(f"{root}: no such dataset folder or manifest")
    if not storage.isdir(root):
        base = parent(root)
        return [pair(resolve(base, im), resolve(base, mask)) for im, mask in manifest_rows(root)]
    images_dir, masks_dir = storage.join(root, "images"), storage.join(root, "masks")
    images = storage.list_files(images_dir, IMAGE_EXTENSIONS) if storage.isdir(images_dir) else []
    if not images:
        raise DatasetError(f"{images_dir}: no images (expected root/images/* and root/masks/*.png)")
    out = []
    for image_uri in images:
        stem = posixpath.splitext(storage.relative_to(image_uri, images_dir))[0]
        out.append(pair(image_uri, storage.join(masks_dir, *f"{stem}.png".split("/"))))
    return out


def manifest_rows(uri: str) -> list[tuple[str, str]]:
    """``(image, mask)`` entries of a CSV, Parquet or whitespace-separated text manifest."""
    name = uri.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        columns, records = table.column_names, table.to_pylist()
    elif name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8")))
        records = list(reader)
        columns = reader.fieldnames or []
    else:
        rows = []
        for number, line in enumerate(storage.iter_lines(uri), 1):
            fields = line.split()
            if len(fields) != 2:
                raise DatasetError(f"{uri}:{number}: expected 'image_uri mask_uri', got {line!r}")
            rows.append((fields[0], fields[1]))
        return rows
    if not set(MANIFEST_COLUMNS) <= set(columns):
        raise DatasetError(f"{uri}: manifest needs columns image,mask, got {', '.join(columns)}")
    return [(r["image"], r["mask"]) for r in records]


def parent(uri: str) -> str:
    if storage.is_remote(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(os.path.abspath(uri))


def resolve(base: str, uri: str) -> str:
    """A manifest entry: URIs and absolute paths as written, anything else below ``base``."""
    if storage.is_remote(uri) or os.path.isabs(uri):
        return uri
    return storage.join(base, *uri.split("/"))


def load_example(image_uri: str, mask_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one pair: ``(H, W, 3) uint8`` image, ``(H, W) uint8`` class map."""
    image, mask = load_image(image_uri), load_mask(mask_uri)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{mask_uri}: mask size {mask.shape[1]}x{mask.shape[0]} != "
            f"image size {image.shape[1]}x{image.shape[0]} of {image_uri}"
        )
    return image, mask


def load_image(uri: str) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB; unreadable files are a :class:`DatasetError` naming ``uri``."""
    data = read(uri)
    try:
        return decode_image(data)
    except ImageError as err:
        raise DatasetError(f"{uri}: {err}") from None


def load_mask(uri: str) -> np.ndarray:
    """``(H, W) uint8`` class map from a palette PNG (VOC, generic) or an SBD ``.mat``."""
    data = read(uri)
    try:
        if uri.lower().endswith(".mat"):
            # SBD: a MATLAB struct GTcls whose field Segmentation holds the class map
            segmentation = scipy.io.loadmat(io.BytesIO(data))["GTcls"]["Segmentation"][0][0]
            return np.asarray(segmentation, np.uint8)
        return decode_mask_png(data)
    except Exception as err:  # Pillow and scipy raise many types for bad files
        raise DatasetError(f"{uri}: unreadable mask: {type(err).__name__}: {err}") from None


def read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise DatasetError(f"{uri}: file not found") from None


def out_of_range(mask: np.ndarray, num_classes: int) -> list[int]:
    """Class values in ``mask`` that are neither a class index nor ``IGNORE_LABEL``."""
    values = np.unique(mask)
    return [int(v) for v in values if v >= num_classes and v != IGNORE_LABEL]


def load_training_example(image_uri: str, mask_uri: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_example` plus the class-range check: a pair that can be trained on, or a
    :class:`DatasetError` naming the file (a worker meets the same problems the driver checks)."""
    image, mask = load_example(image_uri, mask_uri)
    bad = out_of_range(mask, num_classes)
    if bad:
        values = ", ".join(map(str, bad))
        noun = "class value" if len(bad) == 1 else "class values"
        raise DatasetError(f"{mask_uri}: {noun} {values} >= --num-classes {num_classes}")
    return image, mask


def check_example(example: Pair, num_classes: int) -> str | None:
    """The problem with one pair, or ``None`` when it can be trained on."""
    try:
        load_training_example(example[IMAGE_URI], example[MASK_URI], num_classes)
    except DatasetError as err:
        return str(err)
    return None


def validate_pairs(
    pairs: list[Pair],
    num_classes: int,
    check_limit: int | None = None,
    max_problems: int = MAX_PROBLEMS,
    threads: int = 16,
) -> int:
    """Read and check the first ``check_limit`` pairs (all by default); returns how many.

    Catches, before any cluster time is spent: missing files, undecodable files, mask
    size != image size, class values >= ``num_classes`` other than 255. All problems
    are gathered into one :class:`DatasetError` (the first ``max_problems`` listed).
    """
    if not pairs:
        raise DatasetError("no image/mask pairs to check")
    checked = pairs if check_limit is None else pairs[:check_limit]
    with ThreadPoolExecutor(threads) as pool:  # object stores answer faster in parallel
        problems = [p for p in pool.map(lambda e: check_example(e, num_classes), checked) if p]
    if problems:
        shown = problems[:max_problems]
        more = len(problems) - len(shown)
        raise DatasetError(
            f"{len(problems)} of {len(checked)} examples checked cannot be used:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    return len(checked)
