"""Segmentation metrics from an accumulated confusion matrix (IoU, mIoU, pixel accuracy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparseseg.errors import SparsesegError


class ConfusionMatrix:
    """Accumulates a C x C confusion matrix (rows = truth, columns = prediction) in int64.

    Pixels whose target equals `ignore_index` are skipped. IoU of class c is
    tp / (tp + fp + fn); a class with tp + fp + fn == 0 (absent from both prediction and truth)
    gets NaN and is left out of the mean, the usual convention for mIoU over a test set.

    Args:
        num_classes: number of classes C (ids 0..C-1).
        ignore_index: target id to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise SparsesegError(f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions.

        Args:
            pred: predicted class ids, any integer dtype and shape.
            target: true class ids, same shape; `ignore_index` entries are skipped.

        Raises:
            SparsesegError: shapes differ, non-integer input, or an id outside 0..C-1 (other
                than `ignore_index` in the target).
        """
        if pred.shape != target.shape:
            raise SparsesegError(
                f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if pred.is_floating_point() or pred.is_complex() or target.is_floating_point() or target.is_complex():
            raise SparsesegError("ConfusionMatrix.update: pred and target must hold integer class ids")
        c = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).to(device=target.device, dtype=torch.long)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() == 0:
            return
        # min/max in one sync each: cheap next to bincount, and a silent wrong mIoU is worse.
        tmin, tmax = int(target.min()), int(target.max())
        if tmin < 0 or tmax >= c:
            bad = tmax if tmax >= c else tmin
            raise SparsesegError(
                f"ConfusionMatrix.update: target id {bad} out of range for {c} classes "
                f"(ignore_index {self.ignore_index})"
            )
        pmin, pmax = int(pred.min()), int(pred.max())
        if pmin < 0 or pmax >= c:
            bad = pmax if pmax >= c else pmin
            raise SparsesegError(f"ConfusionMatrix.update: predicted id {bad} out of range for {c} classes")
        counts = torch.bincount(target * c + pred, minlength=c * c)
        self.matrix += counts.reshape(c, c).to(device="cpu", dtype=torch.int64)

    def iou(self) -> torch.Tensor:
        """Per-class IoU as a float64 tensor [C]; NaN where tp + fp + fn == 0."""
        m = self.matrix.to(torch.float64)
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp  # tp + fp + fn
        iou = torch.full_like(tp, math.nan)
        present = union > 0
        iou[present] = tp[present] / union[present]
        return iou

    def miou(self) -> float:
        """Mean IoU over classes that are not NaN (NaN when nothing was counted)."""
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (NaN when nothing was counted)."""
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan

    def to_dict(self, class_names: Sequence[str]) -> dict:
        """A JSON-ready summary.

        Args:
            class_names: one name per class, in id order.

        Returns:
            {"miou": float | None, "pixel_accuracy": float | None,
             "per_class_iou": {name: float | None}} with None for NaN (JSON has no NaN).
        """
        if len(class_names) != self.num_classes:
            raise SparsesegError(
                f"ConfusionMatrix.to_dict: {len(class_names)} class names for {self.num_classes} classes"
            )

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "miou": clean(self.miou()),
            "pixel_accuracy": clean(self.pixel_accuracy()),
            "per_class_iou": {
                name: clean(v) for name, v in zip(class_names, self.iou().tolist(), strict=True)
            },
        }
