"""Kill-point sweeps over a commit of three outs, for tests/test_commit.py.

    python tests/commit_driver.py ROOT HOW HAD_OLD [SET]

For N = 0, 1, 2, ...: a forked child commits a new set of outs (ROOT/plots/train, ROOT/models,
ROOT/metrics/train.json) with a fault at its N-th filesystem step (os.replace, rename, unlink,
remove, rmdir: every step that changes what is on disk), until a child runs without meeting its
fault. Then a second fresh child starts the next run (lock_outputs, or atomic_outputs entered and
abandoned, alternately), and the driver prints one JSON row: what is on disk after it.

HOW: kill (os._exit at step N: no cleanup, like SIGKILL), fail (OSError at step N), exit
(SystemExit at step N), fail-metrics-then-kill (the rename of the new metrics file fails, then
os._exit at the N-th step after it), kill-recovery (kill at step N, then kill the next run at
each of its steps in turn before a clean one). SET: three (the default) or one (ROOT/models alone:
a folder replaced by a folder takes two renames too).
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from cnnlens import files

OPS = ("replace", "rename", "unlink", "remove", "rmdir")
REAL = {name: getattr(os, name) for name in OPS}


class Abandon(Exception):
    pass


SETS = {
    "three": ("plots/train", "models", "metrics/train.json"),
    "one": ("models",),
}
SET = SETS["three"]


def outs(root: Path) -> list[Path]:
    return [root / name for name in SET]


def write_set(paths, version: str) -> None:
    for path in paths:
        if path.suffix == ".json":
            path.write_text(version)
            continue
        path.mkdir()
        (path / "v.txt").write_text(version)
        (path / f"{version}-only").write_text(version)


def version(path: Path):
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        v = (path / "v.txt").read_text() if (path / "v.txt").exists() else "?"
        return v if names == sorted(["v.txt", f"{v}-only"]) else f"broken {names}"
    return path.read_text() if path.exists() else None


def on_disk(root: Path) -> list[str]:
    """Everything under ROOT, the outs' parents and the outs' insides left out."""
    names = []
    for folder in (root, root / "plots", root / "metrics"):
        if folder.is_dir():
            names += [
                str(p.relative_to(root)) for p in folder.iterdir() if p.name not in ("plots", "metrics")
            ]
    return sorted(names)


def in_child(fn, log: Path) -> tuple[int, int]:
    """Run fn() in a forked child; its exit code and how many steps it took (-1: killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    steps = log.with_suffix(".steps")
    steps.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()  # what a normal exit does (lock files)
            steps.write_text(str(COUNT[0]))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), int(steps.read_text()) if steps.exists() else -1


COUNT = [0]


def patch(fault) -> None:
    """Count every step that changes the disk; call fault(n, op name, args) before each."""

    def wrap(name):
        real = REAL[name]

        def op(*args, **kwargs):
            n = COUNT[0]
            COUNT[0] += 1
            fault(n, name, args)
            return real(*args, **kwargs)

        return op

    COUNT[0] = 0
    for name in OPS:
        setattr(os, name, wrap(name))


STEP = Path(os.devnull)  # main() points it at a file: the step a child was stopped at


def stop(name: str, args, then):
    STEP.write_text(f"{name} " + " -> ".join(Path(a).name for a in args[:2]))
    then()


def fault_at(at: int, how: str):
    failed = []

    def fault(n, name, args):
        if how in ("kill", "kill-recovery") and n == at:
            stop(name, args, lambda: os._exit(137))
        if how == "fail" and n == at:
            stop(name, args, lambda: None)
            raise OSError(errno.EIO, "injected", str(args[0]))
        if how == "exit" and n == at:
            stop(name, args, lambda: None)
            raise SystemExit(3)
        if how == "fail-metrics-then-kill":
            if failed and n == failed[0] + 1 + at:
                stop(name, args, lambda: os._exit(137))
            new_metrics = name in ("replace", "rename") and Path(args[1]).name == "train.json"
            if not failed and new_metrics and not str(args[0]).endswith(".old.tmp"):
                failed.append(n)
                raise OSError(errno.EROFS, "injected", str(args[1]))

    return fault


def commit(root: Path, at: int, how: str):
    def run():
        patch(fault_at(at, how))
        with files.atomic_outputs(*outs(root)) as tmps:
            write_set(tmps, "new")

    return run


def recover(root: Path, mode: str, kill_at: int | None = None):
    def run():
        if kill_at is not None:
            patch(fault_at(kill_at, "kill"))
        if mode == "lock":
            files.lock_outputs(*outs(root))
            return
        try:
            with files.atomic_outputs(*outs(root)):
                raise Abandon
        except Abandon:
            pass

    return run


def main(root: Path, how: str, had_old: bool) -> None:
    global STEP
    root.joinpath("plots").mkdir(parents=True, exist_ok=True)
    work = root.parent / "driver"
    work.mkdir(parents=True, exist_ok=True)
    STEP = work / "step.txt"
    for at in itertools.count():
        STEP.write_text("")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if had_old:
            for path in outs(root):
                path.parent.mkdir(parents=True, exist_ok=True)
            write_set(outs(root), "old")
        rc, steps = in_child(commit(root, at, how), work / "commit.log")
        step = STEP.read_text()
        mode = ("lock", "enter")[at % 2]
        kills = 0
        if how == "kill-recovery" and rc == 137:
            for kill_at in itertools.count():
                got, _ = in_child(recover(root, mode, kill_at), work / "recover.log")
                if got != 137:
                    break
                kills += 1
        recover_rc, _ = in_child(recover(root, mode), work / "recover.log")
        row = {
            "at": at,
            "rc": rc,
            "step": step,
            "recover_mode": mode,
            "recover_kills": kills,
            "recover_rc": recover_rc,
            "recover_err": (work / "recover.log").read_text(),
            "versions": [version(p) for p in outs(root)],
            "names": on_disk(root),
        }
        print(json.dumps(row), flush=True)
        if rc != 137 and 0 <= steps <= at and how != "fail-metrics-then-kill" or at > 200:
            break  # the child ran without meeting its fault
        if how == "fail-metrics-then-kill" and rc != 137:
            break


if __name__ == "__main__":
    SET = SETS[sys.argv[4] if len(sys.argv) > 4 else "three"]
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")
