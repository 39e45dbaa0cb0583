"""Per-epoch training logs: DVCLive when installed, else the same files written directly."""

from __future__ import annotations

import json
from pathlib import Path

from cnnlens.cli import log


class PlainLive:
    """The files DVCLive writes for log_metric(plot=True) + next_step(), without dvclive: one
    plots/metrics/<key>.tsv per metric (`step<TAB>key` rows) and metrics.json with the last values.
    Used where dvclive is not installed (the GPU box); the plots in dvc.yaml read the same files."""

    def __init__(self, root):
        self.root, self.step, self.rows, self.last = Path(root), 0, {}, {}

    def log_metric(self, key, value, plot=True):
        self.rows.setdefault(key, []).append(f"{self.step}\t{value}")
        self.last[key] = value

    def next_step(self):
        folder = self.root / "plots" / "metrics"
        folder.mkdir(parents=True, exist_ok=True)
        for key, rows in self.rows.items():
            (folder / f"{key}.tsv").write_text("\n".join([f"step\t{key}", *rows]) + "\n")
        (self.root / "metrics.json").write_text(json.dumps({**self.last, "step": self.step}, indent=4))
        self.step += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def live_logger(live_dir):
    """DVCLive when installed (imported here: it is slow to import), else PlainLive."""
    try:
        from dvclive import Live
    except ImportError:
        log("finetune: dvclive not installed; writing its per-epoch TSV/JSON files directly")
        return PlainLive(live_dir)
    return Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)


def log_epoch(live, row: dict) -> None:
    """One epoch's row (training.train's on_epoch) as one step of `live`: every value but the epoch's number."""
    for key, value in row.items():
        if key != "epoch":
            live.log_metric(key, value, plot=True)
    live.next_step()
