"""What every command shares: stderr logging and the entry point.

run_main turns a StageError or a full, read-only or forbidden disk (cnnlens.errors) into one line on
stderr and an exit code instead of a traceback, and stops the command when its parent (dvc) dies.
The line stays one line of readable length whatever the message holds (one_line).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import signal
import sys
from typing import Callable

from cnnlens.errors import StageError, disk_error_line

PARENT_PID = os.getppid()  # read as early as possible: a parent that dies before prctl is caught below
MAX_LINE = 1000  # characters of an error line; a longer message keeps its start and its end (the fix)


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """`message` as one line of at most `limit` characters: line breaks become spaces, and the middle
    of a longer message is cut, so that both what went wrong and how to fix it remain."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 5]} ... {text[-tail:]}"


def log(msg: str) -> None:
    """Summaries and progress notes go to stderr, stdout stays free for data."""
    print(msg, file=sys.stderr, flush=True)


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


@functools.cache  # once per process, however often run_main runs
def freeze_at_exit() -> None:
    atexit.register(gc.freeze)


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a StageError or a disk error becomes one clear line on stderr and an exit code."""
    die_with_parent()
    # A process that imported torch spends 0.3-0.4 s of its exit in the interpreter's last garbage
    # collections, walking every object torch created (BENCHMARKS.md). Frozen at exit, they are skipped:
    # objects are still released by reference counting as the modules are torn down, files closed,
    # atexit hooks run; only unreachable reference cycles are left to the operating system.
    if not gc.isenabled():  # stages/__init__.py turned it off for the imports of `python -m stages.X`
        gc.freeze()  # the imported modules' objects: later collections need not walk them
        gc.enable()
    freeze_at_exit()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        main(argv)
    except StageError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        line = disk_error_line(exc)
        if line is None:
            raise
        print(f"error: {one_line(line)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
