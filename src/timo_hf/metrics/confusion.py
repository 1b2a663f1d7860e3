"""Confusion-matrix metrics for segmentation and classification, implemented once in torch.

Every score the fine-tuning script, the `evaluate` module (`timo_mean_iou.py`) and the notebook report comes from
one `[num_labels, num_labels]` confusion matrix `M` (rows: reference class, columns: predicted class):

* per-class IoU `M_kk / (sum_j M_kj + sum_i M_ik - M_kk)`, accuracy (recall) `M_kk / sum_j M_kj` and F1
  `2 M_kk / (sum_j M_kj + sum_i M_ik)`;
* their means over classes (mIoU, mAcc, mF1), overall accuracy `trace(M) / sum(M)` and Cohen's kappa
  `(p_o - p_e) / (1 - p_e)` with `p_e = sum_k (row_k * col_k) / sum(M)^2`.

Conventions (those of the Hub's `mean_iou` metric and of scikit-learn): a class that appears neither in the
references nor in the predictions has NaN IoU and F1 and is left out of the means (`nanmean`); a class absent from
the references has NaN accuracy; kappa is NaN when `p_e == 1` (every reference and prediction is one class) or
nothing was counted. The official TiMo code instead divides by `union + 1e-10`, which counts absent classes as 0 in
the means; pass `nan_to_num=0.0` to `compute_scores` for that behaviour.

Because matrices add up, distributed evaluation sums the per-process matrices (`ConfusionMatrix.reduce`), which is
exact as long as every sample is counted on exactly one process.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def confusion_matrix(
    predictions: torch.Tensor | np.ndarray,
    references: torch.Tensor | np.ndarray,
    num_labels: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """`[num_labels, num_labels]` int64 counts of (reference, prediction) pairs, rows = references.

    `predictions` and `references` are class-index arrays of the same shape (any shape: pixels, frames, samples).
    Elements whose reference equals `ignore_index` are not counted. Any other value outside `[0, num_labels)` is
    an error (the Hub's `mean_iou` silently drops such values; here they indicate a label or model mismatch).
    """
    predictions = torch.as_tensor(predictions)
    references = torch.as_tensor(references)
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must have the same shape, got {tuple(predictions.shape)} and "
            f"{tuple(references.shape)}."
        )
    if predictions.is_floating_point() or references.is_floating_point():
        raise ValueError("predictions and references must hold integer class indices (use logits.argmax(dim)).")
    predictions = predictions.reshape(-1).long()
    references = references.reshape(-1).long().to(predictions.device)
    if ignore_index is not None:
        keep = references != ignore_index
        predictions, references = predictions[keep], references[keep]
    for name, values in (("references", references), ("predictions", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_labels):
            extra = "" if ignore_index is None or name == "predictions" else f" (or ignore_index {ignore_index})"
            raise ValueError(
                f"{name} must be class indices in [0, {num_labels - 1}]{extra}; got values from "
                f"{int(values.min())} to {int(values.max())}."
            )
    counts = torch.bincount(references * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def compute_scores(matrix: torch.Tensor | np.ndarray, nan_to_num: float | None = None) -> dict:
    """All scores of a confusion matrix (rows = references).

    Returns floats `mean_iou`, `mean_accuracy`, `mean_f1`, `overall_accuracy` (also under `accuracy`), `kappa`
    and numpy float64 arrays `per_category_iou`, `per_category_accuracy`, `per_category_f1`; NaN conventions in
    the module docstring. `nan_to_num` replaces NaN per class before averaging (the official code's `0.0`).
    """
    matrix = torch.as_tensor(matrix).to(torch.float64).cpu()
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {tuple(matrix.shape)}.")
    true_positive = torch.diagonal(matrix)
    reference_count = matrix.sum(dim=1)
    prediction_count = matrix.sum(dim=0)
    union = reference_count + prediction_count - true_positive
    nan = torch.tensor(math.nan, dtype=torch.float64)

    def ratio(numerator, denominator):
        return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), nan)

    per_class = {
        "per_category_iou": ratio(true_positive, union),
        "per_category_accuracy": ratio(true_positive, reference_count),
        "per_category_f1": ratio(2 * true_positive, reference_count + prediction_count),
    }
    if nan_to_num is not None:
        per_class = {name: torch.nan_to_num(values, nan=nan_to_num) for name, values in per_class.items()}
    total = matrix.sum()
    overall = float(true_positive.sum() / total) if total > 0 else math.nan
    expected = float((reference_count * prediction_count).sum() / total**2) if total > 0 else math.nan
    kappa = (overall - expected) / (1.0 - expected) if total > 0 and expected < 1.0 else math.nan
    scores = {
        "mean_iou": _nanmean(per_class["per_category_iou"]),
        "mean_accuracy": _nanmean(per_class["per_category_accuracy"]),
        "mean_f1": _nanmean(per_class["per_category_f1"]),
        "overall_accuracy": overall,
        "accuracy": overall,
        "kappa": kappa,
    }
    if nan_to_num is not None:
        scores = {name: nan_to_num if math.isnan(value) else value for name, value in scores.items()}
    scores.update({name: values.numpy() for name, values in per_class.items()})
    return scores


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches, optionally sums it over processes, and scores it.

    ```python
    matrix = ConfusionMatrix(num_labels=14, ignore_index=255)
    for batch in loader:
        matrix.update(model(**batch).logits.argmax(1), batch["labels"])
    matrix.reduce(accelerator)          # sum over processes (each sample counted on one process only)
    scores = matrix.compute()           # mean_iou, mean_f1, kappa, per_category_iou, ...
    ```
    """

    def __init__(self, num_labels: int, ignore_index: int | None = None, device: torch.device | str = "cpu"):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)

    def update(self, predictions, references) -> "ConfusionMatrix":
        counts = confusion_matrix(predictions, references, self.num_labels, self.ignore_index)
        self.matrix += counts.to(self.matrix.device)
        return self

    def reduce(self, accelerator=None) -> "ConfusionMatrix":
        """Sum the matrices of all processes (in place) with `accelerator.reduce`, or with
        `torch.distributed.all_reduce` when no accelerator is given and a process group is initialised."""
        if accelerator is not None:
            if accelerator.num_processes > 1:
                self.matrix = accelerator.reduce(self.matrix.to(accelerator.device), reduction="sum").cpu()
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)
        return self

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def compute(self, nan_to_num: float | None = None) -> dict:
        return compute_scores(self.matrix, nan_to_num=nan_to_num)
