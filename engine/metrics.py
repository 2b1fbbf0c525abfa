"""Segmentation metrics from one confusion matrix accumulated over a whole split.

The matrix is built with ``torch.bincount`` on ``num_classes * target + prediction`` (rows =
ground truth, columns = prediction). Scores are computed from the summed matrix, never as a mean
of per-image scores. Classes absent from both prediction and ground truth have IoU NaN and are
left out of the mean.
"""
import math

import torch

from dataset.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SHORT_NAMES


class ConfusionMatrix:
    """Accumulates a (num_classes x num_classes) int64 confusion matrix on any device."""

    def __init__(self, num_classes=NUM_CLASSES, device="cpu", ignore_index=IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target, prediction):
        """Add a batch: ``target`` and ``prediction`` are integer tensors of the same shape."""
        if target.shape != prediction.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(prediction.shape)}")
        target = target.reshape(-1).to(self.matrix.device)
        prediction = prediction.reshape(-1).to(self.matrix.device)
        # Pixels whose ground truth is ignored are skipped; a prediction outside the classes (e.g.
        # 255 from a thresholded map) must not land in another cell, so it is skipped too.
        valid = ((target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
                 & (prediction >= 0) & (prediction < self.num_classes))
        indices = self.num_classes * target[valid].long() + prediction[valid].long()
        self.matrix += torch.bincount(indices, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def all_reduce_(self):
        """Sum the matrix over all processes when running distributed (no-op otherwise)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)
        return self

    def reset(self):
        self.matrix.zero_()

    def scores(self):
        return scores_from_confusion(self.matrix)


def scores_from_confusion(matrix):
    """Pixel accuracy, per-class IoU (NaN where a class is absent from both) and mIoU."""
    matrix = matrix.double().cpu()
    true_positive = matrix.diag()
    ground_truth = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    union = ground_truth + predicted - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
    total = matrix.sum()
    present = ~torch.isnan(iou)
    return {
        "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "iou": [float(value) for value in iou],
        "num_pixels": int(total),
    }


def _percent(value):
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(rows, short_names=SHORT_NAMES):
    """Report-style table: one row per (label, scores) pair, per-class IoU in the report's order."""
    header = ["method", *short_names, "mIoU", "acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in rows:
        cells = [label, *(_percent(v) for v in scores["iou"]), _percent(scores["miou"]), _percent(scores["pixel_accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_report(scores, class_names=CLASS_NAMES):
    """Console report: pixel accuracy, mIoU and one line per class."""
    lines = [f"pixel accuracy: {_percent(scores['pixel_accuracy'])}", f"mIoU:           {_percent(scores['miou'])}", "per-class IoU:"]
    width = max(len(name) for name in class_names)
    lines += [f"  {name:<{width}}  {_percent(value):>5}" for name, value in zip(class_names, scores["iou"])]
    return "\n".join(lines)


def scores_to_json(scores, class_names=CLASS_NAMES):
    """JSON-friendly dict (NaN -> null) with the per-class IoU keyed by class name."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    return {
        "pixel_accuracy": clean(scores["pixel_accuracy"]),
        "miou": clean(scores["miou"]),
        "num_pixels": scores["num_pixels"],
        "iou": {name: clean(value) for name, value in zip(class_names, scores["iou"])},
    }


def scores_from_json(record, class_names=CLASS_NAMES):
    """The inverse of ``scores_to_json`` (null -> NaN; per-class IoU back in class order)."""
    def value(number):
        return math.nan if number is None else float(number)
    return {
        "pixel_accuracy": value(record["pixel_accuracy"]),
        "miou": value(record["miou"]),
        "num_pixels": record["num_pixels"],
        "iou": [value(record["iou"][name]) for name in class_names],
    }

