"""Training that survives interruption (docs/resume.md): a run killed anywhere (SIGKILL mid-epoch, during
the checkpoint write, during validation) or stopped with Ctrl-C, then rerun, writes the same bytes as an
uninterrupted run; changed inputs start over and say why; a damaged checkpoint is one line and a fresh
start; several processes resume with another world size and survive a killed worker; early stopping;
a non-finite loss stops the run with nothing written.

The stage runs as DVC runs it, in a subprocess; the kills come from a sitecustomize hook that each
process imports at start-up (HOOK), so each lands at a chosen step, write or validation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, make_prepared, make_weights_dir, run_stage, write_params
from test_distributed import SAME, TOLERANCE, launch_ranks, stage_env, tiny_net, update_mismatch

from cnnlens import checkpoint
from cnnlens.checkpoint import Store
from cnnlens.config import load_params
from cnnlens.tensors import load_split
from cnnlens.training import History, train

# 20 images in batches of 8, 8, 4: 3 steps an epoch; a checkpoint after every step (checkpoint_every 0).
# MobileNetV3-Small: a small state to write each step, and dropout, which draws from torch's global RNG.
RESUME = {**TINY_TRAIN, "epochs": 3, "crop": 16, "lr": 0.02, "checkpoint_every": 0}
MODEL = {"weights": "none", "arch": "mobilenet_v3_small"}

HOOK = """
import os, signal, stat

spec = os.environ.get("CNNLENS_TEST_KILL")  # what:n:SIGNAL, e.g. step:2:SIGKILL; KILL_RANK: that rank only
if spec and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", os.environ.get("RANK", "0")):
    what, n, name = spec.split(":")
    n, sig, seen = int(n), getattr(signal, name), [0]

    def hit():
        seen[0] += 1
        return seen[0] == n

    if what == "write":  # the n-th checkpoint write: half of it reaches the disk, then the signal
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode) and hit():
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), sig)
            real_fsync(fd)

        os.fsync = fsync
    else:  # before the n-th call of Loop.<what> (step, validate)
        import cnnlens.training

        real = getattr(cnnlens.training.Loop, what)

        def wrapped(self, *args):
            if hit():
                os.kill(os.getpid(), sig)
            return real(self, *args)

        setattr(cnnlens.training.Loop, what, wrapped)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"), n_train=20, n_val=8, size=20)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights_dir(tmp_path_factory.mktemp("weights"))


def finetune(tmp: Path, data, weights, name: str, *, kill: str | None = None, model=MODEL, **train):
    """Run the stage on RESUME params (`train` overriding) into tmp/name; `kill`: CNNLENS_TEST_KILL."""
    params = write_params(tmp / f"{name}.yaml", {"train": {**RESUME, **train}, "model": model})
    env = stage_env(HOOK, tmp, **({"CNNLENS_TEST_KILL": kill} if kill else {}))
    out = tmp / name
    paths = ("--data", data, "--weights", weights, "--params", params, "--live", out / "live")
    return run_stage("finetune", *paths, "--model", out / "models", "--metrics", out / "train.json", env=env)


def outs(folder: Path) -> dict[str, bytes]:
    """Every out file under `folder` by relative path, the timing fields left out: seconds.tsv, the
    seconds in DVCLive's metrics.json, total_seconds in train.json."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not rel.startswith(".cnnlens") and not rel.endswith("seconds.tsv"):
            found[rel] = path.read_bytes()
    for rel, timing in (
        ("train.json", ("total_seconds",)),
        ("live/metrics.json", ("seconds",)),
    ):
        values = json.loads(found[rel])
        found[rel] = json.dumps({k: v for k, v in values.items() if k not in timing}).encode()
    return found


def resumed_at(stderr: str) -> tuple[int, int] | None:
    """(epoch, step) of the `finetune: resuming from epoch E step S, ...` line, or None."""
    found = re.findall(r"^finetune: resuming from epoch (\d+) step (\d+), after ", stderr, flags=re.M)
    assert len(found) <= 1, stderr
    return tuple(map(int, found[0])) if found else None


def checkpoints(out: Path) -> list[Path]:
    root = checkpoint.folder_for(out / "models")
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# (kill, expected exit status, where the next run resumes); 3 epochs x 3 steps, a checkpoint after each
# step and at each epoch's end (checkpoint_every 0). Each attempt resumes from the one before.
CHAIN = [
    ("step:2:SIGKILL", -signal.SIGKILL, (1, 1)),  # mid-epoch: killed before its 2nd step
    ("write:3:SIGKILL", -signal.SIGKILL, (1, 3)),  # killed half-way through writing epoch 1's end
    ("step:3:SIGINT", 130, (2, 3)),  # Ctrl-C before a step: that step finishes, then the checkpoint
    ("validate:1:SIGKILL", -signal.SIGKILL, (2, 3)),  # killed after an epoch's last step, in validation
    ("validate:1:SIGINT", 130, (3, 0)),  # Ctrl-C in validation: the epoch ends, then the checkpoint
    (None, 0, None),
]


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.trajectory  # bit-identical on one machine with one kernel set
def test_killed_and_interrupted_anywhere_then_rerun_gives_the_same_bytes(tmp_path, data, weights):
    ref = finetune(tmp_path, data, weights, "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    epoch_lines = [line for line in ref.stderr.splitlines() if line.startswith("finetune: epoch ")]
    assert len(epoch_lines) == 3 and "ETA" in epoch_lines[0], ref.stderr  # stderr is no terminal here
    assert checkpoints(tmp_path / "ref") == []  # removed once the outs are committed

    resumed_from = None
    for kill, status, resumes in CHAIN:
        proc = finetune(tmp_path, data, weights, "x", kill=kill)
        assert proc.returncode == status, (kill, proc.stderr[-3000:])
        assert resumed_at(proc.stderr) == resumed_from, (kill, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if status == 130:
            epoch, step = resumes
            last = proc.stderr.strip().splitlines()[-1]
            assert last == f"error: interrupted at epoch {epoch} step {step}; rerun to resume", proc.stderr
        if status:
            assert not (tmp_path / "x" / "models").exists() and not (tmp_path / "x" / "train.json").exists()
            assert len(checkpoints(tmp_path / "x")) == 1
        resumed_from = resumes
    assert checkpoints(tmp_path / "x") == []
    assert outs(tmp_path / "x") == outs(tmp_path / "ref")

    # checkpoints do not change what is computed: a run that never writes one trains the same weights
    none = finetune(tmp_path, data, weights, "none", checkpoint_every=1e9)
    assert none.returncode == 0, none.stderr[-3000:]
    a, b = (torch.load(tmp_path / n / "models" / "model.pt", weights_only=True) for n in ("ref", "none"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_after_one_step(tmp_path, data, weights, name, **train) -> Path:
    proc = finetune(tmp_path, data, weights, name, kill="step:2:SIGKILL", **train)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (found,) = checkpoints(tmp_path / name)
    return found


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_changed_inputs_start_over_and_say_which_changed(tmp_path, data, weights):
    kill_after_one_step(tmp_path, data, weights, "x")
    # params that only decide how it runs resume: checkpoint_every, resume, nproc_per_node, ...
    proc = finetune(tmp_path, data, weights, "x", kill="step:2:SIGKILL", checkpoint_every=0.0)
    assert resumed_at(proc.stderr) == (1, 1), proc.stderr[-3000:]
    proc = finetune(tmp_path, data, weights, "x", lr=0.03)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) is None
    line = [x for x in proc.stderr.splitlines() if "not resuming" in x]
    assert len(line) == 1 and "the params (seed, model.arch or train) changed" in line[0], proc.stderr
    assert "starting from epoch 1" in line[0]
    assert checkpoints(tmp_path / "x") == []  # the stale one went with the first new checkpoint

    kill_after_one_step(tmp_path, data, weights, "y")
    other = shutil.copytree(data, tmp_path / "other-data")
    (other / "classes.json").write_text('["bees", "ants"]\n')
    proc = finetune(tmp_path, other, weights, "y")
    assert proc.returncode == 0 and resumed_at(proc.stderr) is None, proc.stderr[-3000:]
    assert "the prepared data changed" in proc.stderr, proc.stderr

    kill_after_one_step(tmp_path, data, weights, "z")
    proc = finetune(tmp_path, data, weights, "z", resume="never")
    assert proc.returncode == 0 and resumed_at(proc.stderr) is None, proc.stderr[-3000:]
    assert "train.resume = never: starting from epoch 1" in proc.stderr


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_checkpoint_is_one_line_and_a_fresh_start(tmp_path, data, weights, damage):
    state = kill_after_one_step(tmp_path, data, weights, "x") / checkpoint.STATE
    raw = bytearray(state.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 3]
    else:  # one flipped bit in the middle of the tensors: torch.load alone reads it without complaint
        raw[len(raw) // 2] ^= 0x10
    state.write_bytes(bytes(raw))
    proc = finetune(tmp_path, data, weights, "x")
    assert proc.returncode == 0 and resumed_at(proc.stderr) is None, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "cannot resume" in x]
    assert damage in line and line.endswith("starting from epoch 1"), line
    ref = finetune(tmp_path, data, weights, "ref")
    assert outs(tmp_path / "x") == outs(tmp_path / "ref"), ref.stderr[-2000:]


@pytest.mark.trajectory  # trains from random init: test-isa reruns it on SSE4.1 kernels
def test_a_non_finite_loss_stops_with_one_line_and_writes_nothing(tmp_path, data, weights):
    proc = finetune(tmp_path, data, weights, "nan", lr=1e6, model=RESNET)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    # which check sees the blow-up first (the loss of a step, or the weights at the epoch's end) depends on
    # the CPU's kernels (SSE4.1 vs AVX-512 here): either is the same one line
    assert re.match(r"error: finetune: non-finite (loss at|weights after) epoch 1 step \d+", last), last
    assert last.endswith("(train.lr = 1000000.0 may be too high); nothing was written"), last
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "nan").iterdir()) == []  # no outs, no temporaries, no checkpoint


def expected_stop(val: list[float], patience: int) -> int:
    """The epoch early stopping on val_acc (min_delta 0) stops at, from a full run's val_acc rows."""
    best, bad = None, 0
    for epoch, value in enumerate(val, 1):
        best, bad = (value, 0) if best is None or value > best else (best, bad + 1)
        if bad >= patience:
            return epoch
    return len(val)


# ResNet-18: its val accuracy moves with training (MobileNetV3-Small's stays at chance on these images)
EARLY = {"epochs": 8, "lr": 0.01, "step_size": 100, "patience": 2}
RESNET = {"weights": "none", "arch": "resnet18"}


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.trajectory
def test_early_stopping_stops_at_the_right_epoch_and_resumes_to_the_same_bytes(tmp_path, data, weights):
    full = finetune(tmp_path, data, weights, "full", model=RESNET, **{**EARLY, "patience": 0})
    assert full.returncode == 0, full.stderr[-3000:]
    tsv = (tmp_path / "full/live/plots/metrics/val_acc.tsv").read_text().splitlines()[1:]
    val = [float(row.split("\t")[1]) for row in tsv]
    stop = expected_stop(val, EARLY["patience"])
    assert 2 < stop < EARLY["epochs"], f"no plateau to stop on: {val}"
    early = finetune(tmp_path, data, weights, "early", model=RESNET, **EARLY)
    assert early.returncode == 0, early.stderr[-3000:]
    metrics = json.loads((tmp_path / "early/train.json").read_text())
    assert metrics["stopped_epoch"] == stop and metrics["stop_reason"].startswith("early stopping: val_acc")
    assert (tmp_path / "early/live/plots/metrics/val_acc.tsv").read_text().splitlines()[1:] == tsv[:stop]
    # killed in the epoch after the last improvement: the counter is 1 in the checkpoint
    kill = f"step:{3 * (stop - 1) + 2}:SIGKILL"
    proc = finetune(tmp_path, data, weights, "x", kill=kill, model=RESNET, **EARLY)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = finetune(tmp_path, data, weights, "x", model=RESNET, **EARLY)
    assert proc.returncode == 0 and resumed_at(proc.stderr) == (stop, 1), proc.stderr[-3000:]
    assert outs(tmp_path / "x") == outs(tmp_path / "early")


def test_a_stop_request_finishes_the_step_and_a_stuck_one_ends_after_its_grace(monkeypatch):
    monkeypatch.setattr(checkpoint.StopRequest, "GRACE", 0.5)
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == signal.SIGTERM  # no exception: the step goes on
        with pytest.raises(KeyboardInterrupt):
            time.sleep(30)  # a step that never ends: stopped at once after the grace
    assert signal.getsignal(signal.SIGTERM) is before
    with checkpoint.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C again: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)


def test_the_checkpoint_key_ignores_how_a_run_is_carried_out(tmp_path, data, weights):
    from types import SimpleNamespace

    from stages.finetune import checkpoint_store

    args = SimpleNamespace(data=data, weights=weights, model=tmp_path / "models")

    def folder(**train):
        return checkpoint_store(args, load_params(write_params(tmp_path / "p.yaml", {"train": train}))).dir

    base = folder()
    assert folder(nproc_per_node=2, backend="gloo", max_restarts=3, checkpoint_every=5.0) == base
    assert folder(lr=0.5) != base and folder(threads=2) != base


def test_the_code_digest_covers_exactly_the_code_deps_of_dvc_yaml():
    from test_layout import code_deps

    files = checkpoint.code_files(ROOT / "stages" / "finetune.py")
    assert {p.relative_to(ROOT).as_posix() for p in files} == code_deps("stages.finetune")


# ---------------------------------------------------------------------------------------------
# several processes


def rank_run(data_dir: str, root: str, overrides: dict, interrupt_at: int):
    """One rank (elastic_launch): train tiny_net with rank 0 keeping the checkpoint under `root`;
    rank 1 alone sends itself SIGINT before its `interrupt_at`-th step (0: never): the ranks agree to stop."""
    from cnnlens.checkpoint import Interrupted
    from cnnlens.distributed import World

    torch.set_num_threads(1)
    world = World(torch.device("cpu"), "gloo")
    if world.rank == 1 and interrupt_at:
        interrupt_after(interrupt_at)
    store = Store(root, {"test": "2 ranks"}) if world.rank == 0 else None
    try:
        model, history = fit(data_dir, overrides, world=world, store=store)
    except Interrupted as exc:
        return str(exc)
    finally:
        world.close()
    return model.state_dict(), history.epochs


def interrupt_after(n: int) -> None:
    import cnnlens.training

    real, seen = cnnlens.training.Loop.step, [0]

    def step(self, x, y):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, x, y)

    cnnlens.training.Loop.step = step


def fit(data_dir, overrides, *, world=None, store=None) -> tuple[torch.nn.Module, History]:
    from conftest import loop_options

    torch.manual_seed(0)
    model = tiny_net()
    splits = load_split(data_dir, "train"), load_split(data_dir, "val")
    options = loop_options(**overrides)
    history = train(
        model, *splits, options=options, device=torch.device("cpu"), seed=0, world=world, store=store
    )
    return model, history


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("ddp"), n_train=21, n_val=7, size=20)


@pytest.mark.integration  # slow (processes, kills): make test-all
@pytest.mark.trajectory
def test_a_checkpoint_of_two_ranks_resumes_with_two_and_with_one(tmp_path, ddp_data, one_thread):
    """SAME (tests/test_distributed.py): 2 epochs of 4 global batches of 6, 6, 6, 3. Rank 1 asks to stop
    before its 3rd step; the ranks agree one step later: the checkpoint holds epoch 1 after step 4.
    Resumed with 2 processes and with 1, both end within test_distributed's TOLERANCE of one process."""
    overrides = {**SAME, "checkpoint_every": 0}
    one, one_history = fit(str(ddp_data), overrides)
    start = tiny_net().state_dict()
    stopped = launch_ranks(2, str(ddp_data), str(tmp_path / "a"), overrides, 3, fn=rank_run)
    assert stopped[0] == stopped[1] == "interrupted at epoch 1 step 4; rerun to resume", stopped
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    two, two_epochs = launch_ranks(2, str(ddp_data), str(tmp_path / "a"), overrides, 0, fn=rank_run)[0]
    model, history = fit(str(ddp_data), overrides, store=Store(tmp_path / "b", {"test": "2 ranks"}))
    for state, epochs in ((two, two_epochs), (model.state_dict(), history.epochs)):
        mismatch = update_mismatch(one.state_dict(), state, start)
        assert mismatch < TOLERANCE, mismatch
        assert [e["epoch"] for e in epochs] == [1, 2]
        for a, b in zip(one_history.epochs, epochs):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)


KILLABLE = """
import os, time
from pathlib import Path
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import cnnlens.training

    real, seen = cnnlens.training.Loop.step, [0]

    def step(self, x, y):
        seen[0] += 1
        if seen[0] == 4:  # a checkpoint exists (after step 2): wait here to be killed
            Path(os.environ["PID_FILE"]).write_text(str(os.getpid()))
            time.sleep(300)
        return real(self, x, y)

    cnnlens.training.Loop.step = step
"""


@pytest.mark.integration  # slow (processes, kills): make test-all
def test_a_killed_worker_is_restarted_and_every_rank_resumes(tmp_path, data, weights):
    params = write_params(
        tmp_path / "p.yaml",
        {
            "train": {**TINY_TRAIN, "epochs": 2, "crop": 16, "batch_size": 4, "checkpoint_every": 0}
            | {"nproc_per_node": 2, "max_restarts": 1},
            "model": MODEL,
        },
    )
    pid_file, out = tmp_path / "pid", tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.finetune", "--data", data, "--weights", weights, "--params", params]
    cmd += ["--model", out / "models", "--metrics", out / "train.json", "--live", out / "live"]
    env = stage_env(KILLABLE, tmp_path, PID_FILE=str(pid_file))
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not pid_file.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        time.sleep(0.2)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert resumed_at(err) is not None, err[-3000:]
    metrics = json.loads((out / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["stopped_epoch"] == 2
    rows = (out / "live/plots/metrics/train_loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2, rows  # each epoch logged once
    assert checkpoints(out) == []
