"""Per-epoch training logs: DVCLive when installed, else the same files written directly; progress
on stderr: a live bar on a terminal, one line per epoch anywhere else."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from cnnlens.cli import log
from cnnlens.files import remove_path


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


@contextlib.contextmanager
def live_logger(live_dir):
    """DVCLive when installed (imported here: it is slow to import), else PlainLive; into an empty
    folder (a restarted worker's temporary may hold its first attempt's epochs). It is closed only when
    training ends well: an interrupted run's outs are dropped, and a worker stopping late must not write
    into a temporary its stage has already removed."""
    remove_path(live_dir)
    try:
        from dvclive import Live
    except ImportError:
        log("finetune: dvclive not installed; writing its per-epoch TSV/JSON files directly")
        yield PlainLive(live_dir)
        return
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    yield live
    live.end()


def log_epoch(live, row: dict) -> None:
    """One epoch's row (training.train's on_epoch) as one step of `live`: every value but the epoch's number."""
    for key, value in row.items():
        if key != "epoch":
            live.log_metric(key, value, plot=True)
    live.next_step()


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def epoch_line(row: dict, epochs: int, eta: float) -> str:
    """One epoch's progress line (stderr is not a terminal: dvc repro in CI, nohup, a cluster's log)."""
    return (
        f"finetune: epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.3g}  "
        f"{row['seconds']:.1f} s  ETA {duration(eta)}"
    )


class Progress:
    """Training progress on stderr: tqdm's bar on a terminal, else one epoch_line per epoch (the ETA:
    the mean seconds of this process's epochs times the epochs left). `quiet`: nothing (ranks but 0)."""

    def __init__(self, epochs: int, *, first: int = 1, quiet: bool = False):
        self.epochs, self.quiet, self.seconds = epochs, quiet, []
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=first - 1, desc="finetune", unit="epoch", leave=False)

    def update(self, row: dict) -> None:
        self.seconds.append(row["seconds"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                acc=f"{row['train_acc']:.3f}",
                val_acc=f"{row['val_acc']:.3f}",
            )
        elif not self.quiet:
            eta = sum(self.seconds) / len(self.seconds) * (self.epochs - row["epoch"])
            log(epoch_line(row, self.epochs, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
