"""evaluate: metrics, plot data, a predictions table and a gallery of mistakes on the val split.

python -m stages.evaluate --data data/prepared --model models --metrics metrics/eval.json --plots plots/eval
"""

import numpy as np

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import select_device
from cnnlens.figures import chw_to_hwc, image_grid, save_figure
from cnnlens.files import atomic_outputs, write_csv, write_json
from cnnlens.metrics import (
    classification_metrics,
    confusion,
    per_class_table,
    pr_points,
    reliability_table,
    roc_points,
)
from cnnlens.model import load_checkpoint, predict_logits, probabilities
from cnnlens.tensors import center_crop, load_split


def predictions_table(paths, y_true, proba, *, classes) -> list[dict]:
    """One row per image: path, true and predicted class, p_<class> for each class (6 decimals), correct."""
    y_pred, rounded = proba.argmax(1), proba.round(6)
    return [
        {
            "path": path,
            "true": classes[t],
            "predicted": classes[p],
            **{f"p_{name}": rounded[i, j] for j, name in enumerate(classes)},
            "correct": t == p,
        }
        for i, (path, t, p) in enumerate(zip(paths, y_true, y_pred))
    ]


def write_plots(out, table, *, y_true, proba, ece_bins: int) -> None:
    """The plot data (DVC's plots section reads these files) and the predictions table."""
    confusion_rows = [{"path": r["path"], "actual": r["true"], "predicted": r["predicted"]} for r in table]
    write_csv(out / "confusion.csv", confusion_rows)
    write_csv(out / "predictions.csv", table)
    write_csv(out / "roc.csv", roc_points(y_true, proba))
    write_csv(out / "precision_recall.csv", pr_points(y_true, proba))
    bins = [row for row in reliability_table(y_true, proba, ece_bins) if row["count"]]  # no empty bins
    write_csv(out / "reliability.csv", bins)


def main(argv=None):
    args, params = stage_args(
        __doc__, ("--data", "--model", "--metrics", "--plots"), argv=argv, outs=("--plots", "--metrics")
    )
    ep = params.evaluate
    device = select_device(ep.device)
    model, meta = load_checkpoint(args.model)
    classes = meta["classes"]
    val = load_split(args.data, "val")

    logits = predict_logits(model.to(device), val.images, meta["input_size"], device=device)
    proba = probabilities(logits, meta["loss"]).double().numpy()
    proba /= proba.sum(1, keepdims=True)  # rows that sum to 1 in float64 (a sigmoid loss's do not)
    y_true = val.labels.numpy()
    y_pred = proba.argmax(1)
    scores = classification_metrics(y_true, proba, classes, ece_bins=ep.ece_bins)
    table = predictions_table(val.paths, y_true, proba, classes=classes)

    wrong = np.flatnonzero(y_pred != y_true)[: ep.gallery_max]
    crops = center_crop(val.images[wrong], meta["input_size"]).float() / 255
    gallery = image_grid(
        [chw_to_hwc(c) for c in crops],
        [
            f"{val.paths[i].split('/')[-1][:18]}\ntrue {classes[y_true[i]]}, "
            f"pred {classes[y_pred[i]]} ({proba[i, y_pred[i]]:.2f})"
            for i in wrong
        ],
        suptitle=f"Misclassified val images: {int((y_pred != y_true).sum())} of {len(y_true)}"
        + (f" (first {len(wrong)} shown)" if len(wrong) < (y_pred != y_true).sum() else ""),
    )

    cm = confusion(y_true, y_pred, len(classes))
    with atomic_outputs(args.plots, args.metrics) as (out, metrics):  # together, the metrics last
        out.mkdir()
        write_plots(out, table, y_true=y_true, proba=proba, ece_bins=ep.ece_bins)
        write_csv(out / "per_class.csv", per_class_table(y_true, y_pred, classes))
        save_figure(gallery, out / "misclassified.png")
        write_json(metrics, scores)
    log(
        f"evaluate: accuracy {scores['accuracy']:.4f}, balanced {scores['balanced_accuracy']:.4f}, "
        f"AUC {round(scores['roc_auc'], 4) if 'roc_auc' in scores else 'n/a'}, "
        f"ECE {scores['ece']:.4f} on {len(y_true)} val images\n"
        + "\n".join(
            f"  true {classes[i]:>10}: " + " ".join(f"{v:5d}" for v in row) for i, row in enumerate(cm)
        )
    )


if __name__ == "__main__":
    run_main(main)
