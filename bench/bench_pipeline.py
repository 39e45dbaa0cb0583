"""Pipeline timings on this machine: `make demo` from scratch, a no-op `dvc repro`, `dvc repro -f`, and each
stage rerun on its own with its wall time, peak RSS, import time and where its time goes.

    python bench/bench_pipeline.py [--demo demo] [--skip-demo] [--repeats 3]

Runs scripts/demo.sh (unless --skip-demo), then inside demo/: `dvc repro` again (nothing to do), `dvc repro
-f` (every stage, warm, --repeats times) against the finetune stage's training seconds in the same run (the
target: at most 2x), then every
stage's command from dvc.yaml directly (so DVC's own overhead is not counted), each in its own process,
measured with os.wait4, and the seconds its imports take (`python -X importtime -c "import stages.<name>"`).
Then each stage once more under cProfile, its time split into parts: imports (every import, lazy ones too),
figures (calls into cnnlens/figures.py), files (calls into cnnlens/files.py from elsewhere: checksums, saves,
the commit of the outs) and compute (the rest), as shares of the profiled run applied to the plain wall time.
Prints a JSON report. Needs DVC (CPU machine).
"""

import argparse
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def import_seconds(module: str, cwd: Path, env: dict) -> float:
    """Seconds `import <module>` takes in a fresh interpreter (-X importtime: the top-level imports' sum)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    rows = [line.split("|") for line in run.stderr.splitlines() if line.startswith("import time:")]
    names = {module, module.split(".")[0]}  # the package, then the module with all it imports
    return round(sum(int(r[1]) for r in rows[1:] if r[2].strip() in names) / 1e6, 2)


def entry_seconds(stats: dict, module: str, *, outside: tuple[str, ...]) -> float:
    """Seconds spent in calls into `module` (a path suffix) from functions in none of `outside`; its import
    (the module's top level) is not one of them."""
    total = 0.0
    for (path, _, name), (_, _, _, _, callers) in stats.items():
        if path.endswith(module) and name != "<module>":
            total += sum(edge[3] for (c, _, _), edge in callers.items() if not c.endswith(outside))
    return total


def profile_parts(cmd: list[str], cwd: Path, env: dict) -> dict:
    """The shares of one profiled run of `cmd` (python -m stages.<name> ...): imports, figures, files, compute."""
    with tempfile.NamedTemporaryFile(suffix=".prof") as out:
        run = [sys.executable, "-m", "cProfile", "-o", out.name, *cmd[1:]]
        subprocess.run(
            run, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        stats = pstats.Stats(out.name).stats
    total = max(ct for _, _, _, ct, _ in stats.values())
    imports = sum(
        v[3] for (path, _, name), v in stats.items() if "_bootstrap>" in path and name == "_find_and_load"
    )
    figures = entry_seconds(stats, "cnnlens/figures.py", outside=("cnnlens/figures.py",))
    files = entry_seconds(stats, "cnnlens/files.py", outside=("cnnlens/files.py", "cnnlens/figures.py"))
    parts = {"imports": imports, "figures": figures, "files": files}
    parts["compute"] = total - sum(parts.values())
    return {k: round(v / total, 3) for k, v in parts.items()}


def repro_force(demo: Path, env: dict, *, repeats: int) -> dict:
    """`dvc repro -f` `repeats` times: each run's wall and the finetune stage's training seconds in it."""
    runs = []
    for _ in range(repeats):
        run = timed(["dvc", "repro", "-f"], demo, env)
        run["training_s"] = json.loads((demo / "metrics" / "train.json").read_text())["total_seconds"]
        run["over_training_seconds"] = round(run["seconds"] / run["training_s"], 3)
        runs.append(run)
        print(f"dvc repro -f: {run}", file=sys.stderr, flush=True)
    ratios = sorted(r["over_training_seconds"] for r in runs)
    return {"runs": runs, "median_over_training_seconds": ratios[len(ratios) // 2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=ROOT / "demo")
    ap.add_argument("--skip-demo", action="store_true", help="reuse an existing demo/ run")
    ap.add_argument("--repeats", type=int, default=3, help="of `dvc repro -f`")
    args = ap.parse_args()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_demo:
        report["make_demo_from_scratch"] = timed(["bash", str(ROOT / "scripts" / "demo.sh")], ROOT, env)
    report["noop_dvc_repro"] = timed(["dvc", "repro"], args.demo, env)
    report["dvc_status"] = timed(["dvc", "status"], args.demo, env)
    report["dvc_repro_force"] = repro_force(args.demo, env, repeats=args.repeats)
    stages = yaml.safe_load((args.demo / "dvc.yaml").read_text())["stages"]
    report["stages"] = {}
    for name, stage in stages.items():
        cmd = shlex.split(stage["cmd"])
        report["stages"][name] = {
            **timed(cmd, args.demo, env),
            "import_s": import_seconds(cmd[2], args.demo, env),
            "shares": profile_parts(cmd, args.demo, env),
        }
        print(f"{name}: {report['stages'][name]}", file=sys.stderr, flush=True)
    saliency = args.demo / "plots" / "saliency" / "quality.json"  # every number; metrics/: the headline
    if saliency.exists():
        s = json.loads(saliency.read_text())
        report["saliency_seconds_per_image"] = {
            m: v["seconds_per_image"]
            for m, v in s.items()
            if isinstance(v, dict) and "seconds_per_image" in v
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
