"""Paired ``(image, mask)`` augmentations in numpy, the DeepLabV3+ recipe.

Every transform takes and returns ``image (H, W, 3) uint8`` and ``mask (H, W) uint8``
together, so geometry can never drift apart. Images are resized bilinear, masks
nearest (no invented classes); padding is 0 in the image and ``IGNORE_LABEL`` in the
mask, which keeps padded pixels out of the loss and the metrics.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from raydeeplab.data.images import IGNORE_LABEL, resize_image, resize_mask

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
    min_scale: float = 0.5,
    max_scale: float = 2.0,
) -> Pair:
    """Resize both by one factor drawn uniformly from ``[min_scale, max_scale]``."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
    scale = rng.uniform(min_scale, max_scale)
    height, width = mask.shape
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    return resized, resize_mask(mask, new_h, new_w)


def pad_and_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> Pair:
    """Pad bottom/right to at least ``size`` (image 0, mask 255), then a random square crop."""
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    height, width = mask.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_LABEL)
        height, width = mask.shape
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
    """Flip -> random scale -> pad and crop to ``(size, size, 3)`` and ``(size, size)`` uint8."""
    check_pair(image, mask)
    image, mask = random_flip(image, mask, rng)
    image, mask = random_scale(image, mask, rng, min_scale, max_scale)
    return pad_and_crop(image, mask, size, rng)
