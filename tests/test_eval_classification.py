"""Classification and regression metrics against hand-computed small cases."""

from __future__ import annotations

import json
import math

import pytest

from balora.training.metrics import classification_metrics, regression_metrics


def test_binary_case_by_hand():
    # TP=3 (1->1), FN=1 (1->0), FP=1 (0->1), TN=3 (0->0)
    y_true = [1, 1, 1, 1, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 0, 0, 0]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # F1 of each class: precision 3/4, recall 3/4 -> 0.75; macro = 0.75
    assert m["macro_f1"] == pytest.approx(0.75)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4^4) = 0.5
    assert m["mcc"] == pytest.approx(0.5)
    assert m["per_class_recall"] == {0: pytest.approx(0.75), 1: pytest.approx(0.75)}
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["labels"] == [0, 1] and m["n"] == 8


def _pairwise_auc(positive: list[float], negative: list[float]) -> float:
    """The plain definition: P(score of a positive > score of a negative), ties counting one half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_balanced_accuracy_and_binary_auroc_against_their_definitions():
    y_true = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    logits = [[0.1, 0.9], [0.4, 0.2], [0.0, 0.3], [0.9, 0.1], [0.2, 0.2], [0.3, 0.5], [0.8, 0.0], [0.6, 0.1],
              [0.5, 0.4], [0.7, 0.7]]
    y_pred = [int(b > a) for a, b in logits]
    m = classification_metrics(y_true, y_pred, scores=logits)
    margin = [b - a for a, b in logits]
    assert m["auroc"] == pytest.approx(_pairwise_auc([margin[i] for i in range(3)], [margin[i] for i in range(3, 10)]))
    recall = m["per_class_recall"]
    assert m["balanced_accuracy"] == pytest.approx((recall[0] + recall[1]) / 2)
    assert m["balanced_accuracy"] != pytest.approx(m["accuracy"])  # imbalanced: the two differ
    assert "auroc" not in classification_metrics(y_true, y_pred)  # no scores, no AUROC


def test_multiclass_auroc_is_the_one_vs_rest_mean_and_undefined_without_a_class():
    import numpy as np

    y_true = ["a", "b", "c", "a", "b", "c", "a"]
    logits = [[2.0, 0.1, 0.3], [0.2, 1.0, 0.5], [0.1, 0.9, 0.8], [0.5, 0.6, 0.1], [1.1, 1.0, 0.0],
              [0.0, 0.2, 2.0], [0.3, 0.2, 0.1]]
    probs = np.exp(np.array(logits)) / np.exp(np.array(logits)).sum(1, keepdims=True)
    labels = ["a", "b", "c"]
    expected = np.mean([_pairwise_auc([probs[i, k] for i, y in enumerate(y_true) if y == lab],
                                      [probs[i, k] for i, y in enumerate(y_true) if y != lab])
                        for k, lab in enumerate(labels)])
    y_pred = [labels[int(np.argmax(r))] for r in logits]
    assert classification_metrics(y_true, y_pred, labels=labels, scores=logits)["auroc"] == pytest.approx(expected)
    absent = classification_metrics(["a", "a"], ["a", "b"], labels=["a", "b"], scores=[[1, 0], [0, 1]])
    assert absent["auroc"] is None
    with pytest.raises(ValueError, match="scores: expected 2 rows of 2"):
        classification_metrics(["a", "b"], ["a", "b"], labels=["a", "b"], scores=[[1, 0, 0], [0, 1, 0]])


def test_imbalanced_three_class_case_by_hand():
    y_true = ["a", "a", "a", "a", "a", "b", "b", "b", "c"]
    y_pred = ["a", "a", "a", "a", "b", "b", "b", "a", "a"]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(6 / 9)
    # a: P=4/6, R=4/5 -> F1=8/11; b: P=2/3, R=2/3 -> 2/3; c: never predicted -> 0
    assert m["macro_f1"] == pytest.approx((8 / 11 + 2 / 3 + 0) / 3)
    assert m["per_class_recall"] == {"a": pytest.approx(0.8), "b": pytest.approx(2 / 3),
                                     "c": 0.0}
    assert m["minority_class"] == "c" and m["minority_recall"] == 0.0
    assert m["support"] == {"a": 5, "b": 3, "c": 1}
    assert m["confusion_matrix"] == [[4, 1, 0], [1, 2, 0], [1, 0, 0]]
    # Multiclass MCC (Gorodkin): (c*s - sum t_k p_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    # c=6, s=9, t=(5,3,1), p=(6,3,0)
    num = 6 * 9 - (5 * 6 + 3 * 3 + 1 * 0)
    den = math.sqrt((81 - (36 + 9 + 0)) * (81 - (25 + 9 + 1)))
    assert m["mcc"] == pytest.approx(num / den)


def test_explicit_labels_order_and_absent_class():
    m = classification_metrics([0, 0, 1], [0, 1, 1], labels=[1, 0, 2])
    assert m["labels"] == [1, 0, 2]
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert m["per_class_recall"] == {1: 1.0, 0: 0.5, 2: None}  # no true 2s: undefined
    assert m["minority_class"] == 1  # fewest true examples among present classes
    # macro-F1 over the three given labels: class 1 F1=2/3, class 0 F1=2/3, class 2 F1=0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_minority_tie_goes_to_first_label_and_result_is_json_serialisable():
    m = classification_metrics(["x", "y", "z", "z"], ["x", "x", "z", "z"])
    assert m["minority_class"] == "x" and m["minority_recall"] == 1.0
    json.dumps(m)


def test_perfect_and_input_errors():
    m = classification_metrics([2, 1, 2], [2, 1, 2])
    assert m["accuracy"] == m["macro_f1"] == m["mcc"] == 1.0
    with pytest.raises(ValueError, match="3 items"):
        classification_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        classification_metrics([], [])


def test_regression_by_hand():
    y_true = [1.0, 2.0, 3.0, 4.0]
    y_pred = [1.0, 3.0, 2.0, 4.0]
    r = regression_metrics(y_true, y_pred)
    # Pearson: deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): cov 4, var 5 -> 0.8
    assert r["pearson"] == pytest.approx(0.8)
    # Spearman on ranks, same here (no ties): 1 - 6*sum d^2 / (n(n^2-1)) = 1 - 6*2/60 = 0.8
    assert r["spearman"] == pytest.approx(0.8)
    assert r["mse"] == pytest.approx(0.5) and r["mae"] == pytest.approx(0.5) and r["n"] == 4


def test_spearman_differs_from_pearson_on_monotone_nonlinear():
    r = regression_metrics([1, 2, 3, 4, 5], [1, 4, 9, 16, 100])
    assert r["spearman"] == pytest.approx(1.0)
    assert r["pearson"] < 0.9


def test_regression_constant_input_is_nan_and_errors():
    r = regression_metrics([1, 2, 3], [5, 5, 5])
    assert math.isnan(r["pearson"]) and math.isnan(r["spearman"])
    with pytest.raises(ValueError):
        regression_metrics([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        regression_metrics([1], [1])
