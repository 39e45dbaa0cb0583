"""The headline of a finished run, read back from its metrics/ and plots/: what `make demo` prints.

python -m cnnlens.results [PROJECT]     # default: the current folder

Prints the val accuracy, calibration, the best epoch and the CPU kernels this process runs on, then
each saliency method's quality next to a random map, with 95% intervals (plots/saliency/quality.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cnnlens.cli import run_main
from cnnlens.errors import StageError

QUALITY = ("deletion_auc", "insertion_auc", "pointing_game")


def read_results(root: Path) -> dict:
    """{"eval", "train", "quality"} of a finished run; a missing or broken file is one line naming it."""
    files = {
        "eval": root / "metrics" / "eval.json",
        "train": root / "metrics" / "train.json",
        "quality": root / "plots" / "saliency" / "quality.json",
    }
    out = {}
    for key, path in files.items():
        try:
            out[key] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StageError(
                f"{path}: cannot read it ({type(exc).__name__}); run the pipeline first (dvc repro)"
            ) from None
    return out


def kernels() -> str:
    """The CPU vector kernels torch runs on here (another set trains another trajectory)."""
    import torch

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return torch.backends.cpu.get_cpu_capability() + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")


def interval(ci: dict) -> str:
    return f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def headline_text(results: dict, isa: str) -> str:
    """The lines `make demo` ends with."""
    ev, tr, quality = results["eval"], results["train"], results["quality"]
    lines = [
        f"this run: val accuracy {ev['accuracy']:.3f} (balanced {ev['balanced_accuracy']:.3f}, "
        f"ECE {ev['ece']:.3f}), best epoch {tr['best_epoch']} of {tr['stopped_epoch']}, kernels {isa}. "
        "A rerun on this machine with the same kernels gives the same numbers bit for bit; another CPU "
        "gives other numbers (README.md, Reproducibility).",
        "saliency (95% CI) vs a random map:",
    ]
    for name, scores in quality.items():
        if isinstance(scores, dict) and "deletion_auc" in scores:
            cells = [f"{k} {interval(scores[k])}" for k in QUALITY if k in scores]
            lines.append(f"  {name:>20}: " + ", ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", nargs="?", type=Path, default=Path("."), help="a project with a finished run")
    args = ap.parse_args(argv)
    print(headline_text(read_results(args.project), kernels()), file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
