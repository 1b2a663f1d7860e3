"""Evaluation metrics of TiMo's downstream tasks, from one confusion matrix (see `confusion`).

* `ConfusionMatrix` / `confusion_matrix` / `compute_scores`: torch implementation used by `training/finetune.py`
  (per-class IoU, mIoU, mAcc, mF1, overall accuracy, Cohen's kappa; for classification accuracy and per-class F1),
  summed across processes with `ConfusionMatrix.reduce(accelerator)`.
* `METRIC_MODULE_PATH`: the `evaluate` metric module with the Hub `mean_iou` interface plus `mean_f1` and `kappa`,
  loadable offline with `evaluate.load(METRIC_MODULE_PATH)` (or `load_metric()`).
"""

from pathlib import Path

from .confusion import ConfusionMatrix, compute_scores, confusion_matrix


METRIC_MODULE_PATH = str(Path(__file__).with_name("timo_mean_iou.py"))


def load_metric(**kwargs):
    """`evaluate.load(METRIC_MODULE_PATH, **kwargs)`: the offline `evaluate` module (Hub `mean_iou` interface)."""
    import evaluate

    return evaluate.load(METRIC_MODULE_PATH, **kwargs)


__all__ = ["ConfusionMatrix", "METRIC_MODULE_PATH", "compute_scores", "confusion_matrix", "load_metric"]
