"""The training loop over packed uint8 tensors.

The loop is the tutorial's (SGD + StepLR, keep the best-val-accuracy epoch) with the data path
replaced: the packed images live on the training device, augmentation is one batched op, and
on CUDA the model runs in bf16 autocast with channels_last. At the tutorial's batch 4 a CUDA step
is bound by kernel launches, not compute, so on CUDA (train.cuda_graphs) the whole train step -
forward, backward and the SGD update - is captured once as a CUDA graph and replayed: the
augmented batch is copied into its static input buffer, the learning rate is a tensor the graph
reads, so StepLR changes it without a re-capture.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cnnlens.checkpoint import Interrupted, Schedule, StopRequest, Store
from cnnlens.cli import log
from cnnlens.errors import ParamsError, StageError
from cnnlens.live import Progress
from cnnlens.model import autocast, get_module, head_name, predict_logits, set_module
from cnnlens.shards import Feeder, ShardedTensor, resident_budget
from cnnlens.tensors import Split, crop_boxes, eval_inputs, resample


@dataclass(frozen=True)
class LoopOptions:
    """What the training loop reads, the train params of the same names (only those; the stage fills
    it), with the loss as the callable losses.make_loss builds."""

    loss: Callable  # (logits, labels) -> scalar tensor
    mode: str  # finetune: every parameter trains; feature_extractor: the head only
    epochs: int
    batch_size: int  # the global batch: all processes together
    lr: float  # SGD, decayed by StepLR(step_size, gamma)
    momentum: float
    weight_decay: float
    step_size: int
    gamma: float
    crop: int  # the network's input side
    augment: bool  # random crops (scale min_scale..1) and flips; else the centre crop
    min_scale: float
    flip: bool
    amp: bool  # CUDA: bf16 autocast and channels_last
    cache_features: bool  # run the frozen backbone once (feature_extractor without augment)
    compile: bool  # torch.compile the model
    cuda_graphs: str  # auto | on | off: the train step as one CUDA graph
    sync_batchnorm: bool  # several processes: BatchNorm statistics over the global batch
    resident_mb: int | str  # place(): keep the images on the device within this budget (auto)
    patience: int  # early stopping: epochs without an improvement of `monitor` (0: off)
    min_delta: float  # the smallest change of `monitor` that counts as an improvement
    monitor: str  # val_acc | val_loss
    checkpoint_every: float  # seconds of training between resumable checkpoints (0: every step)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = -1.0
    best_state: dict | None = None
    images_seen: int = 0
    train_seconds: float = 0.0
    cuda_graphs: bool = False  # whether the train step ran as a captured CUDA graph
    streamed: bool = False  # whether training batches streamed from the shards (else the set was resident)
    input_wait_seconds: float = 0.0  # streamed: time the loop waited for its next batch
    best_monitor: float | None = None  # early stopping: the best value of the monitored metric so far
    bad_epochs: int = 0  # early stopping: epochs since it last improved
    stop_reason: str = ""  # why training ended (metrics/train.json)


@dataclass
class EpochState:
    """Where an epoch stands: its batch order (drawn when it starts), the steps done, the loss summed
    over the images seen and the correct predictions so far (this process's share), its seconds so far."""

    epoch: int
    order: torch.Tensor | None = None
    step: int = 0
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seconds: float = 0.0
    losses: torch.Tensor | None = None  # each step's loss, checked for non-finite values


class NonFinite(StageError):
    """The loss or the weights became NaN or infinite: training stops and nothing is written."""


def configure_torch(device: torch.device, seed: int, *, threads: int, deterministic: bool) -> None:
    """Seed torch's global RNG, set the CPU threads (0: torch's default) and, on CUDA, the kernel
    flags: fast by default; with `deterministic`, deterministic algorithms (slower)."""
    if deterministic and device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic matmuls; set before the first CUDA call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        # deterministic also disables cuDNN autotuning
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_cache_features(cache_features: bool, mode: str, augment: bool) -> None:
    """Cached features are the frozen backbone's outputs for the unaugmented images: a ParamsError if not."""
    if cache_features and (mode != "feature_extractor" or augment):
        raise ParamsError(
            "train.cache_features: true needs train.mode: feature_extractor and train.augment: false "
            "(cached features cannot be augmented)"
        )


def trainable_parameters(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """finetune: everything; feature_extractor: the head only (the backbone is frozen)."""
    head = get_module(model, head_name(model))
    if mode == "feature_extractor":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        return list(head.parameters())
    return list(model.parameters())


def set_train_mode(model: nn.Module, mode: str) -> None:
    """A frozen backbone stays in eval mode (its BatchNorm statistics frozen too); the head trains."""
    if mode == "feature_extractor":
        model.eval()
        get_module(model, head_name(model)).train()
    else:
        model.train()


def backbone_features(
    model: nn.Module, images: torch.Tensor, *, crop: int, device, amp: bool
) -> torch.Tensor:
    """What the head sees, for every image: the frozen backbone run once (train.cache_features)."""
    name = head_name(model)
    head = get_module(model, name)
    set_module(model, name, nn.Identity())
    try:
        return predict_logits(model, images, crop, device=device, amp=amp)
    finally:
        set_module(model, name, head)


@torch.no_grad()  # an in-place update of leaf parameters, as in torch.optim
def sgd_update(params, grads, bufs, *, neg_lr: torch.Tensor, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's foreach update (dampening 0, no nesterov, momentum buffers existing) with
    the learning rate a tensor (-lr), so a CUDA graph can capture it and StepLR can change it.

    torch.optim.SGD adds `alpha=-lr` (a Python number, read once at capture); here the step is
    multiplied by the tensor first: the same update up to one float rounding per step.
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        grads = bufs
    torch._foreach_add_(params, torch._foreach_mul(grads, neg_lr))


class GraphedStep:
    """The whole train step as one CUDA graph. The first WARMUP full batches run eagerly on a side
    stream (real steps; they also create SGD's momentum buffers and let cuDNN pick its kernels),
    the next is captured and from then on every full batch is replayed. Autocast's weight cache is
    off inside the graph, as torch's CUDA graph notes require."""

    WARMUP = 3

    def __init__(self, loop: "Loop"):
        self.loop, self.graph, self.warm = loop, None, 0
        self.neg_lr = torch.zeros((), device=loop.device)
        self.side = torch.cuda.Stream(loop.device)

    def set_lr(self, lr: float) -> None:
        self.neg_lr.fill_(-lr)

    def __call__(self, x, y):
        """One step: eager on the side stream while warming up, else a replay (capture first)."""
        if self.graph is None:
            self.warm += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.loop.eager_step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss, self.logits

    def capture(self, x, y) -> None:
        loop, opts = self.loop, self.loop.opts
        self.x, self.y = x.clone(), y.clone()
        params = list(loop.optimizer.param_groups[0]["params"])
        bufs = [loop.optimizer.state[p].get("momentum_buffer") for p in params] if opts.momentum else []
        loop.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=loop.use_amp, cache_enabled=False):
                self.logits = loop.net(self.x)
                self.loss = opts.loss(self.logits.float(), self.y)
            self.loss.backward()
            self.grads = [p.grad for p in params]  # graph-owned: kept alive, rewritten by every replay
            sgd_update(
                params,
                self.grads,
                bufs,
                neg_lr=self.neg_lr,
                momentum=opts.momentum,
                weight_decay=opts.weight_decay,
            )
        self.graph = graph
        # capturing ran nothing: copy and replay this batch as every later one (see __call__)


def place(train_images: ShardedTensor, val_images: ShardedTensor, *, resident_mb, device) -> tuple:
    """The packed images for training: on the device when they fit train.resident_mb (the resident
    path), else the memory-mapped shards as they are (streamed; always with auto on a CPU)."""
    need = train_images.nbytes + val_images.nbytes
    budget = resident_budget(resident_mb, device)
    if need <= budget:
        return train_images.to(device), val_images.to(device)
    if budget:  # a budget of 0 (auto on a CPU) streams by design: nothing to explain
        log(
            f"finetune: {need / 2**20:.0f} MiB of packed images > train.resident_mb budget "
            f"{budget / 2**20:.0f} MiB: streaming batches from the shards"
        )
    return train_images, val_images


class Loop:
    """What one run needs on the device: the model (compiled or not), the optimiser, the data and the
    one seeded generator that draws the permutation and the augmentation boxes. With a `world`
    (cnnlens.distributed.World, several processes) the trained module is wrapped in DDP and each
    rank keeps its slice of every global batch (train_epoch)."""

    def __init__(
        self,
        model,
        train_split: Split,
        val_split: Split,
        *,
        options: LoopOptions,
        device,
        seed: int,
        world=None,
    ):
        opts = self.opts = options
        self.model, self.device, self.world = model, device, world
        self.loss_scale = 1.0  # a rank's share of a global batch that does not split evenly (train_epoch)
        if world is not None and opts.sync_batchnorm:
            from cnnlens.distributed import sync_batchnorm

            sync_batchnorm(model, device)
        self.use_amp = opts.amp and device.type == "cuda"
        model.to(device)
        if self.use_amp:
            model.to(memory_format=torch.channels_last)
        params = trainable_parameters(model, opts.mode)
        self.optimizer = torch.optim.SGD(
            params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=opts.step_size, gamma=opts.gamma
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.cached = opts.cache_features and opts.mode == "feature_extractor" and not opts.augment
        if self.cached:
            # the frozen backbone runs once; the loop trains the head on its outputs
            self.net = get_module(model, head_name(model))
            how = {"crop": opts.crop, "device": device, "amp": opts.amp}
            self.train_x = backbone_features(model, train_split.images, **how).to(device)
            self.val_x = backbone_features(model, val_split.images, **how).to(device)
        else:
            self.net = torch.compile(model) if opts.compile else model
            self.train_x, self.val_x = place(
                train_split.images, val_split.images, resident_mb=opts.resident_mb, device=device
            )
        self.feeder = Feeder(self.train_x, device) if isinstance(self.train_x, ShardedTensor) else None
        self.train_y, self.val_y = train_split.labels.to(device), val_split.labels
        self.graphed = None
        if device.type == "cuda" and opts.cuda_graphs != "off" and not opts.compile and not self.cached:
            self.graphed = GraphedStep(self) if world is None else None  # graphs: one process only
        self.bare = self.net  # validation runs the unwrapped module on every rank's shard
        if world is not None:
            from cnnlens.distributed import wrap

            self.net = wrap(self.net, world)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, labels) of this process's rows of the global batch `idx`: cached features,
        an augmented or a centre crop. Only these rows are read (streamed: from the shards), but the
        augmentation boxes are drawn for the whole global batch, as one process draws them."""
        opts = self.opts
        lo, hi = self.rows(len(idx))
        mine = idx[lo:hi]
        if self.cached:
            return self.train_x[mine], self.train_y[mine]
        images = self.feeder.get(mine) if self.feeder is not None else self.train_x[mine]
        if opts.augment:
            side = images.shape[-1]
            boxes = crop_boxes(
                len(idx), side, side, scale=(opts.min_scale, 1.0), flip=opts.flip, generator=self.generator
            )
            x = resample(images, boxes[lo:hi], opts.crop)
        else:
            x = eval_inputs(images, opts.crop)
        return (x.contiguous(memory_format=torch.channels_last) if self.use_amp else x), self.train_y[mine]

    def eager_step(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on batch (x, y); returns (loss, logits)."""
        with autocast(self.device, self.opts.amp):
            logits = self.net(x)
            loss = self.opts.loss(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        self.optimizer.step()
        # detached: a loss or logits kept alive would keep this step's autograd graph, and with it the
        # parameters' AccumulateGrad nodes, alive into a CUDA-graph capture on another stream
        return loss.detach(), logits.detach()

    def step(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """The graphed step for full batches when graphs are on; a last, smaller batch runs eagerly
        (same update, same momentum buffers), so no image is dropped or padded."""
        g = self.graphed
        if g is None or len(y) != self.opts.batch_size:
            return self.eager_step(x, y)
        if g.graph is None and g.warm >= g.WARMUP:
            try:
                g.capture(x, y)
            except RuntimeError as exc:
                if self.opts.cuda_graphs == "on":
                    raise
                # auto: a model or loss that cannot be captured (a host sync) trains eagerly instead;
                # nothing ran during the failed capture, so this batch's eager step is its only step
                log(f"finetune: CUDA graph capture failed ({str(exc).splitlines()[0]}); training eagerly")
                self.graphed = None
                torch.cuda.synchronize()
                return self.eager_step(x, y)
        return g(x, y)

    def train_epoch(self, ep: EpochState, after_step: Callable | None = None) -> tuple[float, float]:
        """One pass over the training set in a seeded random order, from step `ep.step` on (a resumed
        epoch keeps its order and sums); `after_step(ep)` runs after each step. Returns (mean loss, accuracy)."""
        opts, device = self.opts, self.device
        set_train_mode(self.model, opts.mode)
        if self.graphed is not None:
            self.graphed.set_lr(self.optimizer.param_groups[0]["lr"])
        if ep.order is None:
            ep.order = torch.randperm(len(self.train_y), generator=self.generator)
        batches = ep.order.to(device).split(opts.batch_size)
        if self.feeder is not None:  # streaming: read this process's rows of each batch one batch ahead
            self.feeder.plan([b[slice(*self.rows(len(b)))] for b in batches[ep.step :]])
        if ep.loss_sum is None:
            ep.loss_sum, ep.correct = torch.zeros((), device=device), torch.zeros((), device=device)
        ep.losses = torch.zeros(len(batches), device=device)
        for i in range(ep.step, len(batches)):
            x, y = self.batch(batches[i])
            loss, logits = self.step(x, y)
            ep.loss_sum += loss.detach() * len(y)
            ep.correct += (logits.argmax(1) == y).sum()
            ep.losses[i] = loss.detach()
            ep.step = i + 1
            if after_step is not None:
                after_step(ep)
        total_loss, correct = self.epoch_sums(ep)
        n = len(self.train_y)
        return float(total_loss) / n, float(correct) / n

    def epoch_sums(self, ep: EpochState) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the images, correct predictions) of the epoch so far, over every process."""
        if self.world is None:
            return ep.loss_sum, ep.correct
        return self.world.all_sum(ep.loss_sum, ep.correct)

    def first_nonfinite(self, ep: EpochState) -> str | None:
        """Why the epoch's losses so far or the weights are not finite ("loss at epoch E step S"), or None."""
        bad = (~torch.isfinite(ep.losses[: ep.step])).nonzero()
        if len(bad):
            return f"loss at epoch {ep.epoch} step {int(bad[0]) + 1}"
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])
        if not bool(torch.isfinite(norms).all()):
            return f"weights after epoch {ep.epoch} step {ep.step} (a non-finite gradient)"
        return None

    def rows(self, n: int) -> tuple[int, int]:
        """This process's rows [lo, hi) of a global batch of n (all of them in one process). DDP averages
        the ranks' mean losses, so a rank whose slice is not n/world rows scales its loss by its share:
        the gradient stays the global mean."""
        world = self.world
        if world is None:
            return 0, n
        if n < world.size:
            raise ParamsError(
                f"the last batch has {n} image(s), fewer than the {world.size} processes; choose "
                f"train.batch_size so that the train set size ({len(self.train_y)}) mod it is 0 or >= {world.size}"
            )
        lo, hi = world.bounds(n)
        self.loss_scale = (hi - lo) * world.size / n
        return lo, hi

    def validate(self) -> tuple[float, float]:
        """(loss, accuracy) on the val set: no grad, centre crop (or cached features)."""
        if self.world is not None:
            return self.validate_shards()
        if self.cached:
            with torch.no_grad():
                self.net.eval()
                logits = self.net(self.val_x).float().cpu()
        else:
            logits = predict_logits(
                self.net, self.val_x, self.opts.crop, device=self.device, amp=self.opts.amp
            )
        loss = float(self.opts.loss(logits, self.val_y))
        return loss, float((logits.argmax(1) == self.val_y).float().mean())

    def validate_shards(self) -> tuple[float, float]:
        """validate() with each rank running its slice of the val set, then the logits gathered:
        every rank scores the same logits, with rank 0's BatchNorm statistics."""
        world, n = self.world, len(self.val_y)
        world.broadcast_buffers(self.model)
        lo, hi = world.bounds(n)
        if self.cached:
            with torch.no_grad():
                self.bare.eval()
                logits = self.bare(self.val_x[lo:hi]).float()
        else:
            logits = predict_logits(
                self.bare, self.val_x[lo:hi], self.opts.crop, device=self.device, amp=self.opts.amp
            )
        logits = world.gather_rows(logits, n)
        loss = float(self.opts.loss(logits, self.val_y))
        return loss, float((logits.argmax(1) == self.val_y).float().mean())


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split,
    *,
    options: LoopOptions,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
    world=None,
    store: Store | None = None,
) -> History:
    """Train `model` in place; returns the per-epoch history and the best-val-accuracy weights.
    `seed` seeds the one generator of the batch order and the augmentation; `on_epoch` gets each
    epoch's row (a resumed run's earlier rows first). With a `world` (several processes) every rank
    runs this; the history is the same on each. With a `store` (cnnlens.checkpoint.Store; rank 0's
    with several processes) the run resumes from its checkpoint and keeps one while it trains; a
    stop request (Ctrl-C, SIGTERM) writes it and raises checkpoint.Interrupted. A non-finite loss or
    weight raises NonFinite (and removes the checkpoint)."""
    loop = Loop(model, train_split, val_split, options=options, device=device, seed=seed, world=world)
    history = History()
    ep = resume(loop, history, store)
    for row in history.epochs if on_epoch else ():  # the resumed epochs' rows, logged again
        on_epoch(row)
    progress = Progress(options.epochs, first=ep.epoch, quiet=world is not None and world.rank != 0)
    try:
        with StopRequest() as stop:
            schedule = Schedule(options.checkpoint_every, stop, store=store, world=world)
            while ep.epoch <= options.epochs and not history.stop_reason:
                ep = run_epoch(loop, history, ep, schedule=schedule, on_epoch=on_epoch, progress=progress)
    except NonFinite:
        if store is not None:
            store.remove()  # the same inputs diverge again: nothing to resume
        raise
    finally:
        progress.close()
    history.stop_reason = history.stop_reason or f"trained all {options.epochs} epochs (train.epochs)"
    if store is not None and store.writes:
        log(f"finetune: {store.writes} checkpoint(s) written in {store.write_seconds:.1f} s")
    if loop.feeder is not None:
        f = loop.feeder
        f.close()
        log(
            f"finetune: streamed from the shards; waited {f.wait:.2f} s of {history.train_seconds:.1f} s for data "
            f"({f.hits} batches read ahead, {f.misses} on demand)"
        )
    return history


def run_epoch(
    loop: Loop, history: History, ep: EpochState, *, schedule: Schedule, on_epoch, progress
) -> EpochState:
    """Train and validate epoch `ep` (from its step on), record it; a checkpoint at its end when one is
    due or a stop was requested (then Interrupted). Returns the next epoch's state."""
    start = time.perf_counter()
    elapsed = lambda: ep.seconds + time.perf_counter() - start
    after = lambda ep: after_step(loop, history, ep, schedule=schedule, seconds=elapsed())
    train_loss, train_acc = loop.train_epoch(ep, after)
    lr = loop.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # resumed at an epoch's end, this process has taken no step yet
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        loop.scheduler.step()
    val_loss, val_acc = loop.validate()
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    check_finite(loop, ep)
    row = {
        "epoch": ep.epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": lr,
        "seconds": elapsed(),
    }
    record(loop, history, row)
    if on_epoch:
        on_epoch(row)
    progress.update(row)
    nxt = EpochState(ep.epoch + 1)
    if nxt.epoch > loop.opts.epochs or history.stop_reason:  # done: the outs follow, no checkpoint
        return nxt
    stop, due = schedule.at_epoch_end()
    if stop or due:
        save(loop, history, nxt, schedule=schedule, seconds=0.0)
    if stop:
        raise Interrupted(f"interrupted at epoch {nxt.epoch} step 0; rerun to resume")
    return nxt


def after_step(loop: Loop, history: History, ep: EpochState, *, schedule: Schedule, seconds: float) -> None:
    """After each step: on a CPU the loss is checked at once (.item() costs nothing there; elsewhere at
    the next checkpoint or epoch end, where the device syncs anyway); a checkpoint when one is due or a
    stop was requested, then the stop (Interrupted)."""
    if loop.device.type == "cpu" and not bool(torch.isfinite(ep.losses[ep.step - 1])):
        check_finite(loop, ep)
    stop, due = schedule.after_step()
    if stop or due:
        save(loop, history, ep, schedule=schedule, seconds=seconds)
    if stop:
        raise Interrupted(f"interrupted at epoch {ep.epoch} step {ep.step}; rerun to resume")


def check_finite(loop: Loop, ep: EpochState) -> None:
    """NonFinite if a loss of the epoch so far or a weight is NaN or infinite."""
    what = loop.first_nonfinite(ep)
    if what is not None:
        raise NonFinite(
            f"finetune: non-finite {what} (train.lr = {loop.opts.lr} may be too high); nothing was written"
        )


def record(loop: Loop, history: History, row: dict) -> None:
    """An epoch's row into the history: the best-val-accuracy weights, early stopping."""
    history.epochs.append(row)
    history.images_seen += len(loop.train_y)
    history.cuda_graphs = loop.graphed is not None and loop.graphed.graph is not None
    history.streamed = loop.feeder is not None
    history.input_wait_seconds = loop.feeder.wait if loop.feeder is not None else 0.0
    history.train_seconds += row["seconds"]
    if row["val_acc"] > history.best_val_acc:
        history.best_val_acc, history.best_epoch = row["val_acc"], row["epoch"]
        history.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in loop.model.state_dict().items()})
    opts = loop.opts
    value, sign = row[opts.monitor], 1.0 if opts.monitor == "val_acc" else -1.0
    if history.best_monitor is None or sign * (value - history.best_monitor) > opts.min_delta:
        history.best_monitor, history.bad_epochs = value, 0
    else:
        history.bad_epochs += 1
    if opts.patience and history.bad_epochs >= opts.patience:
        history.stop_reason = (
            f"early stopping: {opts.monitor} did not improve by more than {opts.min_delta} "
            f"in {opts.patience} epochs (train.patience)"
        )


def save(loop: Loop, history: History, ep: EpochState, *, schedule: Schedule, seconds: float) -> None:
    """The resumable state at `ep` (after its `ep.step` steps; 0: before the epoch) into the store (rank
    0's; every rank runs this: the epoch's sums are summed over the ranks). Only finite states are kept."""
    if ep.losses is not None:
        check_finite(loop, ep)
    sums = None if ep.loss_sum is None else torch.stack(loop.epoch_sums(ep)).cpu()
    if schedule.store is not None:
        schedule.store.save(
            {
                "model": loop.model.state_dict(),
                "optimizer": loop.optimizer.state_dict(),
                "scheduler": loop.scheduler.state_dict(),
                "generator": loop.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(loop.device) if loop.device.type == "cuda" else None,
                "history": dict(vars(history)),
                "epoch": {
                    "epoch": ep.epoch,
                    "order": ep.order,
                    "step": ep.step,
                    "sums": sums,
                    "seconds": seconds,
                },
                "world_size": 1 if loop.world is None else loop.world.size,
            }
        )
    schedule.written()


def resume(loop: Loop, history: History, store: Store | None) -> EpochState:
    """Where training starts: the store's checkpoint restored into `loop` and `history` (read by rank 0
    and sent to every rank, so no other node needs the file), or epoch 1."""
    state = store.load() if store is not None else None
    world = loop.world
    if world is not None:
        box = [state]
        world.dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is None:
        if store is not None:
            log(f"finetune: training from epoch 1 of {loop.opts.epochs}")
        return EpochState(1)
    for module, key in ((loop.model, "model"), (loop.optimizer, "optimizer"), (loop.scheduler, "scheduler")):
        module.load_state_dict(state[key])
    loop.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if loop.device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], loop.device)
    for key, value in state["history"].items():
        setattr(history, key, value)
    e = state["epoch"]
    ep = EpochState(e["epoch"], order=e["order"], step=e["step"], seconds=e["seconds"])
    if e["sums"] is not None:  # the epoch's sums so far: one process holds them, the others add theirs
        sums = e["sums"] if world is None or world.rank == 0 else torch.zeros_like(e["sums"])
        ep.loss_sum, ep.correct = sums.to(loop.device, torch.float32).unbind()
    if store is not None:
        done = history.train_seconds + ep.seconds
        log(
            f"finetune: resuming from epoch {ep.epoch} step {ep.step}, after {done:.1f} s of training "
            f"({store.file}, written by {state['world_size']} process(es))"
        )
    return ep


def summary(h: History) -> str:
    """The run in one line: the best epoch, the time, the speed."""
    return (
        f"best val_acc {h.best_val_acc:.4f} at epoch {h.best_epoch}, {h.train_seconds:.1f} s, "
        f"{h.images_seen / max(h.train_seconds, 1e-9):.0f} img/s"
    )


def train_metrics(h: History, device, devices: list[str] | None = None) -> dict:
    """metrics/train.json, the headline (every epoch's values are in the DVCLive folder, plots/train); with
    several processes also the world size."""
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
        "stopped_epoch": last["epoch"],
        "stop_reason": h.stop_reason,
        "total_seconds": round(h.train_seconds, 3),
        **cuda,
        **({"world_size": len(devices)} if devices else {}),
    }
