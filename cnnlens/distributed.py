"""Several training processes (DDP): the plan, the launch, and what each rank needs.

The stage starts its workers with torchrun's own launcher (torch.distributed.launcher.api's
elastic_launch, the engine behind `torchrun`); each worker runs the same stage command and knows it
is a worker by the LOCAL_RANK/WORLD_SIZE variables the launcher sets. The semantics are those of one
process: train.batch_size is the global batch, every rank draws the same permutation and the same
augmentation boxes from the one seeded generator and keeps its contiguous slice of each global batch
(`bounds`), DDP averages the gradients, and with train.sync_batchnorm BatchNorm normalises with the
statistics of the whole global batch.

The launcher and DDP are imported inside the functions: one process (the default) never loads them,
nor creates a process group.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass

from cnnlens.devices import device_name
from cnnlens.errors import ParamsError, StageError, disk_error_line


class WorkerFailed(StageError):
    """A rank failed: its one-line message, and its exit code (2 for a params error)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Plan:
    """How many processes, decided from train params before anything starts, and where they meet."""

    nproc_per_node: int
    nnodes: int
    node_rank: int  # this machine's index; node 0 hosts the rendezvous and writes the outputs
    rdzv_endpoint: str  # host:port of node 0; empty: a free port here (one node)

    @property
    def size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def describe(self) -> str:
        return f"{self.size} processes ({self.nnodes} node(s) x {self.nproc_per_node}), node {self.node_rank}"


def plan(
    device, *, nproc_per_node, nnodes: int, node_rank: int, rdzv_endpoint: str, backend: str, batch_size: int
) -> Plan:
    """The world size from the train params of these names (checked together, as the messages name
    them); a bad combination is a ParamsError (one line, exit code 2)."""
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    nproc = nproc_per_node
    if nproc == "auto":  # every visible GPU; on CPU (or MPS) one process
        nproc = max(gpus, 1)
    world = Plan(nproc, nnodes, node_rank, rdzv_endpoint)
    if node_rank >= nnodes:
        raise ParamsError(f"train.node_rank = {node_rank} must be below train.nnodes = {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ParamsError("train.nnodes > 1 needs train.rdzv_endpoint: host:port of node 0, reachable by all")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ParamsError(
                f"train.rdzv_endpoint = {rdzv_endpoint!r}: expected host:port, e.g. 10.0.0.1:29500"
            )
    if device.type == "cuda" and nproc > gpus:
        raise ParamsError(
            f"train.nproc_per_node = {nproc} but torch sees {gpus} GPU(s); use auto or at most {gpus}"
        )
    if world.size > 1 and device.type not in ("cuda", "cpu"):
        raise ParamsError(f"several processes need train.device cuda or cpu, not {device.type}")
    if backend == "nccl" and device.type != "cuda" and world.size > 1:
        raise ParamsError("train.backend = nccl needs CUDA; use auto or gloo on CPU")
    if batch_size % world.size:
        raise ParamsError(
            f"train.batch_size = {batch_size} (the global batch) does not divide by the world size "
            f"{world.size} (train.nnodes {nnodes} x train.nproc_per_node {nproc}); use a multiple of {world.size}"
        )
    return world


def is_worker() -> bool:
    """True in a process the launcher started (torchrun's variables are set)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(world: Plan, args: list[str], *, max_restarts: int = 0) -> None:
    """Run `python args...` as nproc_per_node workers here (and join the other nodes) with torchrun's
    elastic launcher; a failed rank becomes WorkerFailed with its message and exit code. A failed rank
    first restarts every worker, up to `max_restarts` times (they resume from the checkpoint)."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world.nnodes == 1 and not world.rdzv_endpoint:  # as `torchrun --standalone`: a free local port
        backend, endpoint, run_id, configs = "c10d", "127.0.0.1:0", str(uuid.uuid4()), {}
    else:  # as torchrun's default: node 0 hosts the store, every node states its rank
        backend, endpoint, run_id = "static", world.rdzv_endpoint, "cnnlens"
        configs = {"rank": world.node_rank}
    config = LaunchConfig(
        min_nodes=world.nnodes,
        max_nodes=world.nnodes,
        nproc_per_node=world.nproc_per_node,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=max_restarts,  # train.max_restarts; 0: a failed rank fails the stage
        monitor_interval=0.1,
    )
    # the launcher's own log lines repeat what the failed rank and WorkerFailed say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:
        rank, failure = cause(exc.failures)
        code = failure.exitcode if failure.exitcode > 0 else 1
        raise WorkerFailed(f"rank {rank} of {world.size} failed: {failure.message}", code) from None
    except SignalException:
        raise KeyboardInterrupt from None  # the launcher stopped its workers; run_main says "interrupted"
    except (RendezvousError, DistError) as exc:  # e.g. node 0 unreachable, or not started in time
        raise StageError(
            f"the ranks could not meet at {endpoint} ({type(exc).__name__}: {exc}); check that "
            "train.rdzv_endpoint is node 0's address, reachable from every node, and that all train.nnodes started"
        ) from None


def cause(failures: dict):
    """The failure to report: a rank's own error before a rank that only lost contact with it
    (record_error marks those), then the earliest."""
    return min(
        failures.items(), key=lambda kv: (kv[1].error_file_data.get("consequence", 0), kv[1].timestamp, kv[0])
    )


def lost_contact(exc: BaseException) -> bool:
    """A collective that failed because another rank went away (its own error is the cause)."""
    import torch.distributed as dist

    text = str(exc)
    return (
        isinstance(exc, dist.DistError)
        or isinstance(exc, RuntimeError)
        and ("Connection closed by peer" in text or "Connection reset by peer" in text or "NCCL" in text)
    )


@contextlib.contextmanager
def reported_errors():
    """In a worker: a failure's one line goes where the launcher reads it (record_error), so the stage
    reports this rank's error; losing the other ranks is one line too, not a traceback."""
    try:
        yield
    except Exception as exc:  # not KeyboardInterrupt: the launcher stopping this rank is no cause
        record_error(exc)
        if lost_contact(exc):
            raise StageError(
                f"lost contact with the other ranks ({str(exc).splitlines()[0][:200]})"
            ) from None
        raise


def record_error(exc: BaseException) -> None:
    """In a worker: leave the one-line message where the launcher reads it (TORCHELASTIC_ERROR_FILE)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = (
        str(exc) if isinstance(exc, StageError) else disk_error_line(exc) or f"{type(exc).__name__}: {exc}"
    )
    line = message.splitlines()[0] if message else type(exc).__name__
    with open(path, "w") as fh:
        json.dump({"message": line, "timestamp": int(time.time()), "consequence": int(lost_contact(exc))}, fh)


class World:
    """One rank's view: its rank, the world size, its device, and the collectives training needs."""

    def __init__(self, device, backend: str):
        """Join the process group (train.backend `backend`; auto: NCCL on CUDA, else gloo)."""
        import torch
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank, self.local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0":
            dist.init_process_group(backend)
        else:  # restarted (train.max_restarts): the launcher's store still holds the last attempt's keys
            store = dist.PrefixStore(f"cnnlens/attempt_{restart}", next(dist.rendezvous("env://"))[0])
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.size)
        self.dist = dist

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """This rank's (or `rank`'s) contiguous rows of a global batch of n: [lo, hi)."""
        rank = self.rank if rank is None else rank
        return n * rank // self.size, n * (rank + 1) // self.size

    def all_sum(self, *values):
        """Sums over ranks of scalar tensors (one all-reduce)."""
        import torch

        both = torch.stack([v.to(self.device, torch.float64) for v in values])
        self.dist.all_reduce(both)
        return tuple(both.unbind())

    def gather_rows(self, rows, n: int):
        """The rows every rank holds (rank order, `bounds` of n) as one tensor, on every rank."""
        import torch

        most = -(-n // self.size)
        padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        padded[: len(rows)] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.dist.all_gather(parts, padded)
        sizes = [self.bounds(n, r) for r in range(self.size)]
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes)]).cpu()

    def broadcast_buffers(self, model) -> None:
        """Rank 0's BatchNorm statistics everywhere (DDP sends them only at the start of a forward)."""
        for b in model.buffers():
            self.dist.broadcast(b, 0)

    def share_cores(self) -> None:
        """On a CPU: this machine's cores shared out among its processes (torch's threads), as torchrun does."""
        import torch

        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_size))

    def gather_objects(self, obj) -> list:
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wrap(net, world: World):
    """DDP around the module that trains (gradients averaged over ranks during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def sync_batchnorm(model, device) -> None:
    """Every BatchNorm in `model` normalises with the statistics of the global batch (in place; the
    parameters and buffers are kept, so the state_dict is unchanged). CUDA: torch's SyncBatchNorm;
    CPU, which torch's SyncBatchNorm refuses: CpuSyncBatchNorm (below)."""
    from torch import nn

    cls = nn.SyncBatchNorm if device.type == "cuda" else cpu_sync_batchnorm_class()
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, cls):
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, key, getattr(child, key))
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)


@functools.cache
def cpu_sync_batchnorm_class():
    """BatchNorm over the global batch for gloo: the per-channel count, sum and sum of squared
    deviations are summed over ranks by an all-reduce whose backward all-reduces the gradients, as
    torch's SyncBatchNorm does on CUDA (so the gradient is that of the global batch)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    class AllSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    class CpuSyncBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            if not self.training:
                return super().forward(x)
            dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
            count = AllSum.apply(torch.tensor(x.numel() / x.shape[1], dtype=x.dtype))
            mean = AllSum.apply(x.sum(dims)) / count  # two passes, as the one-process kernel
            var = AllSum.apply(((x - mean.view(shape)) ** 2).sum(dims)) / count
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                with torch.no_grad():
                    self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                    self.running_var.mul_(1 - m).add_(var * (count / (count - 1).clamp(min=1)), alpha=m)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    return CpuSyncBatchNorm


def same_params(world, digest: str, device) -> list[str]:
    """Every rank's device name; a ParamsError if the nodes were given different params (`digest`:
    model.params_digest of the params that shape the model, but train.node_rank, the one that may
    differ): ranks on different params would train different things."""
    seen = world.gather_objects((device_name(device), digest))
    if len({d for _, d in seen}) > 1:
        raise ParamsError(
            "the nodes were started with different params (seed, model.arch or train); "
            "give every node the same params.yaml, with only train.node_rank changed"
        )
    return [name for name, _ in seen]
