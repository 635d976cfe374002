"""Examples: read, decode and check one dataset example (an image and its class map).

Workers call :func:`load_training_example` on what a layout listed
(:mod:`raydeeplab.data.voc`); the driver calls :func:`validate_pairs` on all of it first,
so a bad file stops the run before any cluster time is spent. Problems are
:class:`~raydeeplab.data.voc.DatasetError` messages that start with the file at fault, e.g.
``s3://b/voc/SegmentationClass/x.png: class value 37 >= --num-classes 21``.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.io

from raydeeplab import storage
from raydeeplab.data.images import IGNORE_LABEL, ImageError, decode_image, decode_mask_png
from raydeeplab.data.voc import IMAGE_URI, MASK_URI, DatasetError, ExampleURIs

MAX_PROBLEMS = 20  # enough to see a pattern, short enough to read


def load_example(image_uri: str, mask_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one pair: ``(H, W, 3) uint8`` image, ``(H, W) uint8`` class map."""
    image, mask = load_image(image_uri), load_mask(mask_uri)
    if mask.shape != image.shape[:2]:
        turned = mask.shape == image.shape[1::-1]  # the image's EXIF orientation turned it by 90 degrees
        raise DatasetError(
            f"{mask_uri}: mask size {mask.shape[1]}x{mask.shape[0]} != "
            f"image size {image.shape[1]}x{image.shape[0]} of {image_uri}"
            + ("; images are read upright (EXIF orientation applied), as viewers and labelling tools "
               "show them: the mask must be drawn on that" if turned else "")
        )  # fmt: skip
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


def check_example(example: ExampleURIs, num_classes: int) -> str | None:
    """The problem with one pair, or ``None`` when it can be trained on."""
    try:
        load_training_example(example[IMAGE_URI], example[MASK_URI], num_classes)
    except DatasetError as err:
        return str(err)
    return None


def validate_pairs(
    pairs: list[ExampleURIs],
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
