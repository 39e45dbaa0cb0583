"""Several training processes (train.nproc_per_node, train.nnodes): torch.distributed on CPU with gloo.

Ranks run on 127.0.0.1, started by torch's elastic launcher (as the stage starts them). Tiny images and
models, one thread per rank, few steps: CI has two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY_TRAIN,
    loop_options,
    make_prepared,
    make_weights_dir,
    write_params,
    write_shards,
)
from dvc_helpers import copy_project, dvc, dvc_json, finished_project, free_port, set_params, stage_report
from torch import nn

from cnnlens.config import TrainParams, parse_params
from cnnlens.errors import ParamsError
from cnnlens.tensors import load_split
from cnnlens.training import train
from stages.finetune import plan_world

# A global batch of 6 over 21 images: batches 6, 6, 6, 3; the last splits 1 + 2 over two ranks, so the
# uneven-slice loss scaling runs too. Augmentation on (random boxes and flips from the one generator).
# The images resident in memory (resident_mb), as the streaming test below compares against.
SAME = {
    **TINY_TRAIN,
    "epochs": 2,
    "batch_size": 6,
    "crop": 16,
    "lr": 0.02,
    "step_size": 10,
    "sync_batchnorm": True,
    "resident_mb": 1024,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"), n_train=21, n_val=7, size=20)


def tiny_net(seed: int = 0) -> nn.Module:
    """Two conv + BatchNorm blocks and a Linear head: small and well conditioned (float summation order
    moves its weights by ~1e-7, not by the ~1e-2 a random-init ResNet-18 on 16 px crops shows)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def train_rank(data_dir: str, overrides: dict, slicing: str):
    """One rank (run by elastic_launch in its own process): train tiny_net; return the weights, history
    and the rows this rank read from sharded training images. slicing "same": every rank takes rank 0's
    slice, the bug the comparison must catch."""
    from cnnlens.distributed import World
    from cnnlens.shards import ShardedTensor

    torch.set_num_threads(1)
    world = World(torch.device("cpu"), TrainParams(**overrides).backend)
    if slicing == "same":
        bounds = World.bounds  # rank 0's rows wherever a rank asks for its own
        World.bounds = lambda self, n, rank=None: bounds(self, n, 0 if rank is None else rank)
    train_split, val_split = load_split(data_dir, "train"), load_split(data_dir, "val")
    read = []
    if isinstance(train_split.images, ShardedTensor):  # count what this rank reads of the train shards
        gather = train_split.images.gather
        train_split.images.gather = lambda idx, out=None: (
            read.append(len(idx.reshape(-1))) or gather(idx, out)
        )
    torch.manual_seed(0)
    model = tiny_net()
    history = train(
        model,
        train_split,
        val_split,
        options=loop_options(**overrides),
        device=world.device,
        seed=0,
        world=world,
    )
    world.close()
    return model.state_dict(), history.epochs, sum(read)


def launch_ranks(n: int, *args, fn=None) -> dict:
    """Run `fn(*args)` (default: train_rank) as n local ranks with torchrun's launcher; {rank: result}."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
    )
    return elastic_launch(config, fn or train_rank)(*args)


def one_process(data_dir, overrides):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_net()
    splits = load_split(data_dir, "train"), load_split(data_dir, "val")
    history = train(model, *splits, options=loop_options(**overrides), device=torch.device("cpu"), seed=0)
    return model.state_dict(), history.epochs


def update_mismatch(one, two, start) -> float:
    """max |(w2 - w0) - (w1 - w0)| / max |w1 - w0| over every float tensor (weights and BN statistics):
    the difference of the two runs relative to how far training moved the weights."""
    keys = [k for k, v in start.items() if v.is_floating_point()]
    diff = max(float((two[k] - one[k]).abs().max()) for k in keys)
    moved = max(float((one[k] - start[k]).abs().max()) for k in keys)
    assert moved > 1e-3, "training did not move the weights: nothing is compared"
    return diff / moved


# float32 summation order (per-rank partial sums of 3 rows instead of one sum of 6) changes each reduction
# by a few ulps (~1e-7 relative); over these 8 SGD steps on a small, well-conditioned net the two runs'
# updates differ by 3.4e-7 (AVX2) and 4.5e-7 (SSE4.1 kernels) of their size. Both ranks training on the
# same half of each batch gives 2.1e-1; dropping the uneven last batch's loss share gives 2.6e-2. 1e-4
# sits ~200x above the noise and ~250x below the smallest bug seen.
TOLERANCE = 1e-4


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.trajectory
@pytest.mark.parametrize("slicing", ["rank", "same"])
def test_two_ranks_with_sync_batchnorm_equal_one_process(data, slicing):
    start = tiny_net().state_dict()
    single, single_epochs = one_process(str(data), SAME)
    results = launch_ranks(2, str(data), SAME, slicing)
    two, two_epochs, _ = results[0]
    mismatch = update_mismatch(single, two, start)
    print(f"slicing {slicing}: update mismatch {mismatch:.2e}")  # shown with pytest -s
    if slicing == "same":  # the comparison detects a slicing bug
        assert mismatch > 100 * TOLERANCE, mismatch
        return
    assert mismatch < TOLERANCE, mismatch
    other = results[1][0]  # DDP kept the ranks' weights identical
    assert all(torch.equal(two[k], other[k]) for k in two)
    for a, b in zip(single_epochs, two_epochs):  # the same history: global loss, accuracy, validation
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.trajectory
def test_two_streaming_ranks_read_only_their_rows_and_equal_one_process(data, tmp_path):
    """The same run with the images streamed from shards (resident_mb 0): each rank reads only its rows of
    every global batch (together: the train set once per epoch), and the result still equals one process."""
    splits = {name: load_split(str(data), name) for name in ("train", "val")}
    write_shards(tmp_path / "shards", splits, 20, 4, masks=False)
    (tmp_path / "classes.json").write_bytes((data / "classes.json").read_bytes())
    streamed = {**SAME, "resident_mb": 0}
    start = tiny_net().state_dict()
    single, single_epochs = one_process(str(data), SAME)  # resident, in one process
    results = launch_ranks(2, str(tmp_path), streamed, "rank")
    assert [results[r][2] for r in (0, 1)] == [2 * (3 + 3 + 3 + 1), 2 * (3 + 3 + 3 + 2)]  # 2 epochs: 6,6,6,3
    mismatch = update_mismatch(single, results[0][0], start)
    assert mismatch < TOLERANCE, mismatch
    for a, b in zip(single_epochs, results[0][1]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)


def test_world_size_is_checked_before_anything_starts(tmp_path):
    cpu = torch.device("cpu")
    assert plan_world(TrainParams(), cpu).size == 1
    assert plan_world(TrainParams(nproc_per_node="auto"), cpu).size == 1  # auto: every GPU; none here
    assert plan_world(TrainParams(nproc_per_node=2, batch_size=4), cpu).size == 2
    bad = {
        "does not divide by the world size 3": dict(nproc_per_node=3, batch_size=4),
        "node_rank = 2 must be below train.nnodes = 2": dict(nnodes=2, node_rank=2, rdzv_endpoint="h:1"),
        "needs train.rdzv_endpoint": dict(nnodes=2, batch_size=4),
        "expected host:port": dict(nnodes=2, batch_size=4, rdzv_endpoint="nohost"),
        "nccl needs CUDA": dict(nproc_per_node=2, backend="nccl"),
    }
    for message, values in bad.items():
        with pytest.raises(ParamsError, match=message) as err:
            plan_world(TrainParams(**values), cpu)
        assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert parse_params({"train": {"nproc_per_node": "auto"}}).train.nproc_per_node == "auto"
    with pytest.raises(ParamsError, match="expected auto or an integer"):
        parse_params({"train": {"nproc_per_node": "two"}})


def test_each_rank_takes_its_slice_and_its_share_of_the_loss():
    from types import SimpleNamespace

    from cnnlens.distributed import World
    from cnnlens.training import Loop

    y = torch.arange(5)
    rows, scales = [], []
    for rank in range(2):
        loop = SimpleNamespace(world=SimpleNamespace(rank=rank, size=2, bounds=None), train_y=torch.zeros(21))
        loop.world.bounds = World.bounds.__get__(loop.world)
        lo, hi = Loop.rows(loop, len(y))
        rows.append(y[lo:hi].tolist())
        scales.append(loop.loss_scale)
    assert rows == [[0, 1], [2, 3, 4]]  # contiguous, disjoint, covering the global batch
    assert scales == [2 * 2 / 5, 3 * 2 / 5]  # DDP's mean of (scale x rank mean) = the global mean
    loop = SimpleNamespace(world=SimpleNamespace(rank=0, size=4), train_y=torch.zeros(21))
    loop.world.bounds = World.bounds.__get__(loop.world)
    with pytest.raises(ParamsError, match="fewer than the 4 processes"):
        Loop.rows(loop, 3)


def stage_cmd(data, weights, out: Path, params: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stages.finetune",
        *("--data", data, "--weights", weights, "--params", params),
        *("--model", out / "models", "--metrics", out / "train.json", "--live", out / "live"),
    ]


def stage_env(hook: str | None = None, tmp: Path | None = None, **extra) -> dict:
    """The stage's environment; `hook`: Python run at start-up of every process (a sitecustomize.py)."""
    path = [str(ROOT)]
    if hook:
        site = tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(textwrap.dedent(hook))
        path.insert(0, str(site))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


@pytest.fixture
def stage(tmp_path, data):
    weights = make_weights_dir(tmp_path / "w")

    def make(name: str, **train):
        params = write_params(
            tmp_path / f"{name}.yaml",
            {"train": {**TINY_TRAIN, "epochs": 1, "crop": 16, **train}, "model": {"weights": "none"}},
        )
        return stage_cmd(data, weights, tmp_path / name, params)

    return make


def no_outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


FAIL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import cnnlens.training
    from cnnlens.errors import StageError

    def broken(self, *args):
        raise StageError("rank 1 broke on purpose")

    cnnlens.training.Loop.train_epoch = broken
"""


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_a_failing_rank_fails_the_stage_with_its_message_and_no_output(tmp_path, stage):
    cmd = stage("failing", nproc_per_node=2, batch_size=8)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=stage_env(FAIL_RANK_1, tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: rank 1 broke on purpose" in proc.stderr  # the rank's own line
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: rank 1 of 2 failed: rank 1 broke on purpose", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert no_outputs(tmp_path / "failing") == []  # no outs, no temporaries


HANG = """
import os
if os.environ.get("RANK") is not None:
    import time
    from pathlib import Path
    import cnnlens.training

    def hang(self, *args):
        Path(os.environ["PIDS"], os.environ["RANK"]).write_text(str(os.getpid()))
        time.sleep(120)

    cnnlens.training.Loop.train_epoch = hang
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_stage_leaves_no_workers(tmp_path, stage, sig):
    """SIGKILL: the launcher and then the workers get SIGTERM as their parent dies. SIGTERM: the stage
    stops its launcher, which stops the workers, and says "interrupted"."""
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = stage("killed", nproc_per_node=2, batch_size=8)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=stage_env(HANG, tmp_path, PIDS=str(pids)), stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 240
        while len(list(pids.iterdir())) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pids.iterdir()]
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers outlived the killed stage"
        if sig == signal.SIGTERM:
            err = proc.stderr.read().decode()
            assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-3000:]
            assert no_outputs(tmp_path / "killed") == []  # no temporaries, no locks
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_two_nodes_on_one_machine_complete_an_epoch(tmp_path, stage):
    endpoint = f"127.0.0.1:{free_port()}"
    common = dict(nnodes=2, rdzv_endpoint=endpoint, batch_size=8)
    nodes = [
        subprocess.Popen(
            stage(f"node{rank}", node_rank=rank, **common),
            cwd=ROOT,
            env=stage_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errs = [n.communicate(timeout=300)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    metrics = json.loads((tmp_path / "node0" / "train.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["stopped_epoch"] == 1
    assert (tmp_path / "node0" / "models" / "model.pt").is_file()
    assert no_outputs(tmp_path / "node1") == []  # only node 0 writes


def test_rdzv_timeout_is_a_positive_number_of_seconds():
    assert TrainParams().rdzv_timeout == 300
    assert parse_params({"train": {"rdzv_timeout": 3}}).train.rdzv_timeout == 3
    for bad in (0, -5, "soon", 2.5, None):
        with pytest.raises(ParamsError, match="train.rdzv_timeout"):
            parse_params({"train": {"rdzv_timeout": bad}})


def lonely_node(stage, name: str, **train) -> tuple[list[str], str]:
    """Node 1 of 2, with nobody at its endpoint (a free port on 127.0.0.1): the stage command, the endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    return stage(name, nnodes=2, node_rank=1, rdzv_endpoint=endpoint, batch_size=8, **train), endpoint


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_a_node_nobody_meets_stops_after_rdzv_timeout(tmp_path, stage):
    """Before: no train.rdzv_timeout; torch's default wait of 900 s, twice, silent."""
    cmd, endpoint = lonely_node(stage, "lonely", rdzv_timeout=3)
    began = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "waiting up to 3 s (train.rdzv_timeout)" in lines[0], proc.stderr[-3000:]
    assert lines[1].startswith("error: node 1 of 2 could not meet the other nodes at " + endpoint), lines
    assert "within train.rdzv_timeout = 3 s" in lines[1], lines
    # two interpreter starts (the stage, its launcher) and the 3 s wait, on a busy two-core machine
    assert took < 3 + 30, took
    assert no_outputs(tmp_path / "lonely") == []


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_waiting_node_stops_within_seconds_on_a_signal(tmp_path, stage, sig):
    """Before: the wait ran in torch's C++ code in the stage's own process, where no Python signal
    handler runs: SIGINT, then SIGTERM took effect only when the wait ended (~14.5 minutes)."""
    cmd, _ = lonely_node(stage, "waiting")  # the default train.rdzv_timeout: minutes
    proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(), stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # printed just before the launch
        assert first.startswith("finetune: 2 processes"), first
        time.sleep(2)
        launcher = children(proc.pid)
        proc.send_signal(sig)
        began = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - began < 10
        rest = proc.stderr.read().strip().splitlines()
        assert proc.returncode == 130 and rest == ["interrupted"], (proc.returncode, rest)
        deadline = time.monotonic() + 10
        while any(alive(c) for c in launcher) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launcher and not any(alive(c) for c in launcher), "the launcher outlived the stage"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert no_outputs(tmp_path / "waiting") == []


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_dvc_repro_runs_finetune_with_two_processes(tmp_path_factory, tmp_path):
    # the tiny project test_dvc.py builds once per session; here only finetune reruns, with 2 processes
    project = copy_project(finished_project(tmp_path_factory)[0], tmp_path / "project")
    set_params(project, **{"train.nproc_per_node": 2})
    out = dvc(project, "repro", "finetune").stdout
    assert stage_report(out)["ran"] == {"finetune"}, out[-3000:]
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2
    assert (project / "models" / "model.pt").is_file()
    assert dvc_json(project, "status", "finetune") == {}  # what DVC recorded is what is on disk
