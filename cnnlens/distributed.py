"""Several training processes (DDP): the plan, the launch, and what each rank needs.

The stage starts its workers with torchrun's own launcher (torch.distributed.launcher.api's
elastic_launch, the engine behind `torchrun`), run in a child process of the stage: the launcher waits
for the other nodes (up to train.rdzv_timeout) in torch's C++ code, which no Python signal handler
interrupts, so the stage stops the child on SIGINT or SIGTERM instead. Each worker runs the same stage
command and knows it is a worker by the LOCAL_RANK/WORLD_SIZE variables the launcher sets.

The semantics are those of one process: train.batch_size is the global batch, every rank draws the
same permutation and the same augmentation boxes from the one seeded generator and keeps its contiguous
slice of each global batch (`bounds`), DDP averages the gradients, and with train.sync_batchnorm
BatchNorm normalises with the statistics of the whole global batch.

The launcher and DDP are imported inside the functions: one process (the default) never loads them,
nor creates a process group.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

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
    rdzv_timeout: int  # seconds a node waits for the others at rdzv_endpoint

    @property
    def size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def describe(self) -> str:
        text = f"{self.size} processes ({self.nnodes} node(s) x {self.nproc_per_node}), node {self.node_rank}"
        if self.nnodes > 1:
            text += f"; waiting up to {self.rdzv_timeout} s (train.rdzv_timeout) for the nodes at {self.rdzv_endpoint}"
        return text


def plan(
    device,
    *,
    nproc_per_node,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str,
    rdzv_timeout: int,
    backend: str,
    batch_size: int,
) -> Plan:
    """The world size from the train params of these names (checked together, as the messages name
    them); a bad combination is a ParamsError (one line, exit code 2)."""
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    nproc = nproc_per_node
    if nproc == "auto":  # every visible GPU; on CPU (or MPS) one process
        nproc = max(gpus, 1)
    world = Plan(nproc, nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
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
    elastic launcher, in a child process (run_launcher): the launcher waits for the other nodes inside
    torch's C++ code, where no Python signal handler runs, so a SIGINT or SIGTERM to the stage stops the
    child instead (stop_launcher), within seconds. A failed rank becomes WorkerFailed with its message
    and exit code; ranks that cannot meet within train.rdzv_timeout, one StageError line. A failed rank
    first restarts every worker, up to `max_restarts` times (they resume from the checkpoint)."""
    read, write = os.pipe()
    try:
        child = start_launcher(world, args, write, max_restarts=max_restarts)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    try:
        code = child.wait()
    except BaseException:  # KeyboardInterrupt: Ctrl-C, or SIGTERM through cli.run_main
        stop_launcher(child)
        raise
    finally:
        outcome = read_outcome(read)
    raise_outcome(outcome, code)


def start_launcher(world: Plan, args: list[str], fd: int, *, max_restarts: int = 0) -> subprocess.Popen:
    """`python -c ... SPEC` running run_launcher in a session of its own (a Ctrl-C in the terminal
    reaches the stage alone, which stops it); it writes its outcome to the pipe end `fd`."""
    root = str(Path(__file__).resolve().parents[1])  # this cnnlens, whatever the working folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), root]))}
    env["TORCH_CPP_LOG_LEVEL"] = "FATAL"  # its C++ log repeats each connect retry; the workers keep ours
    spec = {
        "world": asdict(world),
        "max_restarts": max_restarts,
        "args": args,
        "fd": fd,
        "log_level": os.environ.get("TORCH_CPP_LOG_LEVEL"),
    }
    command = [sys.executable, "-c", "from cnnlens.distributed import run_launcher; run_launcher()"]
    return subprocess.Popen([*command, json.dumps(spec)], env=env, pass_fds=(fd,), start_new_session=True)


# seconds the launcher gets to stop its workers after SIGTERM, before SIGKILL: more than a worker's own
# grace to finish its step and write the checkpoint (checkpoint.StopRequest.GRACE), so none outlives the stage
LAUNCHER_GRACE = 40.0  # torchrun's agent itself waits up to 30 s for its workers after a SIGTERM


def stop_launcher(child: subprocess.Popen) -> None:
    """SIGTERM to the launcher: while it waits for the other nodes it dies at once (no handler yet);
    once its workers run, torch's handler stops them. After LAUNCHER_GRACE seconds, SIGKILL to its
    process group; its workers (sessions of their own) then get SIGTERM as their parent dies
    (cli.die_with_parent)."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(LAUNCHER_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def read_outcome(fd: int) -> dict:
    """What the launcher child wrote to the pipe `fd` before it ended ({} if nothing); closes `fd`."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:  # a process still holds the write end: take what is there
        pass
    finally:
        os.close(fd)
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {}


def raise_outcome(outcome: dict, code: int) -> None:
    """The launcher child's outcome as launch() reports it: nothing, WorkerFailed, StageError or
    KeyboardInterrupt."""
    if outcome.get("ok"):
        return
    if outcome.get("interrupted"):
        raise KeyboardInterrupt
    if "rank_failed" in outcome:
        raise WorkerFailed(outcome["rank_failed"], int(outcome.get("exit_code", 1)))
    if "message" in outcome:
        raise StageError(outcome["message"])
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    raise StageError(
        f"the training launcher (a child process of this stage) {how} without reporting why; "
        "see the lines above and rerun"
    )


def run_launcher() -> None:
    """The launcher child of launch(): `python -c ... SPEC` runs torchrun's elastic launcher and
    writes its outcome as JSON to the pipe SPEC names."""
    spec = json.loads(sys.argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM):  # die at once while waiting in torch's C++ code;
        signal.signal(sig, signal.SIG_DFL)  # torch installs its own handlers when it starts the workers
    from cnnlens.cli import die_with_parent

    die_with_parent()
    import torch  # noqa: F401  (it reads TORCH_CPP_LOG_LEVEL now; the workers get the stage's setting)

    os.environ.pop("TORCH_CPP_LOG_LEVEL")
    if spec["log_level"] is not None:
        os.environ["TORCH_CPP_LOG_LEVEL"] = spec["log_level"]
    outcome = elastic_run(Plan(**spec["world"]), spec["args"], max_restarts=spec["max_restarts"])
    with contextlib.suppress(OSError), os.fdopen(spec["fd"], "w") as fh:  # the stage may be gone
        json.dump(outcome, fh)


def elastic_run(world: Plan, args: list[str], *, max_restarts: int = 0) -> dict:
    """Run the workers with torchrun's elastic launcher here; the outcome as a JSON-able dict."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    timeout = world.rdzv_timeout
    if world.nnodes == 1 and not world.rdzv_endpoint:  # as `torchrun --standalone`: a free local port
        backend, endpoint, run_id = "c10d", "127.0.0.1:0", str(uuid.uuid4())
        configs = {"join_timeout": timeout, "timeout": timeout}
    else:  # as torchrun's default: node 0 hosts the store, every node states its rank
        backend, endpoint, run_id = "static", world.rdzv_endpoint, "cnnlens"
        configs = {"rank": world.node_rank, "timeout": timeout}  # the static backend's only timeout
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
        return {"rank_failed": f"rank {rank} of {world.size} failed: {failure.message}", "exit_code": code}
    except SignalException:
        return {"interrupted": True}  # the launcher stopped its workers; run_main says "interrupted"
    except (RendezvousError, DistError) as exc:  # e.g. node 0 unreachable, or not started in time
        return {"message": not_met(world, endpoint, exc)}
    return {"ok": True}


def not_met(world: Plan, endpoint: str, exc: BaseException) -> str:
    """The line for ranks that could not meet: where, how long this node waited, why, what to check."""
    why = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"node {world.node_rank} of {world.nnodes} could not meet the other nodes at {endpoint} within "
        f"train.rdzv_timeout = {world.rdzv_timeout} s ({type(exc).__name__}: {why}); check that "
        f"train.rdzv_endpoint is node 0's address, reachable from every node, that all {world.nnodes} nodes "
        "(train.nnodes) were started with the same params, or raise train.rdzv_timeout"
    )


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
