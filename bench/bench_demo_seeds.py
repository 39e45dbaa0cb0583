"""Does the demo's training converge whatever the trajectory? Seeds stand in for other CPUs.

    python bench/bench_demo_seeds.py --data demo/data/prepared [--seeds 0-4] [--kernels native,sse41]
        [-S train.lr=0.02 -S train.epochs=7 ...]

Runs the finetune stage (outside DVC) on the demo's prepared images with params.yaml + params-demo.yaml
(+ the -S overrides) once per seed and kernel set, each in its own process, and prints per run the best
val accuracy, its epoch and the last epoch's, then the minimum per kernel set. Kernel sets:
  native  whatever this CPU gives torch and oneDNN (AVX-512 or AVX2 on x86)
  avx2    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
  sse41   ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 (the oldest x86 kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def params_for(seed: int, overrides: list[str]) -> dict:
    sys.path.insert(0, str(ROOT))
    from cnnlens.config import merge

    merged = merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((ROOT / "params-demo.yaml").read_text()),
    )
    merged["seed"] = seed
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = merged
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return merged


def train_once(data: Path, weights: Path, params: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [
            sys.executable,
            "-m",
            "stages.finetune",
            "--data",
            str(data),
            "--weights",
            str(weights),
            "--model",
            str(tmp / "models"),
            "--metrics",
            str(tmp / "train.json"),
            "--live",
            str(tmp / "live"),
            "--params",
            str(tmp / "params.yaml"),
        ]
        run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr)
        return json.loads((tmp / "train.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the demo's data/prepared")
    ap.add_argument("--weights", type=Path, help="data/weights (default: beside --data)")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--kernels", default="native,sse41")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="KEY=VALUE on the demo params")
    args = ap.parse_args()
    weights = (args.weights or args.data.parent / "weights").resolve()
    print(f"overrides: {args.overrides or 'none'}", flush=True)
    worst = {}
    for kernels in args.kernels.split(","):
        for seed in seeds(args.seeds):
            m = train_once(args.data.resolve(), weights, params_for(seed, args.overrides), KERNELS[kernels])
            acc, last = m["best_val_acc"], m["last_epoch"]
            worst[kernels] = min(worst.get(kernels, 1.0), acc)
            print(
                f"{kernels:>6} seed {seed}: best val acc {acc:.4f} at epoch {m['best_epoch']} of "
                f"{last['epoch']} (last {last['val_acc']:.4f}), {m['total_seconds']:.1f} s",
                flush=True,
            )
    print("minimum per kernel set: " + ", ".join(f"{k} {v:.4f}" for k, v in worst.items()), flush=True)


if __name__ == "__main__":
    main()
