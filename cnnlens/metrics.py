"""Classification metrics from a table of predictions, in numpy.

Each equals scikit-learn's function of the same name bit for bit (tests/test_evaluate.py compares them);
not scikit-learn itself, whose import costs the evaluate stage about a second.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: list[str], *, ece_bins: int = 15
) -> dict:
    """The headline val metrics (metrics/eval.json); `proba` is N x C, the prediction is its argmax.
    ROC AUC is left out where it is undefined (one class present); per-class scores: per_class_table."""
    y_pred = proba.argmax(1)
    out = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, len(classes)),
        "roc_auc": roc_auc(y_true, proba),
        # -mean log p(true class), p floored at 1e-7 (scikit-learn's log_loss warns on rows that no
        # longer sum to 1 after such a floor)
        "log_loss": float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], 1e-7, 1)).mean()),
        "ece": expected_calibration_error(y_true, proba, ece_bins),
    }
    return {k: v for k, v in out.items() if v is not None}


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per class: precision, recall, F1 and support (plots/eval/per_class.csv)."""
    matrix = confusion(y_true, y_pred, len(classes))
    tp, predicted, support = np.diag(matrix), matrix.sum(0), matrix.sum(1)
    precision, recall = _divide(tp, predicted), _divide(tp, support)
    f1 = _divide(2 * tp, predicted + support)
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    ]


def _divide(a, b) -> np.ndarray:
    """a / b as floats, 0 where b is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(len(a), dtype=float)
    np.divide(a, b, out=out, where=b != 0)
    return out


def balanced_accuracy(y_true, y_pred, n_classes: int) -> float:
    """The mean recall over the classes present in y_true."""
    matrix = confusion(y_true, y_pred, n_classes)
    present = matrix.sum(1) > 0
    return float(np.mean(np.diag(matrix)[present] / matrix.sum(1)[present]))


def roc_auc(y_true, proba) -> float | None:
    """ROC AUC of the positive class for two classes; one-vs-rest, macro-averaged, otherwise."""
    if len(np.unique(y_true)) < 2:
        return None  # undefined with one class present
    if proba.shape[1] == 2:
        return _auc(*roc_curve(y_true == 1, proba[:, 1]))
    present = np.unique(y_true)  # a class without val images has no ROC (scikit-learn raises there)
    return float(np.mean([_auc(*roc_curve(y_true == c, proba[:, c])) for c in present]))


def _auc(fpr, tpr) -> float:
    """The trapezoid rule, summed as numpy.trapezoid sums it."""
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Rows: the true class, columns: the predicted one."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _counts_by_threshold(y, score):
    """False and true positives at each distinct score, highest first, and the scores."""
    order = np.argsort(score, kind="mergesort")[::-1]
    score, y = score[order], y[order]
    last = np.r_[np.where(np.diff(score))[0], y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    return 1 + last - tps, tps, score[last]


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0), without the points collinear with their neighbours."""
    fps, tps, _ = _counts_by_threshold(np.asarray(y, dtype=bool), score)
    if len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1]


def precision_recall_curve(y, score) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at each distinct score, lowest first, then (1, 0)."""
    fps, tps, _ = _counts_by_threshold(np.asarray(y, dtype=bool), score)
    precision = _divide(tps, tps + fps)
    recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    return np.r_[precision[::-1], 1], np.r_[recall[::-1], 0]


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
    fpr, tpr = roc_curve(y, score)
    return [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)]


def pr_points(y_true, proba) -> list[dict]:
    y, score = _binary_view(y_true, proba)
    precision, recall = precision_recall_curve(y, score)
    return [{"recall": float(r), "precision": float(p)} for p, r in zip(precision, recall)]


def _binary_view(y_true, proba):
    if proba.shape[1] == 2:
        return (y_true == 1).astype(int), proba[:, 1]
    onehot = np.eye(proba.shape[1], dtype=int)[y_true]
    return onehot.ravel(), proba.ravel()
