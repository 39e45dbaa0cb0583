"""Large datasets (BENCHMARKS.md, ## Large datasets): prepare and train over packed shards.

    python bench/bench_shards.py prepare --raw RAW --out OUT [--set prepare.copy_images=false ...]
    python bench/bench_shards.py train --data OUT --resident-mb 0|auto|legacy|MiB [--steps N] [--crop 64]
    python bench/bench_shards.py epoch --data OUT --out DIR [--set train.crop=64 ...]

`prepare` runs the stage (python -m stages.prepare) as a child and reports its wall time and peak
RSS (the child's ru_maxrss). `--old` runs the prepare of git revision e074623 (one train.pt, every
image in memory) instead, for comparison. `train` runs each setting in a fresh child process (so
peak RSS is that setting's alone): a random-init ResNet18, SGD, one epoch's random order, for
--steps batches (0: the whole epoch), timing only the steps (after 3 warm-up steps) and reporting
images/s, the seconds spent waiting for the next batch (streamed) and the child's peak RSS.
`epoch` runs the finetune stage itself (python -m stages.finetune, random init, one epoch unless --set
says otherwise) as a child: its wall time, peak RSS and what it wrote to metrics/train.json.
`--resident-mb legacy` loads the data as one in-memory split, as before the shards (needs train.pt,
written by `prepare --old`). Random init: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OLD = "e074623"  # the last revision before the shards


def params_file(sets: list[str]) -> Path:
    import yaml

    from cnnlens.config import merge

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in sets:
        key, value = item.split("=", 1)
        tree: dict = {}
        node = tree
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
        params = merge(params, tree)
    path = Path(tempfile.mkdtemp()) / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_child(cmd: list[str], env=None) -> tuple[subprocess.CompletedProcess, float, float]:
    """A stage as a child process: (the finished process, its wall seconds, the children's peak RSS in MB);
    exits with the child's stderr if it failed."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr)
    return proc, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10


def run_prepare(args) -> dict:
    params = params_file(args.set)
    cmd = [sys.executable, "-m", "stages.prepare"]
    if args.old:
        old = Path(tempfile.mkdtemp()) / "prepare_old.py"
        old.write_text(
            subprocess.run(
                ["git", "show", f"{OLD}:stages/prepare.py"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        cmd = [sys.executable, str(old)]
    cmd += [
        "--raw",
        str(args.raw),
        "--out",
        str(args.out),
        "--report",
        str(args.out) + ".json",
        "--params",
        str(params),
    ]
    proc, seconds, peak = run_child(cmd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    report = json.loads(Path(str(args.out) + ".json").read_text())
    return {
        "what": "prepare" + (f" ({OLD})" if args.old else ""),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "images": report["train_images"] + report["val_images"],
        "sets": args.set,
    }


def run_epoch(args) -> dict:
    """The finetune stage as a child on prepared data: wall time, peak RSS, its train.json."""
    params = params_file(["model.weights=none", "train.epochs=1", *args.set])
    weights = args.out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    (weights / "weights.json").write_text(json.dumps({"source": "none", "arch": "resnet18"}))
    metrics = args.out / "train.json"
    cmd = [sys.executable, "-m", "stages.finetune", "--data", str(args.data), "--weights", str(weights)]
    cmd += ["--model", str(args.out / "model"), "--metrics", str(metrics), "--live", str(args.out / "live")]
    proc, seconds, peak = run_child([*cmd, "--params", str(params)])
    train = json.loads(metrics.read_text())
    return {
        "what": "finetune stage",
        "wall_s": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "log": [line for line in proc.stderr.splitlines() if line.startswith("finetune")],
        "sets": args.set,
        "train_json": train,
    }


def build_loop(data: Path, setting: str, args):
    """A training Loop (random-init ResNet18) over `data` with resident_mb `setting`, and its epoch's batches."""
    import torch

    from cnnlens.config import TrainParams
    from cnnlens.model import build_model
    from cnnlens.tensors import Split, load_split
    from cnnlens.training import Loop, configure_torch
    from stages.finetune import loop_options

    if setting == "legacy":  # the whole split in memory, as before the shards

        def load(split):
            blob = torch.load(data / f"{split}.pt", weights_only=True)
            return Split(blob["images"], blob["labels"], blob["paths"], None)

    else:
        load = lambda split: load_split(data, split)  # noqa: E731
    tp = TrainParams(
        crop=args.crop,
        batch_size=args.batch_size,
        lr=0.01,
        device="cpu",
        threads=args.threads,
        resident_mb="auto" if setting in ("legacy", "auto") else int(setting),
        min_scale=0.35,
    )
    device = torch.device("cpu")
    configure_torch(device, 0, threads=tp.threads, deterministic=tp.deterministic)
    options = loop_options(tp)
    loop = Loop(
        build_model("resnet18", 2), load("train"), load("val"), options=options, device=device, seed=0
    )
    loop.model.train()
    batches = list(torch.randperm(len(loop.train_y), generator=loop.generator).split(tp.batch_size))
    if loop.feeder is not None:
        loop.feeder.plan(batches)
    return loop, batches


def paired_training(args) -> dict:
    """Runs in the child: every --pair SETTING:DATA as its own loop in this one process, their steps
    taken in turn (A1 B1 C1 A2 B2 ...), so each setting sees the same machine state; per-step times."""
    loops = []
    for pair in args.pair:
        setting, data = pair.split(":", 1)
        loops.append((pair, *build_loop(Path(data), setting, args)))
    steps = min(len(b) for _, _, b in loops)
    steps = steps if args.steps == 0 else min(args.steps + 3, steps)
    seconds = {name: [] for name, _, _ in loops}
    for i in range(steps):
        for name, loop, batches in loops:
            start = time.perf_counter()
            loop.step(*loop.batch(batches[i]))
            if i >= 3:  # after 3 warm-up steps
                seconds[name].append(time.perf_counter() - start)
    base = sum(seconds[loops[0][0]])
    return {
        "timed_steps": steps - 3,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "threads": __import__("torch").get_num_threads(),
        "images_per_s": {k: round((steps - 3) * args.batch_size / sum(v), 2) for k, v in seconds.items()},
        "time_vs_first": {k: round(sum(v) / base, 4) for k, v in seconds.items()},
        "peak_rss_mb_all": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10),
    }


def one_training(args) -> dict:
    """Runs in the child: one setting, --steps steps of one epoch's order."""
    import torch

    began = time.perf_counter()
    loop, batches = build_loop(args.data, args.resident_mb, args)
    setup = time.perf_counter() - began
    steps = len(batches) if args.steps == 0 else min(args.steps + 3, len(batches))
    n, wait0 = 0, 0.0
    for i in range(steps):
        if i == 3:  # warm-up done: time from here
            start, wait0 = time.perf_counter(), loop.feeder.wait if loop.feeder else 0.0
        idx = batches[i]
        loop.step(*loop.batch(idx))
        n += len(idx) if i >= 3 else 0
    seconds = time.perf_counter() - start
    wait = (loop.feeder.wait - wait0) if loop.feeder else 0.0
    return {
        "resident_mb": args.resident_mb,
        "streamed": loop.feeder is not None,
        "train_images": len(loop.train_y),
        "timed_steps": steps - 3,
        "timed_images": n,
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "input_wait_s": round(wait, 3),
        "setup_s": round(setup, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10),
        "crop": args.crop,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], help="params override, e.g. prepare.resize=128")
    p.add_argument("--old", action="store_true", help=f"the prepare of {OLD} (one train.pt)")
    e = sub.add_parser("epoch")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="a scratch folder for the stage's outputs")
    e.add_argument("--set", action="append", default=[], help="params override, e.g. train.crop=64")
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, help="the prepared folder (not with --pair)")
    t.add_argument(
        "--resident-mb",
        action="append",
        default=[],
        help="0 (stream) | auto | legacy | MiB (resident); repeatable",
    )
    t.add_argument("--steps", type=int, default=0, help="timed batches (0: the whole epoch)")
    t.add_argument("--crop", type=int, default=64)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    t.add_argument(
        "--pair",
        action="append",
        default=[],
        help="SETTING:DATA (e.g. legacy:OLD, 0:NEW, 4096:NEW); repeatable: all in one process, steps in turn",
    )
    args = ap.parse_args()
    if args.cmd in ("prepare", "epoch"):
        print(json.dumps((run_prepare if args.cmd == "prepare" else run_epoch)(args)))
        return
    if args.pair:
        print(json.dumps(paired_training(args)))
        return
    if args.one:
        args.resident_mb = args.resident_mb[0]
        print(json.dumps(one_training(args)))
        return
    for setting in args.resident_mb or ["auto"]:
        cmd = [
            sys.executable,
            __file__,
            "train",
            "--one",
            "--data",
            str(args.data),
            "--resident-mb",
            setting,
            "--steps",
            str(args.steps),
            "--crop",
            str(args.crop),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout.strip() if proc.returncode == 0 else proc.stderr, flush=True)


if __name__ == "__main__":
    main()
