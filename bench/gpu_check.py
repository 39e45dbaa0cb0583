"""The whole GPU check in one run (bench/gpu_check.sh calls this; see docs/gpu.md).

    python bench/gpu_check.py --device cuda --data .gpu/hymenoptera_data --out $OUT
    python bench/gpu_check.py --device cpu --tiny          # the CPU dry run

Steps, in order; a failed step is recorded and the next one runs, so one run gives all the evidence:
  1. tests:    pytest -m cuda tests/test_cuda.py (they skip with a reason without CUDA);
  2. pipeline: the six stages in dvc.yaml order on the real images with the tutorial's params from
               random init (model.weights: none, data.source: the local ImageFolder). DVC is NOT
               used (the GPU box has no dvc): each stage runs as `python -m stages.X` with the
               command line of dvc.yaml, with dvc, dvclive and captum made unimportable;
  3. bench:    bench/bench_train.py: the tutorial's loop vs ours at batch 4 (CUDA graphs, and
               without them) and at batch 32 with the lr scaled linearly, 3 seeds;
  4. saliency: gradient saliency for every val image, timed (the model from step 2).
Writes into --out: summary.json, summary.txt and gpu_check.tar.gz (logs, metrics/*.json, bench JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys, runpy; sys.modules.update(dvc=None, dvclive=None, captum=None); "
# Seconds each step may take, so that the whole run ends within 8 minutes on the GPU box.
# The bench step gets what is left of TOTAL once the saliency step's share is set aside.
BUDGET = {"tests": 90, "pipeline": 120, "bench": 300, "saliency": 40, "total": 450}
# GPU_CHECK_BUDGET="pipeline=170,total=330" and GPU_CHECK_BENCH="--only finetune ..." adjust a rerun.
BUDGET.update(
    {
        k: float(v)
        for k, v in (kv.split("=") for kv in os.environ.get("GPU_CHECK_BUDGET", "").split(",") if kv)
    }
)
TINY_BUDGET = {"tests": 300, "pipeline": 900, "bench": 900, "saliency": 300, "total": 3000}

TINY = {  # a CPU dry run: few images, small crops, few epochs; the same code paths
    "prepare": {"resize": 48},
    "train": {"epochs": 2, "crop": 32, "step_size": 1},
    "saliency": {
        "num_images": 2,
        "quality_images": 4,
        "quality_steps": 4,
        "smoothgrad_samples": 2,
        "ig_steps": 4,
        "bootstrap": 20,
        "randomization": False,
        "before_after": False,
    },
    "activations": {"num_images": 1, "layers": ["stem", "layer4"], "max_maps": 4},
}


def run(cmd, log: Path, timeout: float, cwd=ROOT) -> dict:
    """Run one command, its stdout+stderr into `log`; returns rc and wall seconds (rc 124: timeout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run(
                list(map(str, cmd)), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            f.write(f"\n!! timed out after {timeout:.0f} s\n")
    seconds = round(time.perf_counter() - start, 3)
    print(f"   rc={rc} {seconds:.1f} s  ({log.name})", file=sys.stderr, flush=True)
    return {"rc": rc, "seconds": seconds}


def tiny_data(src: Path, dst: Path, per_class=(6, 4)) -> Path:
    """The first few images of each class (sorted names): a CPU-sized ImageFolder."""
    for split, n in zip(("train", "val"), per_class):
        for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


def write_params(work: Path, data: Path, device: str, tiny: bool) -> Path:
    """params.yaml + the run's overrides, merged and validated by `python -m cnnlens.config merge`."""
    over = {
        "data": {"source": str(data.resolve())},
        "model": {"weights": "none"},  # random init: the GPU box has no internet
        "train": {"device": device},
        "saliency": {"device": device},
        "activations": {"device": device},
    }
    if tiny:
        for key, value in TINY.items():
            over[key] = {**over.get(key, {}), **value}
    (work / "overrides.yaml").write_text(yaml.safe_dump(over, sort_keys=False))
    out = work / "params.yaml"
    cmd = [
        sys.executable,
        "-m",
        "cnnlens.config",
        "merge",
        ROOT / "params.yaml",
        work / "overrides.yaml",
        "-o",
        out,
    ]
    subprocess.run(list(map(str, cmd)), cwd=ROOT, check=True)
    return out


def stage_commands() -> list[tuple[str, list[str]]]:
    """(stage name, argv) in dvc.yaml order, from dvc.yaml itself."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, spec in stages.items():
        argv = shlex.split(" ".join(spec["cmd"].split()))
        if argv[:2] != ["python", "-m"]:
            raise SystemExit(f"dvc.yaml stage {name}: unexpected cmd {spec['cmd']!r}")
        out.append((name, argv[2:]))
    return out


def pipeline(work: Path, params: Path, logs: Path, budget: float) -> dict:
    """Every stage as DVC would run it (same argv, cwd = a scratch project), without DVC."""
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    deadline, stages = time.perf_counter() + budget, {}
    for name, (module, *args) in stage_commands():
        print(f"-- stage {name}", file=sys.stderr, flush=True)
        code = (
            BLOCK
            + f"sys.argv = [{module!r}] + sys.argv[1:]; runpy.run_module({module!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code, *args, "--params", params]
        stages[name] = run(
            cmd, logs / f"stage_{name}.log", max(deadline - time.perf_counter(), 1), cwd=project
        )
        if stages[name]["rc"] != 0:
            break  # later stages need this one's outputs
    timed = {k: v["seconds"] for k, v in stages.items() if not k.startswith("download")}
    return {
        "dvc": "not used: the stage modules were run in dvc.yaml order (dvc/dvclive not installed there)",
        "stages": stages,
        "ok": all(v["rc"] == 0 for v in stages.values()) and len(stages) == len(stage_commands()),
        "stage_seconds_downloads_excluded": round(sum(timed.values()), 3),
        "download_seconds": round(
            sum(v["seconds"] for k, v in stages.items() if k.startswith("download")), 3
        ),
        "project": project,
    }


def metrics_of(project: Path) -> dict:
    out = {}
    for f in sorted((project / "metrics").glob("*.json")):
        out[f.stem] = json.loads(f.read_text())
    return out


def targets(summary: dict) -> dict:
    """The issue's targets, each with the measured number and pass/fail (None: not measured)."""
    t = {}
    pipe, bench, sal = summary.get("pipeline", {}), summary.get("bench", {}), summary.get("saliency", {})
    if pipe.get("ok"):
        t["pipeline_stage_seconds_lt_30"] = [
            pipe["stage_seconds_downloads_excluded"],
            pipe["stage_seconds_downloads_excluded"] < 30,
        ]
    train = summary.get("metrics", {}).get("train", {})
    if "cuda_max_allocated_mb" in train:
        t["finetune_max_allocated_lt_4GB"] = [
            train["cuda_max_allocated_mb"],
            train["cuda_max_allocated_mb"] < 4096,
        ]
    runs = (bench.get("results") or {}).get("runs", {})
    for label, row in runs.items():
        for v, r in row.get("variants", {}).items():
            if label != "finetune" or v not in ("b4", "b32"):  # the targets are the finetune scenario's
                continue
            need = 10 if r["batch_size"] == 4 else 20
            t[f"{label}/{v}/speedup_ge_{need}x"] = [round(r["epoch_ratio"], 2), r["epoch_ratio"] >= need]
            t[f"{label}/{v}/acc_within_2_images"] = [r["acc_diff_images"], abs(r["acc_diff_images"]) <= 2]
            if r["batch_size"] == 32:
                t[f"{label}/{v}/stretch_le_0.04_s_per_epoch"] = [r["epoch_s"], r["epoch_s"] <= 0.04]
    if "warm_seconds" in sal:
        t["gradient_saliency_all_val_lt_0.5s"] = [sal["warm_seconds"], sal["warm_seconds"] < 0.5]
    return t


def text_summary(s: dict) -> str:
    lines = [
        f"gpu_check on {s['env']['device']} ({s['env']['torch']}, Python {s['env']['python']}), {s['mode']}"
    ]
    for name, step in s["steps"].items():
        lines.append(f"step {name:<9} rc={step['rc']!s:<4} {step['seconds']:8.1f} s")
    pipe = s.get("pipeline", {})
    if pipe:
        lines.append(f"pipeline: {pipe['dvc']}")
        for k, v in pipe["stages"].items():
            lines.append(f"  {k:<17} rc={v['rc']:<4} {v['seconds']:7.2f} s")
        lines.append(f"  stage time, downloads excluded: {pipe['stage_seconds_downloads_excluded']:.2f} s")
    for k, v in s.get("bench_table", {}).items():
        lines.append(f"bench {k}: {v}")
    sal = s.get("saliency", {})
    if sal:
        lines.append(f"saliency: {json.dumps(sal)}")
    if s["mode"] != "full":
        lines.append(
            "targets below are for the full run on a GPU; a dry run shows them only to exercise the code"
        )
    for k, (value, ok) in s.get("targets", {}).items():
        lines.append(f"target {k}: {value} -> {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines) + "\n"


def bench_table(results: dict) -> dict:
    table = {}
    for label, row in (results or {}).get("runs", {}).items():
        tut = row["tutorial"]
        table[f"{label}/tutorial"] = (
            f"{row['tutorial_epoch_s']:.3f} s/epoch, best acc median {tut['best_val_acc_median']:.4f}"
        )
        for v, r in row.get("variants", {}).items():
            table[f"{label}/{v}"] = (
                f"{r['epoch_s']:.4f} s/epoch ({r['epoch_ratio']:.1f}x), best acc median {r['best_val_acc_median']:.4f} "
                f"({r['acc_diff_images']:+d} images), graphs={r.get('cuda_graphs')}"
            )
    return table


class Check:
    """The four steps, each returning an exit status; their numbers go into self.summary."""

    STEPS = ("tests", "pipeline", "bench", "saliency")

    def __init__(self, args, work: Path):
        self.args, self.work, self.logs = args, work, work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.project = work / "project"
        self.data = tiny_data(args.data, work / "tiny_data") if args.tiny else args.data
        self.budget = TINY_BUDGET if args.tiny else BUDGET
        self.end = time.perf_counter() + self.budget["total"]
        mode = "tiny CPU dry run" if args.tiny else "full"
        self.summary = {"mode": mode, "env": environment(args.device), "steps": {}}

    def step(self, name: str, skip: set) -> None:
        """Run one step; an exception is recorded as a failure and the next step still runs."""
        print(f"== {name}", file=sys.stderr, flush=True)
        if name in skip:
            self.summary["steps"][name] = {"rc": None, "seconds": 0.0, "skipped": True}
            return
        start = time.perf_counter()
        try:
            rc = getattr(self, name)()
        except Exception as exc:  # record and go on: one run must give all the evidence
            (self.logs / f"{name}.error.log").write_text(repr(exc) + "\n")
            print(f"   {name} failed: {exc!r}", file=sys.stderr)
            rc = 1
        self.summary["steps"][name] = {"rc": rc, "seconds": round(time.perf_counter() - start, 3)}

    def tests(self) -> int:
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs"]
        return run(cmd + ["-p", "no:cacheprovider"], self.logs / "tests.log", self.budget["tests"])["rc"]

    def pipeline(self) -> int:
        params = write_params(self.work, self.data, self.args.device, self.args.tiny)
        self.summary["pipeline"] = pipeline(self.work, params, self.logs, self.budget["pipeline"])
        self.summary["metrics"] = metrics_of(self.project)
        return 0 if self.summary["pipeline"]["ok"] else 1

    def bench(self) -> int:
        out = self.work / "bench_train.json"
        if self.args.tiny:
            plan = ["--epochs", "2", "--fe-epochs", "2", "--seeds", "1", "--ours", "4,32", "--crop", "32"]
        else:  # the tutorial's 25 epochs, 3 seeds; the graphs-off reference last (cut first if time runs out)
            plan = shlex.split(os.environ.get("GPU_CHECK_BENCH", "")) or [
                "--epochs",
                "25",
                "--fe-epochs",
                "5",
                "--seeds",
                "3",
                "--ours",
                "4,32,4:off",
            ]
        cmd = [sys.executable, ROOT / "bench" / "bench_train.py", "--device", self.args.device]
        cmd += ["--raw", self.data, "--prepared", self.project / "data" / "prepared", "--out", out, *plan]
        left = self.end - time.perf_counter() - self.budget["saliency"] - 10
        rc = run(cmd, self.logs / "bench.log", max(min(self.budget["bench"], left), 30))["rc"]
        if out.exists():
            self.summary["bench"] = {"results": json.loads(out.read_text())}
            self.summary["bench_table"] = bench_table(self.summary["bench"]["results"])
        return rc

    def saliency(self) -> int:
        out = self.work / "saliency.json"
        cmd = [sys.executable, ROOT / "bench" / "gpu_check.py", "_saliency", "--device", self.args.device]
        cmd += [
            "--prepared",
            self.project / "data" / "prepared",
            "--model",
            self.project / "models",
            "--out",
            out,
        ]
        rc = run(cmd, self.logs / "saliency.log", self.budget["saliency"])["rc"]
        if out.exists():
            self.summary["saliency"] = json.loads(out.read_text())
        return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: few images, epochs and pixels")
    ap.add_argument("--data", type=Path, default=ROOT / ".gpu" / "hymenoptera_data")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu-out"))
    ap.add_argument("--work", type=Path, help="scratch folder (default: a fresh one under /tmp)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: " + ",".join(Check.STEPS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        sys.exit(
            f"error: --data {args.data} is not an ImageFolder with train/ and val/; copy it there with "
            "`mkdir -p .gpu && cp -r ../shared/data/hymenoptera_data .gpu/`"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check."))).resolve()
    check = Check(args, work)
    for name in Check.STEPS:
        check.step(name, set(filter(None, args.skip.split(","))))
    summary = check.summary
    summary["targets"] = targets(summary)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    pack(summary, work, args.out)
    failed = [k for k, v in summary["steps"].items() if v["rc"] not in (0, None)]
    print(
        f"gpu_check: done in {summary['total_seconds']} s; failed steps: {failed or 'none'}; -> {args.out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def environment(device: str) -> dict:
    import torch

    name = (
        torch.cuda.get_device_name()
        if device == "cuda" and torch.cuda.is_available()
        else platform.processor() or platform.machine()
    )
    try:
        import dvc  # noqa: F401

        dvc_state = "installed (not used)"
    except ImportError:
        dvc_state = "not installed"
    return {
        "device": name,
        "requested": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "dvc": dvc_state,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or None,
    }


def pack(summary: dict, work: Path, out: Path) -> None:
    """summary.json, summary.txt and one tar.gz of logs, metrics and bench JSON, directly in `out`
    (the device tool returns only a few files)."""
    summary = json.loads(json.dumps(summary, default=str))
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.txt").write_text(text_summary(summary))
    project = work / "project"
    with tarfile.open(out / "gpu_check.tar.gz", "w:gz") as tar:
        for path in [work / "logs", project / "metrics", project / "plots" / "train", work / "params.yaml"]:
            if path.exists():
                tar.add(path, arcname=f"gpu_check/{path.relative_to(work)}")
        for f in ("bench_train.json", "saliency.json", "summary.json"):
            if (work / f).exists():
                tar.add(work / f, arcname=f"gpu_check/{f}")
    print(text_summary(summary), file=sys.stderr)


def saliency_main(argv):
    """`gpu_check.py _saliency`: gradient saliency for every val image, timed (cold and warm)."""
    ap = argparse.ArgumentParser(prog="gpu_check.py _saliency")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from cnnlens.attribution import gradient
    from cnnlens.model import load_checkpoint, to_device
    from cnnlens.tensors import eval_inputs, load_split

    device = torch.device(args.device)
    model, meta = load_checkpoint(args.model)
    val = load_split(args.prepared, "val")
    x_cpu = eval_inputs(val.images, meta["input_size"])
    model = to_device(model, device)

    def timed():
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        x = x_cpu.to(device)  # the host-to-device copy counts
        with torch.no_grad():
            target = model(x).argmax(1)
        maps = gradient(model, x, target)
        sync()
        return time.perf_counter() - start, maps, target

    cold, maps, target = timed()
    warm = [timed()[0] for _ in range(5)]
    res = {
        "images": len(val),
        "input_size": meta["input_size"],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cold_seconds": round(cold, 4),
        "warm_seconds": round(statistics.median(warm), 4),
        "warm_all": [round(w, 4) for w in warm],
        "includes": "host-to-device copy, forward for the targets, forward+backward for the maps",
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":  # the same maps on the CPU for the first 16 images, with these (default) flags
        k = min(16, len(val))
        cpu_model = to_device(load_checkpoint(args.model)[0], torch.device("cpu"))
        ref = gradient(cpu_model, x_cpu[:k], target[:k].cpu())
        scale = ref.flatten(1).amax(1).view(-1, 1, 1, 1)
        res["max_rel_diff_vs_cpu_16_images"] = float(((maps[:k].cpu() - ref).abs() / scale).max())
        res["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res), file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_saliency"]:
        saliency_main(sys.argv[2:])
    else:
        sys.exit(main())
