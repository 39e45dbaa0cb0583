"""One comparison of DVC experiments that differ in train.loss: a table, a chart and a figure.

python -m cnnlens.compare --repo demo --out demo/compare cross_entropy=loss-cross_entropy ...

Each LOSS=EXPERIMENT pair names a finished `dvc exp run`. From each experiment's commit (read
through dvc.api, outputs from the local cache) it takes plots/eval/predictions.csv, whose class
probabilities the evaluate stage computed by that loss's own rule (cnnlens.model.probabilities),
plots/saliency/quality.json and plots/saliency/arrays/<method>.npz. Writes to --out:
  comparison.md / comparison.csv  accuracy, balanced accuracy, ECE, log loss (95% bootstrap intervals
                                  over the val images), deletion/insertion AUC and pointing game of
                                  the saliency method (the saliency stage's own intervals), per loss;
  accuracy_vs_saliency.png        accuracy against the pointing game, one point per loss, interval bars;
  saliency_by_loss.png            the same val images' saliency under each loss, on one shared scale.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnnlens.cli import log, run_main
from cnnlens.errors import StageError
from cnnlens.metrics import expected_calibration_error
from cnnlens.tensors import denormalize

EVAL_METRICS = ["accuracy", "balanced_accuracy", "ece", "log_loss"]
SALIENCY_METRICS = ["deletion_auc", "insertion_auc", "pointing_game"]
BETTER = {"accuracy": "↑", "balanced_accuracy": "↑", "ece": "↓", "log_loss": "↓"}
BETTER.update(deletion_auc="↓", insertion_auc="↑", pointing_game="↑")


def eval_statistics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The four classification numbers of one set of predictions (proba N x C, rows sum to 1)."""
    pred = proba.argmax(1)
    recalls = [np.mean(pred[y_true == c] == c) for c in np.unique(y_true)]
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], 1e-7, 1)
    return {
        "accuracy": float(np.mean(pred == y_true)),
        "balanced_accuracy": float(np.mean(recalls)),
        "ece": expected_calibration_error(y_true, proba),
        "log_loss": float(-np.log(p_true).mean()),
    }


def eval_intervals(y_true: np.ndarray, proba: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """{metric: {mean, low, high, n}}: the value on all images and a 95% percentile-bootstrap
    interval from resampling the images (the same resamples for every metric and every loss)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y_true), len(y_true)) for _ in range(n_resamples)]
    boot = [eval_statistics(y_true[i], proba[i]) for i in draws]
    out = {}
    for name, value in eval_statistics(y_true, proba).items():
        low, high = np.quantile([b[name] for b in boot], [0.025, 0.975])
        out[name] = {"mean": value, "low": float(low), "high": float(high), "n": int(len(y_true))}
    return out


def predictions_arrays(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true N, proba N x C) from the evaluate stage's predictions.csv (columns p_<class>)."""
    classes = [c[2:] for c in table.columns if c.startswith("p_")]
    unknown = set(table["true"]) - set(classes)
    if unknown:
        raise StageError(f"predictions.csv: true classes {sorted(unknown)} have no p_<class> column")
    proba = table[[f"p_{c}" for c in classes]].to_numpy(np.float64)
    y_true = table["true"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return y_true, proba / proba.sum(1, keepdims=True)


def comparison_table(runs: dict[str, dict], method: str) -> pd.DataFrame:
    """One row per loss: <metric>, <metric>_low, <metric>_high for the eval and saliency metrics."""
    rows = []
    for loss, run in runs.items():
        row = {"loss": loss}
        scores = {**eval_intervals(*predictions_arrays(run["predictions"]))}
        scores.update(
            {k: run["saliency"][method][k] for k in SALIENCY_METRICS if k in run["saliency"][method]}
        )
        for name, ci in scores.items():
            row.update({name: ci["mean"], f"{name}_low": ci["low"], f"{name}_high": ci["high"]})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, method: str) -> str:
    """mean [low, high] per cell, arrows saying which way is better."""
    names = [m for m in EVAL_METRICS + SALIENCY_METRICS if m in table.columns]
    head = ["loss"] + [f"{m if m in EVAL_METRICS else method + ' ' + m} {BETTER[m]}" for m in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, r in table.iterrows():
        cells = [f"{r[m]:.3f} [{r[m + '_low']:.3f}, {r[m + '_high']:.3f}]" for m in names]
        lines.append("| " + " | ".join([r["loss"]] + cells) + " |")
    return "\n".join(lines) + "\n"


def shared_scale(maps: dict[str, torch.Tensor], percentile: float = 99.0) -> tuple[dict, float]:
    """|maps| (N x C x H x W per loss) -> max over channels, all divided by ONE value: the
    `percentile`-th percentile over every map of every loss, clipped to [0, 1]. Returns (maps, value)."""
    combined = {k: v.abs().float().amax(1) for k, v in maps.items()}
    q = float(np.percentile(torch.cat([m.flatten() for m in combined.values()]).numpy(), percentile)) or 1.0
    return {k: (m / q).clamp(0, 1) for k, m in combined.items()}, q


# ---- reading the experiments (dvc.api: git for tracked files, the local cache for outputs)


def read_run(repo: Path, rev: str, method: str) -> dict:
    """What the comparison needs from one experiment: its train.loss, predictions, saliency
    metrics and raw saliency maps (with inputs and paths)."""
    import dvc.api
    import yaml

    def read(path, mode="r"):
        return dvc.api.read(path, repo=str(repo), rev=rev, mode=mode)

    try:
        arrays = np.load(io.BytesIO(read(f"plots/saliency/arrays/{method}.npz", "rb")))
        return {
            "loss": yaml.safe_load(read("params.yaml"))["train"]["loss"],
            "predictions": pd.read_csv(io.StringIO(read("plots/eval/predictions.csv"))),
            "saliency": json.loads(read("plots/saliency/quality.json")),
            "maps": torch.from_numpy(arrays["maps"]),
            "inputs": torch.from_numpy(arrays["inputs"]),
            "paths": [str(p) for p in arrays["paths"]],
        }
    except Exception as exc:  # dvc raises many kinds; the user needs which experiment and file
        raise StageError(
            f"experiment {rev!r} in {repo}: cannot read its results ({type(exc).__name__}: {exc}); "
            "is it a finished `dvc exp run` (dvc exp show), and is the method in saliency.methods?"
        ) from exc


def read_runs(repo: Path, pairs: list[str], method: str) -> dict[str, dict]:
    """{loss: run} for LOSS=EXPERIMENT pairs; checks each experiment really trained with that loss
    and that all of them explained the same val images."""
    runs = {}
    for pair in pairs:
        loss, sep, rev = pair.partition("=")
        if not sep or not loss or not rev:
            raise StageError(f"{pair!r}: expected LOSS=EXPERIMENT, e.g. focal=loss-focal")
        run = read_run(repo, rev, method)
        if run["loss"] != loss:
            raise StageError(f"experiment {rev!r} trained with train.loss={run['loss']}, not {loss}")
        runs[loss] = run
    first = next(iter(runs.values()))["paths"]
    for loss, run in runs.items():
        if run["paths"] != first:
            raise StageError(
                f"{loss}: its saliency images differ from the others'; rerun with the same saliency params"
            )
    return runs


def main(argv=None) -> None:
    from cnnlens.figures import saliency_by_loss_figure, save_figure, tradeoff_figure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="LOSS=EXPERIMENT")
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--method", default="gradient", help="saliency method to compare (default: gradient)")
    ap.add_argument("--images", type=int, default=4, help="val images in the side-by-side figure")
    args = ap.parse_args(argv)
    runs = read_runs(args.repo, args.pairs, args.method)
    table = comparison_table(runs, args.method)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "comparison.csv", index=False)
    (args.out / "comparison.md").write_text(markdown_table(table, args.method))
    save_figure(tradeoff_figure(table.to_dict("records"), args.method), args.out / "accuracy_vs_saliency.png")
    first = next(iter(runs.values()))
    n = min(args.images, len(first["paths"]))
    maps, q = shared_scale({loss: r["maps"][:n] for loss, r in runs.items()})
    fig = saliency_by_loss_figure(
        denormalize(first["inputs"][:n]).permute(0, 2, 3, 1).numpy(),
        maps,
        ["/".join(p.split("/")[-2:]) for p in first["paths"][:n]],
        method=args.method,
        scale=q,
    )
    save_figure(fig, args.out / "saliency_by_loss.png")
    log(markdown_table(table, args.method) + f"compare: {len(runs)} losses -> {args.out}/")


if __name__ == "__main__":
    run_main(main)
