"""finetune: train the classifier on the packed prepared data (the tutorial's two scenarios).

python -m stages.finetune --data data/prepared --weights data/weights --model models \
    --metrics metrics/train.json --live plots/train
"""

import dataclasses
import functools

from cnnlens import checkpoint, distributed
from cnnlens.cli import log, run_main
from cnnlens.config import stage_args, to_dict
from cnnlens.devices import device_name, select_device
from cnnlens.files import atomic_outputs, lock_outputs, write_json
from cnnlens.live import live_logger, log_epoch
from cnnlens.losses import make_loss
from cnnlens.model import checkpoint_meta, initial_model, params_digest, save_checkpoint
from cnnlens.tensors import load_classes, load_split
from cnnlens.training import LoopOptions, check_cache_features, configure_torch, summary, train, train_metrics

PATHS = ("--data", "--weights", "--model", "--metrics", "--live")
OUTS = ("--live", "--model", "--metrics")  # replaced together, the metrics last


def plan_world(tp, device) -> distributed.Plan:
    """How many processes train, and where they meet (a ParamsError for a bad combination)."""
    return distributed.plan(
        device,
        nproc_per_node=tp.nproc_per_node,
        nnodes=tp.nnodes,
        node_rank=tp.node_rank,
        rdzv_endpoint=tp.rdzv_endpoint,
        rdzv_timeout=tp.rdzv_timeout,
        backend=tp.backend,
        batch_size=tp.batch_size,
    )


def loop_options(tp) -> LoopOptions:
    """The train params the loop reads: those LoopOptions names, and the loss they configure."""
    loss = make_loss(tp.loss, label_smoothing=tp.label_smoothing, focal_gamma=tp.focal_gamma)
    names = [f.name for f in dataclasses.fields(LoopOptions) if f.name != "loss"]
    return LoopOptions(loss=loss, **{name: getattr(tp, name) for name in names})


def params_digest_of(params, *, leave_out=()) -> str:
    """model.params_digest of the params that shape the model, the keys this stage declares in dvc.yaml
    (the data and the downloaded weights are deps, hashed by DVC), but the train keys in `leave_out`."""
    train_values = {k: v for k, v in to_dict(params.train).items() if k not in leave_out}
    return params_digest({"seed": params.seed, "model.arch": params.model.arch, "train": train_values})


def checkpoint_store(args, params) -> checkpoint.Store:
    """This run's resumable checkpoint, keyed by its inputs: params, data, weights, code (docs/resume.md)."""
    digest = params_digest_of(params, leave_out=checkpoint.HOW_IT_RUNS)
    inputs = checkpoint.inputs(params=digest, data=args.data, weights=args.weights, code=__file__)
    return checkpoint.Store(checkpoint.folder_for(args.model), inputs, resume=params.train.resume == "auto")


def worker_args(args, outs) -> list[str]:
    """The stage's command line for a worker, with the outs replaced by `outs` (live, model, metrics)."""
    paths = {"--data": args.data, "--weights": args.weights, **dict(zip(OUTS, outs))}
    flags = [str(x) for flag in PATHS for x in (flag, paths[flag])]
    return ["-m", "stages.finetune", *flags, "--params", args.params]


def run_worker(argv) -> None:
    """A worker: join the process group, train its slices; rank 0 writes the outs the launcher named."""
    with distributed.reported_errors():
        args, params = stage_args(__doc__, PATHS, argv=argv)  # no locks: the launcher holds them
        with distributed.World(select_device(params.train.device), params.train.backend) as world:
            check_cache_features(params.train.cache_features, params.train.mode, params.train.augment)
            if params.train.threads == 0:  # torch's default: the cores shared among this machine's processes
                world.share_cores()
            train_and_write(
                args, params, world.device, outs=[args.live, args.model, args.metrics], world=world
            )


def train_and_write(args, params, device, *, outs, world=None) -> None:
    """Train and write the three outs (live, model, metrics) into `outs`; with a `world`, rank 0 only."""
    tp = params.train
    configure_torch(device, params.seed, threads=tp.threads, deterministic=tp.deterministic)
    writes = world is None or world.rank == 0
    classes = load_classes(args.data)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    model, weights_info = initial_model(params.model.arch, len(classes), args.weights)
    if writes:
        log(
            f"finetune: {params.model.arch} ({weights_info.get('source')} weights), {tp.mode}, loss={tp.loss}, "
            f"{len(train_split)} train / {len(val_split)} val images, {tp.epochs} epochs on {device_name(device)}"
        )
    same_on_every_node = params_digest_of(params, leave_out={"node_rank"})
    devices = None if world is None else distributed.same_params(world, same_on_every_node, device)
    fit = functools.partial(train, model, train_split, val_split, options=loop_options(tp), device=device)
    if not writes:
        fit(seed=params.seed, world=world)
        return
    live_dir, model_dir, metrics = outs
    with live_logger(live_dir) as live:
        on_epoch = functools.partial(log_epoch, live)
        history = fit(seed=params.seed, on_epoch=on_epoch, world=world, store=checkpoint_store(args, params))
    model.load_state_dict(history.best_state)
    meta = checkpoint_meta(
        arch=params.model.arch,
        classes=classes,
        crop=tp.crop,
        resize=int(train_split.images.shape[-1]),
        loss=tp.loss,
        mode=tp.mode,
        weights_info=weights_info,
        best_epoch=history.best_epoch,
        digest=params_digest_of(params),
    )
    save_checkpoint(model_dir, model, meta)
    write_json(metrics, train_metrics(history, device, devices))
    # a worker's args.model is a temporary
    log(f"finetune: {summary(history)}" + (f" -> {args.model}" if world is None else ""))


def main(argv=None):
    if distributed.is_worker():  # one of several processes, started by launch() below
        return run_worker(argv)
    args, params = stage_args(__doc__, PATHS, argv=argv)
    tp = params.train
    device = select_device(tp.device)
    check_cache_features(tp.cache_features, tp.mode, tp.augment)
    world = plan_world(tp, device)
    outs = [args.live, args.model, args.metrics]
    if world.size > 1:
        log(f"finetune: {world.describe()}")
    if world.node_rank != 0:  # node 0's rank 0 writes the outputs and the checkpoint; the others only train
        return distributed.launch(world, worker_args(args, outs), max_restarts=tp.max_restarts)
    lock_outputs(*outs)
    store = checkpoint_store(args, params).lock()  # the checkpoint rank 0 writes
    # several processes: rank 0 writes into these temporaries; they replace the outs if every rank succeeded
    with atomic_outputs(*outs) as tmps:
        if world.size == 1:
            train_and_write(args, params, device, outs=tmps)
        else:
            distributed.launch(world, worker_args(args, tmps), max_restarts=tp.max_restarts)
    store.remove()  # the outs are committed: the checkpoint has done its job


if __name__ == "__main__":
    run_main(main)
