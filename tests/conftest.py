"""Shared test helpers: the repo root, running a stage as a user would, tiny prepared data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cnnlens.config import PrepareParams, TrainParams
from cnnlens.packing import ShardWriter, write_index
from cnnlens.tensors import MEAN, STD, Split

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"
needs_real_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real hymenoptera data not found at {SHARED_DATA} (CI has it)"
)

# git commits inside temporary clones need an identity; never touch the user's config
os.environ.setdefault("GIT_AUTHOR_NAME", "test")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@localhost")
os.environ.setdefault("GIT_COMMITTER_NAME", "test")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@localhost")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def run_stage(module: str, *args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m stages.<module> args...` as DVC would run it (a dotted name runs that module);
    returns the finished process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module if "." in module else f"stages.{module}", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """A params file: the project's params.yaml with `overrides` merged in."""
    from cnnlens.config import merge

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(merge(base, overrides or {}), sort_keys=False))
    return path


def make_prepared(
    root: Path, n_train=16, n_val=8, size=40, classes=("ants", "bees"), seed=0, masks=False, separable=True
) -> Path:
    """A prepared dir as the prepare stage writes it (shards, index, classes.json): class 0 dark
    images, class 1 bright (trivially separable)."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = torch.arange(n) % len(classes)
        noise = torch.randint(0, 60, (n, 3, size, size), generator=g)
        base = (labels * 150).view(n, 1, 1, 1) if separable else torch.zeros(n, 1, 1, 1, dtype=torch.long)
        images = (noise + base).clamp(0, 255).to(torch.uint8)
        paths = [f"{split}/{classes[int(c)]}/{i:03d}.png" for i, c in enumerate(labels)]
        m = None
        if masks:
            m = torch.zeros(n, size, size, dtype=torch.uint8)
            m[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        splits[split] = Split(images, labels, paths, m)
    write_shards(root / "shards", splits, size)
    (root / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    return root


def write_shards(folder, splits: dict, side: int, per_shard: int | None = None, masks=True) -> None:
    """splits: {name: Split} -> shards and their index, by the shard writer the prepare stage uses;
    `per_shard` images a shard, or as many as prepare's default prepare.shard_mb holds."""
    folder.mkdir(parents=True, exist_ok=True)
    shard_bytes = PrepareParams().shard_mb * 2**20 if per_shard is None else per_shard * 3 * side * side
    entries = {}
    for name, s in splits.items():
        w = ShardWriter(folder, name, side=side, max_bytes=shard_bytes)
        for i in range(len(s)):
            mask = s.masks[i].numpy() if masks and s.masks is not None else None
            w.add(s.images[i].numpy(), mask=mask, label=int(s.labels[i]), path=s.paths[i])
        entries[name] = w.close()
    write_index(folder, side, entries)


def make_weights_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.json").write_text(
        json.dumps({"source": "none", "url": None, "arch": "resnet18", "bytes": None, "sha256": None})
    )
    return root


TINY_TRAIN = {
    "epochs": 3,
    "batch_size": 8,
    "lr": 0.05,
    "crop": 32,
    "min_scale": 0.5,
    "device": "cpu",
    "step_size": 2,
    "threads": 1,
}


def loop_options(**train):
    """training.LoopOptions from train params (the defaults, `train` overriding), as finetune builds them."""
    from stages.finetune import loop_options as from_params

    return from_params(TrainParams(**train))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and two threads on a busy two-core machine can be
    many times slower than one (OpenMP threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_batchnorm(model, bias=(-0.2, 0.2)):
    """Non-trivial BatchNorm statistics, so eval mode is not the identity and some units stay at 0."""
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(*bias)
    return model


def small_resnet(seed=0, dtype=torch.float32, bn_bias=(-0.2, 0.2), randomize_bn=True):
    """A seeded random-init ResNet18 with a 2-way head, in eval mode; with randomize_bn, non-trivial
    BatchNorm statistics (bn_bias: the range of the BN shifts, so some units stay at zero)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=2)
    if randomize_bn:
        randomize_batchnorm(model, bias=bn_bias)
    return model.to(dtype).eval()


def checkpoint_meta(crop: int, loss: str = "cross_entropy") -> dict:
    """model.json of a 2-class resnet18 checkpoint, as finetune writes it."""
    return {
        "arch": "resnet18",
        "classes": ["ants", "bees"],
        "input_size": crop,
        "loss": loss,
        "mode": "finetune",
        "mean": list(MEAN),
        "std": list(STD),
    }


def run_main_in_process(main, argv, capsys) -> tuple[int, str]:
    """Run a stage's main as its process would (cli.run_main), the locks it takes released as at the
    process's exit; returns (exit code, stderr)."""
    from cnnlens.cli import run_main
    from cnnlens.files import release_locks

    try:
        with pytest.raises(SystemExit) as stop:
            run_main(main, [str(a) for a in argv])
    finally:
        release_locks()
    return stop.value.code, capsys.readouterr().err
