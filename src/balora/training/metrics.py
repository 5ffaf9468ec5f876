"""Metrics for classification (accuracy, balanced accuracy, macro-F1, MCC, per-class and minority-class
recall, AUROC from scores) and regression (Pearson, Spearman), on top of scikit-learn and scipy."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "regression_metrics"]


def _plain(x: Any) -> Any:
    """numpy scalars -> Python scalars, so results serialise with ``json``."""
    return x.item() if isinstance(x, np.generic) else x


def classification_metrics(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                           labels: Sequence[Hashable] | None = None,
                           scores: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy (the mean recall over the classes present), macro-F1, Matthews
    correlation, per-class recall, minority-class recall, the confusion matrix, and with ``scores``
    (one row of per-class scores per item, in ``labels`` order: logits or probabilities) the AUROC.

    ``labels`` fixes the class order (default: sorted union of both sequences); macro-F1 averages
    over exactly these classes (a class never predicted nor present scores F1 = 0). Recall of a
    class with no true examples is undefined and reported as None. The minority class is the
    label with the fewest (but at least one) true examples; ties go to the first in label order.
    ``confusion_matrix[i][j]`` counts true ``labels[i]`` predicted as ``labels[j]``.
    AUROC: two classes, of the second label's score minus the first's (a threshold-free view of how
    well the classes are separated, unaffected by where the decision boundary sits, which is what an
    imbalanced training set shifts); more classes, one-vs-rest macro over the softmax. None when a
    class has no true example (undefined).
    """
    # scikit-learn and scipy are the [report] extra; generation-only installs do without them
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    if not y_true:
        raise ValueError("no examples")
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    labels = [_plain(x) for x in labels]
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    recall = {lab: (float(cm[i, i] / support[i]) if support[i] else None)
              for i, lab in enumerate(labels)}
    present = [i for i in range(len(labels)) if support[i] > 0]
    minority = min(present, key=lambda i: (support[i], i)) if present else None
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean([recall[labels[i]] for i in present])),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "per_class_recall": recall,
        "minority_class": labels[minority] if minority is not None else None,
        "minority_recall": recall[labels[minority]] if minority is not None else None,
        "support": {lab: int(support[i]) for i, lab in enumerate(labels)},
        "labels": labels,
        "confusion_matrix": cm.tolist(),
        "n": len(y_true),
        **({"auroc": _auroc(y_true, labels, scores, support)} if scores is not None else {}),
    }


def _auroc(y_true: list, labels: list, scores: Sequence[Sequence[float]], support: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=float)
    if s.shape != (len(y_true), len(labels)):
        raise ValueError(f"scores: expected {len(y_true)} rows of {len(labels)} class scores, got shape {s.shape}")
    if (support == 0).any():
        return None
    if len(labels) == 2:
        return float(roc_auc_score([y == labels[1] for y in y_true], s[:, 1] - s[:, 0]))
    probs = np.exp(s - s.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    index = {lab: i for i, lab in enumerate(labels)}
    return float(roc_auc_score([index[y] for y in y_true], probs, multi_class="ovr", average="macro",
                               labels=list(range(len(labels)))))


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]
                       ) -> dict[str, float | int]:
    """Pearson and Spearman correlations (NaN when either side is constant, where they are
    undefined), plus MSE and MAE."""
    from scipy.stats import pearsonr, spearmanr  # the [report] extra, as above

    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got {t.shape} and {p.shape}")
    if t.size < 2:
        raise ValueError("correlations need at least 2 examples")
    # Checked here rather than left to scipy, which warns and returns NaN.
    constant = np.ptp(t) == 0 or np.ptp(p) == 0
    return {
        "pearson": float("nan") if constant else float(pearsonr(t, p)[0]),
        "spearman": float("nan") if constant else float(spearmanr(t, p)[0]),
        "mse": float(np.mean((t - p) ** 2)),
        "mae": float(np.mean(np.abs(t - p))),
        "n": int(t.size),
    }
