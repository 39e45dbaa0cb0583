"""The command line every stage shares: errors meant for users, stderr logging, the entry point.

A StageError carries one line for the user (what, where, how to fix) and an exit code; run_main
turns it into that line on stderr instead of a traceback. run_main also turns a full, read-only
or forbidden disk into one such line, stops the stage when its parent (dvc) dies, and a stage
holds a lock on its outs (lock_outputs) so that two copies never write the same files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

PARENT_PID = os.getppid()  # read as early as possible: a parent that dies before prctl is caught below


class StageError(Exception):
    """A failure with a message meant for the user (what, where, how to fix). Exit code 1."""

    exit_code = 1


class ParamsError(StageError):
    """A bad value in params.yaml. Exit code 2."""

    exit_code = 2


def stage_args(doc: str, path_flags: tuple[str, ...], argv=None, outs: tuple[str, ...] = ()):
    """The command line every stage shares: its paths (from dvc.yaml) and --params. Returns (args, Params).

    The paths named in `outs` (flags) are locked for the life of the process (lock_outputs)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in path_flags:
        ap.add_argument(flag, type=Path, required=True)
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = ap.parse_args(argv)
    from cnnlens.config import load_params  # config imports this module for its errors

    params = load_params(args.params)
    lock_outputs(*(getattr(args, flag.lstrip("-").replace("-", "_")) for flag in outs))
    return args, params


def log(msg: str) -> None:
    """Summaries and progress notes go to stderr, stdout stays free for data."""
    print(msg, file=sys.stderr, flush=True)


# the lock files this process holds: {lock path: open file}, kept until the process exits
_LOCKS: dict[str, object] = {}


def lock_outputs(*outs: str | os.PathLike) -> None:
    """Take an exclusive lock per out (a file under the temp dir, named by the out's absolute path).

    A second copy of the stage (e.g. a new `dvc repro` beside an orphan) fails at once with one
    line naming the out and the pid that holds it. The kernel drops the lock when the process dies.
    """
    import fcntl

    folder = Path(tempfile.gettempdir()) / "cnnlens-locks"
    folder.mkdir(exist_ok=True)
    for out in outs:
        where = str(Path(out).resolve())
        lock = str(folder / (hashlib.sha256(where.encode()).hexdigest()[:24] + ".lock"))
        if lock in _LOCKS:  # already ours (main() called twice in one process, as tests do)
            continue
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise StageError(
                f"{out} is being written by another running stage (pid {holder}); "
                f"wait for it to finish or stop it (kill {holder}), then rerun"
            ) from None
        fh.seek(0), fh.truncate(), fh.write(f"{os.getpid()}\n"), fh.flush()
        _LOCKS[lock] = fh


def die_with_parent() -> None:
    """Linux: ask the kernel for SIGTERM when the parent (dvc) dies, so no orphan keeps writing outs."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != PARENT_PID:  # the parent died before the request took effect
        raise SystemExit(143)


def _terminate(signum, frame):
    # SIGTERM (from the dying parent, or a user) unwinds like Ctrl-C: temporaries are removed
    raise KeyboardInterrupt


# errno -> how to fix it; any other OSError is a bug and keeps its traceback
DISK_ERRORS = {
    errno.ENOSPC: "free space on that filesystem (df -h) and rerun",
    errno.EDQUOT: "free space within your disk quota and rerun",
    errno.EFBIG: "the file is too large for that filesystem; write the outputs elsewhere",
    errno.EROFS: "the filesystem is mounted read-only; remount it read-write or run from a writable copy",
    errno.EACCES: "check the permissions of that path (ls -ld) and rerun",
    errno.EPERM: "check the permissions and attributes of that path (ls -ld, lsattr) and rerun",
}


def disk_error_line(exc: BaseException) -> str | None:
    """One line for a failed write: what, which path, how to fix; None if `exc` is not one."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        where = str(exc.filename) if exc.filename is not None else "a file"
        where += f" -> {exc.filename2}" if exc.filename2 else ""
        verb = "access" if exc.errno in (errno.EACCES, errno.EPERM) else "write"
        return f"cannot {verb} {where}: {exc.strerror or os.strerror(exc.errno)}; {DISK_ERRORS[exc.errno]}"
    return None


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a StageError or a disk error becomes one clear line on stderr and an exit code."""
    die_with_parent()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        main(argv)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        line = disk_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
