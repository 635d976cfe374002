"""An independent reference for ``--resize pad``: numpy's own ``np.pad`` of the scaled image, the
Segmenter on it, and the mask cropped back by hand (nothing of ``fit_image``/``restore_mask``)."""

from __future__ import annotations

import numpy as np

from raydeeplab.data.images import MEAN_PIXEL, resize_image, resize_mask


def padded_reference(segmenter, image: np.ndarray) -> tuple[np.ndarray, float]:
    """``(H, W, 3) uint8`` -> (the mask at ``(H, W)``, the confidence inside the image's part)."""
    size = segmenter.image_size
    height, width = image.shape[:2]
    inner_h, inner_w = round(height * size / max(height, width)), round(width * size / max(height, width))
    scaled = resize_image(image, (inner_h, inner_w))
    padded = np.stack(
        [np.pad(scaled[..., c], ((0, size - inner_h), (0, size - inner_w)), constant_values=MEAN_PIXEL[c]) for c in range(3)],
        axis=-1,
    )
    out = segmenter.segment(padded[None], np.array([[0, inner_h, 0, inner_w]]))
    return resize_mask(out.masks[0][:inner_h, :inner_w], height, width), float(out.confidence[0])
