"""Confusion-matrix metrics (timo_hf.metrics) against hand-computed cases, and the offline `evaluate` module."""

import math

import numpy as np
import pytest
import torch

from timo_hf.metrics import METRIC_MODULE_PATH, ConfusionMatrix, compute_scores, confusion_matrix, load_metric


def test_two_class_case_by_hand():
    # pairs (reference, prediction): (0,0) (1,1) (0,1); the 255 pixel is ignored -> M = [[1, 1], [0, 1]]
    matrix = confusion_matrix(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]), 2, ignore_index=255)
    assert matrix.tolist() == [[1, 1], [0, 1]]
    scores = compute_scores(matrix)
    np.testing.assert_allclose(scores["per_category_iou"], [1 / 2, 1 / 2])  # 1 / (2 + 1 - 1) for both classes
    np.testing.assert_allclose(scores["per_category_accuracy"], [1 / 2, 1.0])
    np.testing.assert_allclose(scores["per_category_f1"], [2 / 3, 2 / 3])  # 2 * 1 / (2 + 1)
    assert scores["mean_iou"] == pytest.approx(0.5)
    assert scores["mean_accuracy"] == pytest.approx(0.75)
    assert scores["overall_accuracy"] == scores["accuracy"] == pytest.approx(2 / 3)
    # p_o = 2/3, p_e = (2 * 1 + 1 * 2) / 9 = 4/9, kappa = (2/9) / (5/9)
    assert scores["kappa"] == pytest.approx(0.4)


def test_three_class_case_by_hand_with_a_never_predicted_class():
    references = [0, 0, 1, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0, 1]
    matrix = confusion_matrix(np.array(predictions), np.array(references), 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    scores = compute_scores(matrix)
    # TP = [1, 2, 0], reference counts [2, 3, 1], prediction counts [2, 4, 0]
    np.testing.assert_allclose(scores["per_category_iou"], [1 / 3, 2 / 5, 0.0])
    np.testing.assert_allclose(scores["per_category_accuracy"], [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose(scores["per_category_f1"], [2 / 4, 4 / 7, 0.0])
    assert scores["mean_iou"] == pytest.approx(11 / 45)
    assert scores["mean_accuracy"] == pytest.approx(7 / 18)
    assert scores["mean_f1"] == pytest.approx(5 / 14)
    assert scores["overall_accuracy"] == pytest.approx(0.5)
    assert scores["kappa"] == pytest.approx(0.1)  # p_e = (4 + 12 + 0) / 36


def test_absent_classes_are_nan_and_left_out_of_the_means():
    scores = compute_scores(confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 1]), 3))
    assert math.isnan(scores["per_category_iou"][2]) and math.isnan(scores["per_category_f1"][2])
    assert scores["mean_iou"] == 1.0 and scores["mean_f1"] == 1.0 and scores["kappa"] == pytest.approx(1.0)
    # the official code's convention (absent class counted as 0): nan_to_num=0
    assert compute_scores(confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3), nan_to_num=0.0)["mean_iou"] == \
        pytest.approx(2 / 3)


def test_degenerate_kappa_and_empty_matrix_follow_scikit_learn():
    one_class = compute_scores(confusion_matrix(np.zeros(4, int), np.zeros(4, int), 2))
    assert one_class["overall_accuracy"] == 1.0 and math.isnan(one_class["kappa"])  # p_e = 1
    empty = compute_scores(torch.zeros(2, 2, dtype=torch.long))
    assert math.isnan(empty["mean_iou"]) and math.isnan(empty["overall_accuracy"]) and math.isnan(empty["kappa"])


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match=r"references must be class indices in \[0, 1\] \(or ignore_index 255\)"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 2, ignore_index=255)
    with pytest.raises(ValueError, match="predictions must be class indices"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 2)


def test_accumulation_over_batches_equals_one_matrix_and_classification_ignores_padded_frames():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 4, size=(6, 5, 7))
    references[0, 0, :3] = 255
    predictions = rng.integers(0, 4, size=(6, 5, 7))
    accumulated = ConfusionMatrix(4, ignore_index=255)
    for start in range(0, 6, 2):
        accumulated.update(predictions[start:start + 2], references[start:start + 2])
    assert torch.equal(accumulated.matrix, confusion_matrix(predictions, references, 4, ignore_index=255))
    assert accumulated.total == 6 * 5 * 7 - 3
    assert accumulated.reduce(None) is accumulated  # single process: unchanged

    frames = ConfusionMatrix(2, ignore_index=-100).update(torch.tensor([[1, 0, 0]]), torch.tensor([[1, 0, -100]]))
    assert frames.total == 2 and frames.compute()["accuracy"] == 1.0


def _hub_mean_iou_reference(predictions, references, num_labels, ignore_index):
    """The Hub mean_iou algorithm as documented (per-class area histograms), written independently here."""
    intersect = union = pred_area = label_area = np.zeros(num_labels)
    for prediction, label in zip(predictions, references):
        keep = label != ignore_index
        prediction, label = prediction[keep], label[keep]
        hit = prediction[prediction == label]
        area = np.histogram(hit, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred = np.histogram(prediction, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        intersect, pred_area, label_area = intersect + area, pred_area + area_pred, label_area + area_label
    union = pred_area + label_area - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, accuracy = intersect / union, intersect / label_area
    return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": intersect.sum() / label_area.sum(), "per_category_iou": iou,
            "per_category_accuracy": accuracy}


def test_evaluate_module_loads_offline_and_matches_the_hub_mean_iou_definition(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_metric()
    assert METRIC_MODULE_PATH.endswith("timo_mean_iou.py")
    rng = np.random.default_rng(1)
    references = [rng.integers(0, 5, size=(6, 8)) for _ in range(3)]
    for reference in references:
        reference[rng.random(reference.shape) < 0.1] = 255
    predictions = [np.where(rng.random(r.shape) < 0.6, np.where(r == 255, 0, r), rng.integers(0, 5, r.shape))
                   for r in references]
    results = metric.compute(predictions=predictions, references=references, num_labels=5, ignore_index=255)
    expected = _hub_mean_iou_reference(predictions, references, 5, 255)
    for name, value in expected.items():
        np.testing.assert_allclose(results[name], value, rtol=1e-12)
    matrix = ConfusionMatrix(5, 255)
    for prediction, reference in zip(predictions, references):
        matrix.update(prediction, reference)
    torch_scores = matrix.compute()
    for name in ("mean_f1", "kappa", "mean_iou"):
        assert results[name] == pytest.approx(torch_scores[name], rel=1e-12)
    assert set(results) == {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou",
                            "per_category_accuracy", "mean_f1", "per_category_f1", "kappa"}


def test_evaluate_module_hub_options_reduce_labels_label_map_and_nan_to_num():
    metric = load_metric()
    prediction, reference = np.array([[0, 1], [1, 0]]), np.array([[1, 2], [0, 2]])
    # reduce_labels: reference 0 -> ignored, others - 1 -> [[0, 1], [ignored, 1]]
    reduced = metric.compute(predictions=[prediction], references=[reference], num_labels=3, ignore_index=255,
                             reduce_labels=True)
    direct = metric.compute(predictions=[prediction], references=[np.array([[0, 1], [255, 1]])], num_labels=3,
                            ignore_index=255)
    np.testing.assert_equal(reduced["per_category_iou"], direct["per_category_iou"])
    assert math.isnan(direct["per_category_iou"][2])
    filled = metric.compute(predictions=[prediction], references=[np.array([[0, 1], [255, 1]])], num_labels=3,
                            ignore_index=255, nan_to_num=-1.0)
    assert filled["per_category_iou"][2] == -1.0
    mapped = metric.compute(predictions=[prediction], references=[reference], num_labels=3, ignore_index=255,
                            label_map={2: 0})  # reference [[1, 0], [0, 0]]: only the last pixel is right
    assert mapped["overall_accuracy"] == pytest.approx(1 / 4)
