"""evaluate: metric arithmetic against hand-computed values, and the stage's files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_prepared, run_stage, write_params

from cnnlens.metrics import (
    classification_metrics,
    confusion,
    expected_calibration_error,
    per_class_table,
    pr_points,
    reliability_table,
    roc_points,
)
from cnnlens.model import build_model, save_checkpoint
from cnnlens.tensors import eval_inputs, load_split

# a fixed prediction table: 4 ants (0), 6 bees (1)
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P1 = np.array([0.1, 0.3, 0.6, 0.8, 0.9, 0.7, 0.55, 0.4, 0.95, 0.2])  # probability of bees
PROBA = np.stack([1 - P1, P1], 1)


def test_metrics_match_hand_computed_confusion_matrix():
    # predictions (p>0.5 -> bees): ants 0,0,1,1  bees 1,1,1,0,1,0
    assert confusion(Y, PROBA.argmax(1), 2).tolist() == [[2, 2], [2, 4]]
    m = classification_metrics(Y, PROBA, ["ants", "bees"], ece_bins=10)
    assert m["accuracy"] == pytest.approx(6 / 10)
    ants, bees = per_class_table(Y, PROBA.argmax(1), ["ants", "bees"])
    assert (ants["class"], ants["support"], bees["support"]) == ("ants", 4, 6)
    assert ants["precision"] == pytest.approx(2 / 4) and ants["recall"] == pytest.approx(2 / 4)
    assert bees["precision"] == pytest.approx(4 / 6) and bees["recall"] == pytest.approx(4 / 6)
    assert bees["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    # AUC = share of (bee, ant) pairs ranked correctly: count by hand
    pairs = [(b, a) for b in P1[Y == 1] for a in P1[Y == 0]]
    assert m["roc_auc"] == pytest.approx(sum((b > a) + 0.5 * (b == a) for b, a in pairs) / len(pairs))
    true_p = np.where(Y == 1, P1, 1 - P1)
    assert m["log_loss"] == pytest.approx(-np.log(true_p).mean())
    assert set(m) == {"accuracy", "balanced_accuracy", "roc_auc", "log_loss", "ece"}  # the headline only
    one_class = classification_metrics(Y[Y == 1], PROBA[Y == 1], ["ants", "bees"])
    assert "roc_auc" not in one_class  # undefined with one class: left out, not null or NaN


def random_table(seed: int, n_classes: int, *, ties: bool):
    """Labels and probabilities; rounded to 1 decimal, many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, 60)
    proba = rng.dirichlet(np.ones(n_classes), 60)
    if ties:
        proba = np.round(proba, 1) + 1e-3
        proba /= proba.sum(1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_scikit_learn_bit_for_bit(seed, n_classes, ties):
    skm = pytest.importorskip("sklearn.metrics")
    y, proba = random_table(seed, n_classes, ties=ties)
    pred, labels = proba.argmax(1), list(range(n_classes))
    m = classification_metrics(y, proba, [str(c) for c in labels])
    assert m["accuracy"] == skm.accuracy_score(y, pred)
    assert m["balanced_accuracy"] == skm.balanced_accuracy_score(y, pred)
    score = proba[:, 1] if n_classes == 2 else proba
    assert m["roc_auc"] == skm.roc_auc_score(y, score, multi_class="ovr")
    assert np.array_equal(confusion(y, pred, n_classes), skm.confusion_matrix(y, pred, labels=labels))
    rows = per_class_table(y, pred, [str(c) for c in labels])
    expected = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    columns = [[r[k] for r in rows] for k in ("precision", "recall", "f1", "support")]
    assert columns == [list(e) for e in expected]
    binary = (y == 1).astype(int) if n_classes == 2 else np.eye(n_classes, dtype=int)[y].ravel()
    score = proba[:, 1] if n_classes == 2 else proba.ravel()
    fpr, tpr, _ = skm.roc_curve(binary, score)
    assert [(r["fpr"], r["tpr"]) for r in roc_points(y, proba)] == list(zip(fpr, tpr))
    precision, recall, _ = skm.precision_recall_curve(binary, score)
    assert [(r["precision"], r["recall"]) for r in pr_points(y, proba)] == list(zip(precision, recall))


def test_a_class_never_predicted_or_absent_scores_zero_not_nan():
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])
    ants, bees, wasps = per_class_table(y, pred, ["ants", "bees", "wasps"])
    assert (bees["precision"], bees["recall"], bees["f1"]) == (0.0, 0.0, 0.0)
    assert (wasps["precision"], wasps["support"]) == (0.0, 0)
    proba = np.array([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    assert classification_metrics(y, proba, ["ants", "bees", "wasps"])["roc_auc"] == 1.0  # over ants, bees


def test_ece_by_hand():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.55 (right); 10 bins of width 0.1
    # bins: (0.8,0.9]: {0.9 right} ; (0.7,0.8]: {0.8 wrong} ; (0.6,0.7]: {0.7 right} ; (0.5,0.6]: {0.55 right}
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(y, proba, 10) == pytest.approx(expected)
    table = reliability_table(y, proba, 10)
    assert sum(r["count"] for r in table) == 4 and len(table) == 10


def test_stage_writes_metrics_plots_table_and_gallery(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", n_train=4, n_val=10, size=40)
    torch.manual_seed(0)
    meta = {"arch": "resnet18", "classes": ["ants", "bees"], "input_size": 32, "loss": "cross_entropy"}
    model = build_model("resnet18", 2).eval()
    save_checkpoint(tmp_path / "models", model, meta)
    params = write_params(tmp_path / "params.yaml", {"evaluate": {"device": "cpu"}})
    proc = run_stage(
        "evaluate",
        "--data",
        prepared,
        "--model",
        tmp_path / "models",
        "--metrics",
        tmp_path / "eval.json",
        "--plots",
        tmp_path / "plots",
        "--params",
        params,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "eval.json").read_text())
    # the same numbers from an independent forward pass
    val = load_split(prepared, "val")
    with torch.no_grad():
        proba = torch.softmax(model(eval_inputs(val.images[:], 32)), 1).numpy()
    y = val.labels.numpy()
    assert m["accuracy"] == pytest.approx(float((proba.argmax(1) == y).mean()))
    table = pd.read_csv(tmp_path / "plots" / "predictions.csv")
    assert list(table.columns) == ["path", "true", "predicted", "p_ants", "p_bees", "correct"]
    assert table.p_bees.to_numpy() == pytest.approx(proba[:, 1], abs=1e-6)
    conf = pd.read_csv(tmp_path / "plots" / "confusion.csv")
    assert list(conf.columns) == ["path", "actual", "predicted"] and len(conf) == 10
    for name in ("roc.csv", "precision_recall.csv", "reliability.csv", "misclassified.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    assert "accuracy" in proc.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", n_train=2, n_val=2, size=40)
    proc = run_stage(
        "evaluate",
        "--data",
        prepared,
        "--model",
        tmp_path / "nope",
        "--metrics",
        tmp_path / "e.json",
        "--plots",
        tmp_path / "plots",
        "--params",
        write_params(tmp_path / "p.yaml"),
    )
    assert (
        proc.returncode == 1
        and "model.json: file not found" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "plots").exists()
