"""finetune: train the classifier on the packed prepared data (the tutorial's two scenarios).

python -m stages.finetune --data data/prepared --weights data/weights --model models \
    --metrics metrics/train.json --live plots/train
"""

import dataclasses
import functools
import hashlib
import json
import os

import torch

from cnnlens import distributed
from cnnlens.cli import log, run_main
from cnnlens.config import stage_args, to_dict
from cnnlens.devices import device_name, select_device
from cnnlens.errors import ParamsError, StageError
from cnnlens.files import atomic_outputs, lock_outputs, write_json
from cnnlens.live import live_logger, log_epoch
from cnnlens.losses import make_loss
from cnnlens.model import initial_model, save_checkpoint
from cnnlens.tensors import MEAN, STD, load_classes, load_split
from cnnlens.training import LoopOptions, configure_torch, train, train_metrics


def check_cache_features(tp) -> None:
    """Cached features are the frozen backbone's outputs for the unaugmented images: a ParamsError if not."""
    if tp.cache_features and (tp.mode != "feature_extractor" or tp.augment):
        raise ParamsError(
            "train.cache_features: true needs train.mode: feature_extractor and train.augment: false "
            "(cached features cannot be augmented)"
        )


def loop_options(tp) -> LoopOptions:
    """The train params the loop reads: those LoopOptions names, and the loss they configure."""
    loss = make_loss(tp.loss, label_smoothing=tp.label_smoothing, focal_gamma=tp.focal_gamma)
    names = [f.name for f in dataclasses.fields(LoopOptions) if f.name != "loss"]
    return LoopOptions(loss=loss, **{name: getattr(tp, name) for name in names})


PATHS = ("--data", "--weights", "--model", "--metrics", "--live")
OUTS = ("--live", "--model", "--metrics")  # replaced together, the metrics last


def main(argv=None):
    if distributed.is_worker():  # one of several processes, started by launch() below
        return work(argv)
    args, p = stage_args(__doc__, PATHS, argv)
    tp = p.train
    device = select_device(tp.device)
    check_cache_features(tp)
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
            check_cache_features(p.train)
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
    configure_torch(device, p.seed, threads=tp.threads, deterministic=tp.deterministic)
    writes = world is None or world.rank == 0
    classes = load_classes(args.data)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    model, weights_info = initial_model(p.model.arch, len(classes), args.weights)
    if writes:
        log(
            f"finetune: {p.model.arch} ({weights_info.get('source')} weights), {tp.mode}, loss={tp.loss}, "
            f"{len(train_split)} train / {len(val_split)} val images, {tp.epochs} epochs on {device_name(device)}"
        )
    devices = None if world is None else distributed.same_params(world, p, device)
    fit = functools.partial(train, model, train_split, val_split, options=loop_options(tp), device=device)
    if not writes:
        fit(seed=p.seed, world=world)
        return
    live_dir, model_dir, metrics = outs
    with live_logger(live_dir) as live:
        history = fit(seed=p.seed, on_epoch=functools.partial(log_epoch, live), world=world)
    model.load_state_dict(history.best_state)
    save_checkpoint(model_dir, model, checkpoint_meta(p, classes, train_split, weights_info, history))
    write_json(metrics, train_metrics(history, device, devices))
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


def params_digest(p) -> str:
    """SHA-256 of the params that shaped this model, to tell checkpoints apart: the keys this stage
    declares in dvc.yaml (the data and the downloaded weights are deps, hashed by DVC)."""
    relevant = {"seed": p.seed, "model.arch": p.model.arch, "train": to_dict(p.train)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    run_main(main)
