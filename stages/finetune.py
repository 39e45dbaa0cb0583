"""finetune: train the classifier on the packed prepared data (the tutorial's two scenarios).

python -m stages.finetune --data data/prepared --weights data/weights --model models \
    --metrics metrics/train.json --live plots/train
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from cnnlens import distributed
from cnnlens.cli import ParamsError, StageError, lock_outputs, log, run_main, stage_args
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
OUTS = ("--live", "--model", "--metrics")  # replaced together, the metrics last


def main(argv=None):
    if distributed.is_worker():  # one of several processes, started by launch() below
        return work(argv)
    args, p = stage_args(__doc__, PATHS, argv)
    tp = p.train
    device = select_device(tp.device)
    check(tp, device)
    world = distributed.plan(tp, device)
    outs = [args.live, args.model, args.metrics]
    if world.size == 1:
        lock_outputs(*outs)
        with atomic_outputs(*outs) as tmps:
            run(args, p, device, tmps)
        return
    log(
        f"finetune: {world.size} processes ({tp.nnodes} node(s) x {world.nproc_per_node}), node {tp.node_rank}"
    )
    if tp.node_rank != 0:  # node 0's rank 0 writes the outputs; the other nodes only train
        distributed.launch(tp, world, worker_args(args, outs))
        return
    lock_outputs(*outs)
    # the workers' rank 0 writes into these temporaries; they replace the outs only if every rank succeeded
    with atomic_outputs(*outs) as tmps:
        distributed.launch(tp, world, worker_args(args, tmps))


def worker_args(args, outs) -> list[str]:
    """The stage's command line for a worker, with the outs replaced by `outs` (live, model, metrics)."""
    paths = {"--data": args.data, "--weights": args.weights, **dict(zip(OUTS, outs))}
    return [
        "-m",
        "stages.finetune",
        *(str(x) for flag in PATHS for x in (flag, paths[flag])),
        "--params",
        args.params,
    ]


def work(argv) -> None:
    """A worker: join the process group, train its slices; rank 0 writes the outs the launcher named.
    A failure's one line goes where the launcher reads it, so the stage reports this rank's error."""
    try:
        args, p = stage_args(__doc__, PATHS, argv)  # no locks: the launcher holds them
        world = distributed.World(p.train, select_device(p.train.device))
        try:
            check(p.train, world.device)
            if p.train.threads == 0 and world.device.type == "cpu":  # share the cores, as torchrun does
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
            run(args, p, world.device, [args.live, args.model, args.metrics], world)
        finally:
            world.close()
    except Exception as exc:  # not KeyboardInterrupt: the launcher stopping this rank is no cause
        distributed.record_error(exc)
        if distributed.lost_contact(exc):  # one line, not a traceback: the failed rank says why
            raise StageError(
                f"lost contact with the other ranks ({str(exc).splitlines()[0][:200]})"
            ) from None
        raise


def run(args, p, device, outs, world=None) -> None:
    """Train and write the three outs (live, model, metrics) into `outs`; with a `world`, rank 0 only."""
    tp = p.train
    configure(tp, device, p.seed)
    writes = world is None or world.rank == 0
    classes = load_classes(args.data)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    model, weights_info = initial_model(p.model.arch, len(classes), args.weights)
    if writes:
        log(
            f"finetune: {p.model.arch} ({weights_info.get('source')} weights), {tp.mode}, loss={tp.loss}, "
            f"{len(train_split)} train / {len(val_split)} val images, {tp.epochs} epochs on {device_name(device)}"
        )
    devices = None if world is None else same_params(world, p, device)
    if not writes:
        train(model, train_split, val_split, tp, device, p.seed, None, world)
        return
    live_dir, model_dir, metrics = outs
    with live_logger(live_dir) as live:

        def on_epoch(row):
            for key, value in row.items():
                if key != "epoch":
                    live.log_metric(key, value, plot=True)
            live.next_step()

        history = train(model, train_split, val_split, tp, device, p.seed, on_epoch, world)
    model.load_state_dict(history.best_state)
    save_checkpoint(model_dir, model, checkpoint_meta(p, classes, train_split, weights_info, history))
    write_json(metrics, summary(history, device, devices))
    log(
        f"finetune: best val_acc {history.best_val_acc:.4f} at epoch {history.best_epoch}, "
        f"{history.train_seconds:.1f} s, {history.images_seen / history.train_seconds:.0f} img/s"
        + (f" -> {args.model}" if world is None else "")  # a worker's args.model is a temporary
    )


def checkpoint_meta(p, classes, train_split, weights_info, history) -> dict:
    tp = p.train
    return {
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


def summary(h: History, device, devices: list[str] | None = None) -> dict:
    """metrics/train.json; with several processes also the world size and every rank's device."""
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
        **({"world_size": len(devices), "devices": devices} if devices else {}),
    }


def same_params(world, p, device) -> list[str]:
    """Every rank's device name; a ParamsError if the nodes were given different params (only
    train.node_rank may differ): ranks on different params would train different things."""
    train = {k: v for k, v in to_dict(p.train).items() if k != "node_rank"}
    digest = hashlib.sha256(json.dumps([p.seed, p.model.arch, train], sort_keys=True).encode()).hexdigest()
    seen = world.gather_objects((device_name(device), digest))
    if len({d for _, d in seen}) > 1:
        raise ParamsError(
            "the nodes were started with different params (seed, model.arch or train); "
            "give every node the same params.yaml, with only train.node_rank changed"
        )
    return [name for name, _ in seen]


def params_digest(p) -> str:
    """SHA-256 of the params that shaped this model, to tell checkpoints apart: the keys this stage
    declares in dvc.yaml (the data and the downloaded weights are deps, hashed by DVC)."""
    relevant = {"seed": p.seed, "model.arch": p.model.arch, "train": to_dict(p.train)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    run_main(main)
