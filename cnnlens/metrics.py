"""Classification metrics from a table of predictions (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: list[str], *, ece_bins: int = 15
) -> dict:
    """The headline val metrics (metrics/eval.json); `proba` is N x C, the prediction is its argmax.
    ROC AUC is left out where it is undefined (one class present); per-class scores: per_class_table."""
    y_pred = proba.argmax(1)
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "roc_auc": roc_auc(y_true, proba),
        # -mean log p(true class), p floored at 1e-7 (scikit-learn's log_loss warns on rows that no
        # longer sum to 1 after such a floor)
        "log_loss": float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], 1e-7, 1)).mean()),
        "ece": expected_calibration_error(y_true, proba, ece_bins),
    }
    return {k: v for k, v in out.items() if v is not None}


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per class: precision, recall, F1 and support (plots/eval/per_class.csv)."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    ]


def roc_auc(y_true, proba) -> float | None:
    if len(np.unique(y_true)) < 2:
        return None  # undefined with one class present
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y_true, proba[:, 1]))
    return float(skm.roc_auc_score(y_true, proba, multi_class="ovr", labels=list(range(proba.shape[1]))))


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def expected_calibration_error(y_true, proba, bins: int = 15) -> float:
    """Guo et al. 2017: sum over equal-width confidence bins of |accuracy - confidence| x bin share."""
    table = reliability_table(y_true, proba, bins)
    n = len(y_true)
    return float(
        sum(row["count"] / n * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"])
    )


def reliability_table(y_true, proba, bins: int = 15) -> list[dict]:
    confidence = proba.max(1)
    correct = proba.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; confidence 0 would need bin 0 too
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        sel = which == i
        rows.append(
            {
                "bin_center": float((edges[i] + edges[i + 1]) / 2),
                "count": int(sel.sum()),
                "confidence": float(confidence[sel].mean()) if sel.any() else 0.0,
                "accuracy": float(correct[sel].mean()) if sel.any() else 0.0,
            }
        )
    return rows


def roc_points(y_true, proba) -> list[dict]:
    """ROC of the positive class (index 1) for two classes, micro-averaged one-vs-rest otherwise."""
    y, score = _binary_view(y_true, proba)
    fpr, tpr, _ = skm.roc_curve(y, score)
    return [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)]


def pr_points(y_true, proba) -> list[dict]:
    y, score = _binary_view(y_true, proba)
    precision, recall, _ = skm.precision_recall_curve(y, score)
    return [{"recall": float(r), "precision": float(p)} for p, r in zip(precision, recall)]


def _binary_view(y_true, proba):
    if proba.shape[1] == 2:
        return (y_true == 1).astype(int), proba[:, 1]
    onehot = np.eye(proba.shape[1], dtype=int)[y_true]
    return onehot.ravel(), proba.ravel()
