"""Resume: what checkpoints cost and what a kill costs, on the demo's finetune (docs/resume.md).

    python bench/bench_resume.py [--kills 10] [--repeats 3] [--seed 0] [--out /tmp/bench-resume.json]
    python bench/bench_resume.py --tiny --kills 2 --repeats 1       # a dry run: tiny images, a minute

1. The demo's data (params.yaml + params-demo.yaml: offline synthetic images, random init) is made once into
   a git-ignored folder under bench/ (.cache/resume) by the download and prepare stages (no DVC).
2. Overhead: finetune as DVC runs it (one child process a run), alternately with train.checkpoint_every 1e9 (no
   checkpoint) and with the default, --repeats times each, in this one invocation; the ratio of the median
   training seconds (metrics/train.json total_seconds), the checkpoints written and their seconds (the stage's
   log). Target: <= 1.02.
3. A kill at a random point: --kills times, a fresh finetune with the default params is SIGKILLed at a moment
   drawn uniformly from its training (0 .. the overhead runs' median training seconds after the stage logs
   `training from epoch 1`), then rerun. Time lost = training seconds done when
   killed - training seconds the checkpoint held ("resuming from epoch E step S, after X s of training"; all of
   it without a checkpoint); extra wall = killed run + rerun - one uninterrupted run. Every rerun's model.pt is
   compared with the uninterrupted default runs' (bit-identical on a CPU).

Prints a table; writes every number (and the load average before and after: measure on an idle machine) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnlens.config import merge, parse_params  # noqa: E402

TINY = {
    "data": {
        "synthetic": {"image_size": 48, "train_ants": 24, "train_bees": 24, "val_ants": 8, "val_bees": 8}
    },
    "prepare": {"resize": 40},
    "train": {"epochs": 3, "batch_size": 8, "crop": 32, "checkpoint_every": 1.0, "threads": 1},
}
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def stage(*args) -> None:
    subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=ENV, check=True)


def prepare(cache: Path, tiny: bool) -> Path:
    """The demo's params (with TINY for --tiny) and its prepared data and weights under `cache`."""
    params = merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((ROOT / "params-demo.yaml").read_text()),
    )
    params = merge(params, TINY) if tiny else params
    parse_params(params)
    text = yaml.safe_dump(params, sort_keys=False)
    path = cache / "params.yaml"
    if not (cache / "data/prepared").is_dir() or not path.exists() or path.read_text() != text:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        path.write_text(text)
        stage("stages.download", "data", "--out", cache / "data/raw", "--params", path)
        stage("stages.download", "weights", "--out", cache / "data/weights", "--params", path)
        prep = (
            "--raw",
            cache / "data/raw",
            "--out",
            cache / "data/prepared",
            "--report",
            cache / "data.json",
        )
        stage("stages.prepare", *prep, "--params", path)
    return path


def params_with(cache: Path, name: str, **train) -> Path:
    params = merge(yaml.safe_load((cache / "params.yaml").read_text()), {"train": train})
    path = cache / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def finetune(cache: Path, out: Path, params: Path, *, kill_after: float | None = None) -> dict:
    """One finetune child; with `kill_after`, SIGKILLed that many seconds after training started (the line
    `finetune: training from epoch 1 of N`)."""
    data = ("--data", cache / "data/prepared", "--weights", cache / "data/weights", "--params", params)
    outs = ("--model", out / "models", "--metrics", out / "train.json", "--live", out / "live")
    cmd = [sys.executable, "-m", "stages.finetune", *map(str, data + outs)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    lines, first, killed = [], None, []

    def kill():
        killed.append(time.monotonic())
        proc.send_signal(signal.SIGKILL)

    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if first is None and re.match(r"finetune: (training from|resuming from) epoch", line):
            first = time.monotonic()
            if kill_after is not None:
                threading.Timer(kill_after, kill).start()
    proc.wait()
    end = time.monotonic()
    run = {"rc": proc.returncode, "wall": end - start, "log": lines}
    if killed:
        run["trained_when_killed"] = killed[0] - first
    if proc.returncode == 0:
        run["train_seconds"] = json.loads((out / "train.json").read_text())["total_seconds"]
    for line in lines:
        if m := re.match(r"finetune: (\d+) checkpoint\(s\) written in ([\d.]+) s", line):
            run["checkpoints"], run["checkpoint_seconds"] = int(m[1]), float(m[2])
        if m := re.match(
            r"finetune: resuming from epoch (\d+) step (\d+), after ([\d.]+) s of training", line
        ):
            run["resumed"] = {"epoch": int(m[1]), "step": int(m[2]), "done": float(m[3])}
    return run


def check(run: dict, what: str) -> None:
    if run["rc"] != 0:
        sys.exit(f"bench_resume: {what} failed (exit {run['rc']}):\n" + "\n".join(run["log"][-20:]))


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / "models" / "model.pt", weights_only=True) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def overhead(cache: Path, repeats: int, *, checkpointed: Path) -> dict:
    """Alternating runs without and with checkpoints; their training seconds and the ratio of medians."""
    runs = {"none": [], "default": []}
    params = {"none": params_with(cache, "none", checkpoint_every=1e9), "default": checkpointed}
    for i in range(repeats):
        for kind in ("none", "default") if i % 2 == 0 else ("default", "none"):
            out = cache / "runs" / f"{kind}-{i}"
            shutil.rmtree(
                out, ignore_errors=True
            )  # a checkpoint left by an earlier, killed bench would resume
            run = finetune(cache, out, params[kind])
            check(run, f"the {kind} run")
            runs[kind].append(run)
            written = run.get("checkpoints", 0)
            print(f"  {kind:7s} run {i + 1}: {run['train_seconds']:.1f} s training, {written} checkpoint(s)")
    median = {k: statistics.median(r["train_seconds"] for r in v) for k, v in runs.items()}
    # each pair ran back to back, so a slow spell of the machine touches both of it
    paired = [d["train_seconds"] / n["train_seconds"] for d, n in zip(runs["default"], runs["none"])]
    # inside each checkpointed run: its training against the same training less the writes
    inside = [
        r["train_seconds"] / (r["train_seconds"] - r.get("checkpoint_seconds", 0.0)) for r in runs["default"]
    ]
    return {
        "paired_ratios": [round(r, 4) for r in paired],
        "paired_ratio_median": statistics.median(paired),
        "in_run_ratio_median": statistics.median(inside),
        "train_seconds": {k: [r["train_seconds"] for r in v] for k, v in runs.items()},
        "wall_seconds": {k: [round(r["wall"], 2) for r in v] for k, v in runs.items()},
        "checkpoints": [r.get("checkpoints", 0) for r in runs["default"]],
        "checkpoint_seconds": [r.get("checkpoint_seconds", 0.0) for r in runs["default"]],
        "ratio": median["default"] / median["none"],
        "median_train_seconds": median["default"],
        "median_wall_seconds": statistics.median(r["wall"] for r in runs["default"]),
    }


def kills(cache: Path, count: int, seed: int, span: float, wall: float, *, params: Path) -> dict:
    """`count` runs SIGKILLed at a uniform moment of training, each rerun to the end."""
    rng, trials = random.Random(seed), []
    for i in range(count):
        out = cache / "runs" / f"kill-{i}"
        shutil.rmtree(out, ignore_errors=True)
        at = rng.uniform(0, span)
        killed = finetune(cache, out, params, kill_after=at)
        rerun = finetune(cache, out, params)
        check(rerun, f"the rerun after kill {i + 1}")
        done = rerun.get("resumed", {}).get("done", 0.0)
        trial = {
            "kill_after": round(at, 2),
            "killed_rc": killed["rc"],
            "trained_when_killed": round(killed.get("trained_when_killed", 0.0), 2),
            "resumed": rerun.get("resumed"),
            "lost": round(killed.get("trained_when_killed", 0.0) - done, 2),
            "extra_wall": round(killed["wall"] + rerun["wall"] - wall, 2),
            "identical": same_weights(out, cache / "runs" / "default-0"),
        }
        trials.append(trial)
        print(
            f"  kill {i + 1}: after {at:.1f} s, {trial['lost']:.1f} s of training lost, identical {trial['identical']}"
        )
    lost = [t["lost"] for t in trials if t["killed_rc"] == -signal.SIGKILL]
    return {
        "trials": trials,
        "lost_median": statistics.median(lost) if lost else None,
        "lost_max": max(lost) if lost else None,
        "extra_wall_median": statistics.median(t["extra_wall"] for t in trials) if trials else None,
        "identical": sum(t["identical"] for t in trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="runs without and with checkpoints, each")
    ap.add_argument("--seed", type=int, default=0, help="of the kill moments")
    ap.add_argument("--tiny", action="store_true", help="a dry run on tiny images")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench/.cache/resume")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--every", type=float, help="train.checkpoint_every of the checkpointed runs (default: params')"
    )
    args = ap.parse_args()
    cache = args.cache.with_name(args.cache.name + "-tiny") if args.tiny else args.cache
    load = os.getloadavg()
    print(f"bench_resume: load average {load[0]:.2f} on {os.cpu_count()} CPUs (measure on an idle machine)")
    prepare(cache, args.tiny)
    every = {} if args.every is None else {"checkpoint_every": args.every}
    checkpointed = params_with(cache, "checkpointed", **every)
    print(
        f"overhead: finetune without checkpoints (checkpoint_every 1e9) and with {every or 'the default'}, alternately"
    )
    result = {
        "load_before": load,
        "every": args.every,
        "overhead": overhead(cache, args.repeats, checkpointed=checkpointed),
    }
    o = result["overhead"]
    print(f"kills: {args.kills} at uniform moments of the {o['median_train_seconds']:.1f} s of training")
    spans = (o["median_train_seconds"], o["median_wall_seconds"])
    result["kills"] = kills(cache, args.kills, args.seed, *spans, params=checkpointed)
    result["load_after"] = os.getloadavg()
    k = result["kills"]
    seconds = {kind: statistics.median(v) for kind, v in o["train_seconds"].items()}
    print(
        f"\n| checkpoint overhead (median training s, default / none) | {o['ratio']:.4f} "
        f"({seconds['default']:.1f} / {seconds['none']:.1f} s; "
        f"{o['checkpoints']} checkpoints in {o['checkpoint_seconds']} s) |\n"
        f"| the same, median of the back-to-back pairs | {o['paired_ratio_median']:.4f} ({o['paired_ratios']}) |\n"
        f"| inside each checkpointed run: training / (training - writes), median | {o['in_run_ratio_median']:.4f} |\n"
        f"| training redone after a SIGKILL at a random moment, median / max "
        f"| {k['lost_median']} / {k['lost_max']} s |\n"
        f"| extra wall-clock (killed run + rerun - one run), median | {k['extra_wall_median']} s |\n"
        f"| reruns bit-identical to an uninterrupted run | {k['identical']} of {len(k['trials'])} |"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
