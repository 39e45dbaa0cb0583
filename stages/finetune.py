"""finetune: train the classifier on the packed prepared data (the tutorial's two scenarios).

python -m stages.finetune --data data/prepared --weights data/weights --model models \
    --metrics metrics/train.json --live plots/train
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from cnnlens.cli import ParamsError, log, run_main, stage_args
from cnnlens.config import device_name, select_device, to_dict
from cnnlens.files import atomic_outputs, write_json
from cnnlens.model import initial_model, save_checkpoint
from cnnlens.tensors import MEAN, STD, load_classes, load_split
from cnnlens.training import History, configure, train


def check(tp, device):
    if tp.cache_features and (tp.mode != "feature_extractor" or tp.augment):
        raise ParamsError(
            "train.cache_features: true needs train.mode: feature_extractor and train.augment: false "
            "(cached features cannot be augmented)"
        )
    if tp.deterministic and device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic matmuls; set before the first CUDA call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


PATHS = ("--data", "--weights", "--model", "--metrics", "--live")


def main(argv=None):
    args, p = stage_args(__doc__, PATHS, argv, outs=("--model", "--live", "--metrics"))
    tp = p.train
    device = select_device(tp.device)
    check(tp, device)
    configure(tp, device, p.seed)

    classes = load_classes(args.data)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    model, weights_info = initial_model(p.model.arch, len(classes), args.weights)
    log(
        f"finetune: {p.model.arch} ({weights_info.get('source')} weights), {tp.mode}, loss={tp.loss}, "
        f"{len(train_split)} train / {len(val_split)} val images, {tp.epochs} epochs on {device_name(device)}"
    )

    # the three outs are replaced together, the metrics last
    with atomic_outputs(args.live, args.model, args.metrics) as (live_dir, model_dir, metrics):
        with live_logger(live_dir) as live:

            def on_epoch(row):
                for key, value in row.items():
                    if key != "epoch":
                        live.log_metric(key, value, plot=True)
                live.next_step()

            history = train(model, train_split, val_split, tp, device, p.seed, on_epoch)
        model.load_state_dict(history.best_state)
        meta = {
            "arch": p.model.arch,
            "classes": classes,
            "mean": MEAN,
            "std": STD,
            "input_size": tp.crop,
            "resize": int(train_split.images.shape[-1]),
            "loss": tp.loss,
            "mode": tp.mode,
            "weights_source": weights_info.get("source"),
            "weights_sha256": weights_info.get("sha256"),
            "best_epoch": history.best_epoch,
            "params_digest": params_digest(p),
        }
        save_checkpoint(model_dir, model, meta)
        write_json(metrics, summary(history, device))
    log(
        f"finetune: best val_acc {history.best_val_acc:.4f} at epoch {history.best_epoch}, "
        f"{history.train_seconds:.1f} s, {history.images_seen / history.train_seconds:.0f} img/s -> {args.model}"
    )


class PlainLive:
    """The files DVCLive writes for log_metric(plot=True) + next_step(), without dvclive: one
    plots/metrics/<key>.tsv per metric (`step<TAB>key` rows) and metrics.json with the last values.
    Used where dvclive is not installed (the GPU box); the plots in dvc.yaml read the same files."""

    def __init__(self, root):
        self.root, self.step, self.rows, self.last = Path(root), 0, {}, {}

    def log_metric(self, key, value, plot=True):
        self.rows.setdefault(key, []).append(f"{self.step}\t{value}")
        self.last[key] = value

    def next_step(self):
        folder = self.root / "plots" / "metrics"
        folder.mkdir(parents=True, exist_ok=True)
        for key, rows in self.rows.items():
            (folder / f"{key}.tsv").write_text("\n".join([f"step\t{key}", *rows]) + "\n")
        (self.root / "metrics.json").write_text(json.dumps({**self.last, "step": self.step}, indent=4))
        self.step += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def live_logger(live_dir):
    """DVCLive when installed (imported here: it is slow to import), else PlainLive."""
    try:
        from dvclive import Live
    except ImportError:
        log("finetune: dvclive not installed; writing its per-epoch TSV/JSON files directly")
        return PlainLive(live_dir)
    return Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)


def summary(h: History, device) -> dict:
    last = h.epochs[-1]
    cuda = {}
    if device.type == "cuda":  # CPU metrics keep their keys (and bytes) as before
        cuda = {
            "cuda_graphs": h.cuda_graphs,
            "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        }
    return {
        "best_val_acc": h.best_val_acc,
        "best_epoch": h.best_epoch,
        "last_epoch": {k: last[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")},
        "total_seconds": round(h.train_seconds, 3),
        "images_per_second": round(h.images_seen / max(h.train_seconds, 1e-9), 2),
        "device": device_name(device),
        **cuda,
    }


def params_digest(p) -> str:
    """SHA-256 of the params that shaped this model, to tell checkpoints apart: the keys this stage
    declares in dvc.yaml (the data and the downloaded weights are deps, hashed by DVC)."""
    relevant = {"seed": p.seed, "model.arch": p.model.arch, "train": to_dict(p.train)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    run_main(main)
