"""Where the saliency stage's time goes, per method and per part, on a finished project (the real data at 224 px).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_saliency.py --project /tmp/s224 [--params FILE] \
        [--stage] [--json parts.json]

<project> holds data/prepared, data/weights and models (a finished pipeline, `make run` or the stages run by
hand) and params.yaml (or --params). The stage's own main() runs once in this process with its outputs in a
temporary folder; its library calls are timed where the stage makes them, so the same script measures the
code before and after a change. A part is the outermost timed call: the explain() inside the randomisation
check counts as randomisation. Rows: who (a method, a baseline, or "stage") x part:

  setup            load_checkpoint, resolve_cam_layer, load_split, predict_images, ScoredImages
  maps shown       the method's maps of the shown images (saliency.num_images)
  maps scored      its maps of the images scored for quality (saliency.quality_images)
  deletion_insertion, road, pointing_game, mass_inside, ig_completeness, bootstrap: the quality scores
  randomization    the model-randomisation check (the methods it runs for)
  before_after     the untuned network's maps and the figure
  figures          write_method (arrays/*.npz and the method's figures), write_randomization, write_quality
  writes           quality.json and the metrics file
  other            the rest of main(): the total less the rows

--out keeps the in-process run's outputs (saliency/, saliency.json) to compare runs. --stage also times
`python -m stages.saliency ...` as a process (imports included), outputs in a temporary folder. Prints a
table (seconds, calls) and, with --json, writes the rows. On a shared machine the numbers are relative: say
how loaded it was (the load average is printed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnlens import figures, quality  # noqa: E402
from stages import saliency as stage  # noqa: E402

TIMES: dict = defaultdict(lambda: [0.0, 0])  # (who, part) -> [seconds, calls]
STATE = {"who": "stage", "depth": 0, "shown": False}


def timed(fn, part, who=None):
    """fn, timed as (who, part) when no other timed call is running (the outermost call counts)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if STATE["depth"]:
            return fn(*args, **kwargs)
        STATE["depth"] += 1
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STATE["depth"] -= 1
            name = part(args) if callable(part) else part
            entry = TIMES[(who(args) if who else STATE["who"], name)]
            entry[0] += time.perf_counter() - began
            entry[1] += 1

    return wrapper


def as_who(fn, who):
    """fn, which sets the current method or baseline (who(args)) for the calls it makes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before, STATE["who"] = STATE["who"], who(args, kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            STATE["who"], STATE["shown"] = before, False

    return wrapper


def maps_part(args) -> str:
    """The first explain() of a method's _score_method is its shown images; the rest are scored ones."""
    shown, STATE["shown"] = STATE["shown"], False
    return "maps shown" if shown else "maps scored"


def baseline_source(original):
    """quality.baseline_source whose maps set the current who to the baseline."""

    def make(kind, **kw):
        source = original(kind, **kw)

        def tagged(*args):
            STATE["who"] = kind
            return source(*args)

        return tagged

    return make


def score_method(original):
    """quality._score_method that marks its first explain() as the shown images'."""

    def run(name, *args, **kwargs):
        STATE["who"], STATE["shown"] = name, True
        return original(name, *args, **kwargs)

    return run


def instrument() -> None:
    """Wrap the library calls the stage makes (module attributes, looked up at call time)."""
    for name, part in (
        ("deletion_insertion", "deletion_insertion"),
        ("road", "road"),
        ("pointing_game", "pointing_game"),
        ("mass_inside", "mass_inside"),
        ("ig_completeness", "ig_completeness"),
        ("bootstrap_ci", "bootstrap"),
        ("randomization_check", "randomization"),
        ("explain", maps_part),
        ("baseline_maps", "maps scored"),
        ("predict_images", "setup"),
        ("ScoredImages", "setup"),
    ):
        setattr(quality, name, timed(getattr(quality, name), part))
    quality._score_method = score_method(quality._score_method)
    quality._add_randomization = as_who(quality._add_randomization, lambda a, kw: a[1])
    quality.baseline_source = baseline_source(quality.baseline_source)
    quality.score_methods = as_who(quality.score_methods, lambda a, kw: "stage")
    for name in ("load_checkpoint", "load_split", "resolve_cam_layer"):
        setattr(stage, name, timed(getattr(stage, name), "setup", who=lambda a: "stage"))
    stage.before_after = timed(stage.before_after, "before_after", who=lambda a: "stage")
    stage.write_json = timed(stage.write_json, "writes", who=lambda a: "stage")
    figures.write_method = timed(figures.write_method, "figures", who=lambda a: a[1])
    for name in ("write_randomization", "write_quality"):
        setattr(figures, name, timed(getattr(figures, name), "figures", who=lambda a: "stage"))
    # outermost only where the stage saves the before/after figure (the others save inside write_*)
    figures.save_figure = timed(figures.save_figure, "before_after", who=lambda a: "stage")


def stage_argv(project: Path, params: Path, out: Path) -> list[str]:
    """The saliency stage's command line (dvc.yaml's) on `project`, its outputs under `out`."""
    return [
        *("--data", str(project / "data/prepared"), "--model", str(project / "models")),
        *("--weights", str(project / "data/weights"), "--params", str(params)),
        *("--metrics", str(out / "saliency.json"), "--out", str(out / "saliency")),
    ]


def in_process(project: Path, params: Path, out: Path | None) -> float:
    """The stage's main() once, instrumented, its outputs in `out` (or a temporary folder); its seconds."""
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        stage.main(stage_argv(project, params, out or Path(tmp)))
        return time.perf_counter() - began


def as_process(project: Path, params: Path) -> float:
    """Wall seconds of `python -m stages.saliency` (imports included), outputs in a temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "stages.saliency", *stage_argv(project, params, Path(tmp))],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - began


def report(total: float) -> dict:
    """The rows (who, part, seconds, calls), the per-part and per-who sums and `other`."""
    rows = [
        {"who": w, "part": p, "seconds": round(s, 2), "calls": c} for (w, p), (s, c) in sorted(TIMES.items())
    ]
    by_part, by_who = defaultdict(float), defaultdict(float)
    for (w, p), (s, _) in TIMES.items():
        by_part[p] += s
        by_who[w] += s
    other = total - sum(by_part.values())
    return {
        "rows": rows,
        "by_part": {p: round(s, 2) for p, s in sorted(by_part.items(), key=lambda kv: -kv[1])},
        "by_who": {w: round(s, 2) for w, s in sorted(by_who.items(), key=lambda kv: -kv[1])},
        "other": round(other, 2),
        "main_seconds": round(total, 2),
    }


def print_table(result: dict) -> None:
    print(f"{'who':22} {'part':20} {'seconds':>9} {'calls':>6}")
    for row in result["rows"]:
        print(f"{row['who']:22} {row['part']:20} {row['seconds']:9.2f} {row['calls']:6d}")
    print("\nby part: " + ", ".join(f"{p} {s:.1f}" for p, s in result["by_part"].items()))
    print("by who:  " + ", ".join(f"{w} {s:.1f}" for w, s in result["by_who"].items()))
    print(f"other {result['other']:.1f} s; main() {result['main_seconds']:.1f} s in process", end="")
    if "stage_seconds" in result:
        print(f"; python -m stages.saliency {result['stage_seconds']:.1f} s", end="")
    print(f"; load average before / after: {result['load_before']} / {result['load_after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--params", type=Path, help="default: <project>/params.yaml")
    ap.add_argument("--stage", action="store_true", help="also time the stage as a process")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--out", type=Path, help="keep the in-process run's outputs here (a new folder)")
    args = ap.parse_args()
    project = args.project.resolve()
    params = (args.params or project / "params.yaml").resolve()
    load_before = os.getloadavg()[0]
    result = report(in_process(project, params, args.out))
    if args.stage:
        result["stage_seconds"] = round(as_process(project, params), 2)
    result.update(load_before=load_before, load_after=os.getloadavg()[0], threads=os.cpu_count())
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
