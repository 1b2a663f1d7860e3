"""`evaluate` metric module: the Hub's `mean_iou` interface, plus mean F1 and Cohen's kappa, computed offline.

Load it by path (works without network; the Hub's `evaluate.load("mean_iou")` needs one):

```python
import evaluate
from timo_hf.metrics import METRIC_MODULE_PATH

metric = evaluate.load(METRIC_MODULE_PATH)
scores = metric.compute(predictions=[pred_map], references=[label_map], num_labels=14, ignore_index=255)
scores["mean_iou"], scores["mean_f1"], scores["kappa"], scores["per_category_iou"]
```

The scores come from the confusion matrix of `timo_hf.metrics.confusion` (the same code the fine-tuning script
reduces across processes). Arguments as the Hub's `mean_iou`: `num_labels`, `ignore_index`, `nan_to_num`
(replaces NaN in every returned value), `label_map` (reference id -> new id, applied first) and `reduce_labels`
(reference 0 -> ignored, every other id minus 1). Difference: values outside `[0, num_labels)` (other than
`ignore_index` in the references) raise a ValueError instead of being dropped silently.
"""

import datasets
import evaluate
import numpy as np

from timo_hf.metrics.confusion import compute_scores, confusion_matrix


_DESCRIPTION = """Mean intersection-over-union, mean accuracy, overall accuracy, per-category IoU and accuracy (the
interface of the Hub's mean_iou metric), plus per-category and mean F1 and Cohen's kappa, from one confusion
matrix. Classes absent from both references and predictions have NaN IoU/F1 and are left out of the means."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted segmentation maps, each of shape (height, width).
    references (`List[ndarray]`): ground-truth maps of the same shapes.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value that is not counted (e.g. 255).
    nan_to_num (`float`, *optional*): replace NaN values in the results by this number.
    label_map (`dict`, *optional*): old reference id -> new reference id, applied before anything else.
    reduce_labels (`bool`, *optional*, defaults to `False`): reference 0 becomes ignored (255), the others minus 1.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy`, `mean_f1`, `kappa` (floats) and `per_category_iou`,
    `per_category_accuracy`, `per_category_f1` (numpy arrays of length num_labels).
Examples:
    >>> import numpy as np, evaluate
    >>> from timo_hf.metrics import METRIC_MODULE_PATH
    >>> metric = evaluate.load(METRIC_MODULE_PATH)
    >>> results = metric.compute(predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [0, 255]])],
    ...                          num_labels=2, ignore_index=255)
    >>> round(results["mean_iou"], 4), round(results["kappa"], 4)
    (0.5, 0.4)
"""

_CITATION = """@software{timo_hf, title={timo-hf: TiMo for Hugging Face transformers}, year={2026}}"""


class TimoMeanIoU(evaluate.Metric):
    """mean_iou (Hub interface) + mean_f1 + kappa over a confusion matrix."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
    ):
        matrix = None
        for prediction, reference in zip(predictions, references):
            reference = np.array(reference, dtype=np.int64)
            if label_map:
                original = reference.copy()
                for old_id, new_id in label_map.items():
                    reference[original == int(old_id)] = int(new_id)
            if reduce_labels:
                reference[reference == 0] = 255
                reference = reference - 1
                reference[reference == 254] = 255
            counts = confusion_matrix(np.asarray(prediction, dtype=np.int64), reference, num_labels, ignore_index)
            matrix = counts if matrix is None else matrix + counts
        if matrix is None:
            raise ValueError("No predictions to score.")
        scores = compute_scores(matrix)
        results = {
            name: scores[name]
            for name in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy",
                         "mean_f1", "per_category_f1", "kappa")
        }
        if nan_to_num is not None:
            results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
        return results
