"""The command line every stage shares: errors meant for users, stderr logging, the entry point.

A StageError carries one line for the user (what, where, how to fix) and an exit code; run_main
turns it into that line on stderr instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


class StageError(Exception):
    """A failure with a message meant for the user (what, where, how to fix). Exit code 1."""

    exit_code = 1


class ParamsError(StageError):
    """A bad value in params.yaml. Exit code 2."""

    exit_code = 2


def stage_args(doc: str, path_flags: tuple[str, ...], argv=None):
    """The command line every stage shares: its paths (from dvc.yaml) and --params. Returns (args, Params)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in path_flags:
        ap.add_argument(flag, type=Path, required=True)
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = ap.parse_args(argv)
    from cnnlens.config import load_params  # config imports this module for its errors

    return args, load_params(args.params)


def log(msg: str) -> None:
    """Summaries and progress notes go to stderr, stdout stays free for data."""
    print(msg, file=sys.stderr, flush=True)


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a StageError becomes one clear line on stderr and its exit code."""
    try:
        main(argv)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
