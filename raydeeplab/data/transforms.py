"""Paired ``(image, mask)`` augmentations in numpy, the DeepLabV3+ recipe.

Every transform takes and returns ``image (H, W, 3) uint8`` and ``mask (H, W) uint8``
together, so geometry can never drift apart. Images are resized bilinear, masks
nearest (no invented classes); padding is ``MEAN_PIXEL`` in the image (it normalises to
~0) and ``IGNORE_LABEL`` in the mask, which keeps padded pixels out of the loss and the
metrics.

Geometry: inference stretches every image to the model's square (``resize_image``), so
training stretches to the same square before it scales and crops: the model learns the
aspect distortion it will be shown, and a random scale of 1 reproduces inference exactly.
"""

from __future__ import annotations

import numpy as np
from raydeeplab.data.images import IGNORE_LABEL, MEAN_PIXEL, resize_image, resize_mask

Pair = tuple[np.ndarray, np.ndarray]


def check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    """Raise unless ``image`` is ``(H, W, 3)`` and ``mask`` is ``(H, W)`` (same H, W)."""
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"expected image (H, W, 3) and mask (H, W), got {image.shape} and {mask.shape}"
        )


def random_flip(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> Pair:
    """Left-right flip of both with probability ``p``."""
    if rng.random() < p:
        return image[:, ::-1].copy(), mask[:, ::-1].copy()
    return image, mask


def random_scale(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    size: int,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
) -> Pair:
    """Stretch both to a square of side ``size * s``, ``s`` uniform in ``[min_scale, max_scale]``.

    Stretch and scale are one resample, not two, so the image is interpolated once.
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
    side = max(1, round(size * rng.uniform(min_scale, max_scale)))
    return resize_image(image, side), resize_mask(mask, side, side)


def pad_and_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> Pair:
    """Pad bottom/right to at least ``size`` (image ``MEAN_PIXEL``, mask 255), then a random square crop."""
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    height, width = mask.shape
    if height < size or width < size:
        shape = (max(height, size), max(width, size))
        padded_image = np.full((*shape, 3), MEAN_PIXEL, np.uint8)
        padded_mask = np.full(shape, IGNORE_LABEL, np.uint8)
        padded_image[:height, :width], padded_mask[:height, :width] = image, mask
        image, mask, (height, width) = padded_image, padded_mask, shape
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], mask[window]


def resize_for_eval(image: np.ndarray, mask: np.ndarray, size: int) -> Pair:
    """Deterministic ``(size, size)`` stretch, the same one ``predict`` applies to whole images."""
    check_pair(image, mask)
    return resize_image(image, size), resize_mask(mask, size, size)


def train_transform(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
) -> Pair:
    """Flip -> stretch to a random square -> pad and crop to ``(size, size, 3)``/``(size, size)`` uint8."""
    check_pair(image, mask)
    image, mask = random_flip(image, mask, rng)
    image, mask = random_scale(image, mask, rng, size, min_scale, max_scale)
    return pad_and_crop(image, mask, size, rng)
