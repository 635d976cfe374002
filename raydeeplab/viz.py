"""The guide's gallery: each row an image beside its coloured masks (truth when known, prediction)."""

from __future__ import annotations

import io

import numpy as np

from raydeeplab.data.images import VOC_PALETTE


def colourise(mask: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` class map -> ``(H, W, 3) uint8`` VOC colours (255 'ignore' shows cream)."""
    return VOC_PALETTE[mask]


def gallery_png(
    images: list[np.ndarray],
    predicted: list[np.ndarray],
    truth: list[np.ndarray] | None = None,
    titles: list[str] | None = None,
) -> bytes:
    """PNG bytes of an N-row grid: image | true mask (optional) | predicted mask."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    columns = [("image", images)]
    if truth is not None:
        columns.append(("true mask", [colourise(m) for m in truth]))
    columns.append(("predicted mask", [colourise(m) for m in predicted]))
    rows = len(images)
    fig, axes = plt.subplots(rows, len(columns), figsize=(3 * len(columns), 3 * rows), squeeze=False)
    for r in range(rows):
        for c, (name, pictures) in enumerate(columns):
            axes[r, c].imshow(pictures[r])
            axes[r, c].axis("off")
            label = name if r == 0 else ""
            if c == 0 and titles:
                label = titles[r] if not label else f"{label}\n{titles[r]}"
            axes[r, c].set_title(label, fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out.getvalue()
