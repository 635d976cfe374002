"""Segmentation metrics from one confusion matrix.

Counts are made where the pixels are (per batch in evaluation's Ray Data tasks, per batch on
the device in training), summed as int64 matrices, and scored once from the sum: the exact
mean IoU over the whole set, not an average of per-batch or per-worker means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raydeeplab.data.images import IGNORE_LABEL


class ConfusionMatrix:
    """Pixel counts ``matrix[truth, prediction]``, ``(num_classes, num_classes) int64``.

    Pixels whose truth is ``ignore_label`` (VOC borders, padding) are not counted.
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(
                f"ignore_label {ignore_label} is a class index (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Count one batch; ``truth`` and ``pred`` are integer arrays of the same shape (any)."""
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape:
            raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
        keep = truth != self.ignore_label
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        n = self.num_classes
        for name, values in (("truth", t), ("prediction", p)):
            # an out-of-range value would silently land in another cell of n*t+p
            if values.size and (values.min() < 0 or values.max() >= n):
                bad = values[(values < 0) | (values >= n)][0]
                raise ValueError(f"{name} has class value {bad} outside [0, {n})")
        self.matrix += np.bincount(n * t + p, minlength=n * n).reshape(n, n)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ignore_label: int = IGNORE_LABEL) -> ConfusionMatrix:
        """Scores for counts made elsewhere (on the device, summed over batches)."""
        matrix = np.asarray(matrix, np.int64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square (n, n) matrix, got shape {matrix.shape}")
        out = cls(matrix.shape[0], ignore_label)
        out.matrix = matrix
        return out

    def compute(self) -> dict[str, Any]:
        """Scores from the counts.

        - ``mean_iou``: mean IoU over classes with a non-empty union (present in truth or
          prediction); classes never seen nor predicted say nothing and are left out.
        - ``per_class_iou``: ``num_classes`` floats, ``None`` where the union is empty.
        - ``pixel_accuracy``: correct / counted pixels.
        - ``mean_accuracy``: mean per-class recall over classes present in the truth.
        - ``pixels``: counted (non-ignored) pixels.

        Scalars are ``nan`` when no pixel was counted.
        """
        m = self.matrix.astype(np.float64)
        hits = np.diag(m)
        truth_total = m.sum(axis=1)
        union = truth_total + m.sum(axis=0) - hits
        seen = union > 0
        iou = np.divide(hits, union, out=np.zeros_like(hits), where=seen)
        present = truth_total > 0
        recall = np.divide(hits, truth_total, out=np.zeros_like(hits), where=present)
        total = m.sum()
        return {
            "mean_iou": float(iou[seen].mean()) if seen.any() else float("nan"),
            "per_class_iou": [float(v) if s else None for v, s in zip(iou, seen)],
            "pixel_accuracy": float(hits.sum() / total) if total else float("nan"),
            "mean_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
            "pixels": int(total),
        }
