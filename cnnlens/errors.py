"""Errors meant for users: one line (what, where, how to fix) and an exit code, never a traceback.

StageError and ParamsError carry their line; disk_error_line words a failed write (full, read-only
or forbidden disk) the same way. cli.run_main prints either as `error: <line>`.
"""

from __future__ import annotations

import errno
import os


class StageError(Exception):
    """A failure with a message meant for the user (what, where, how to fix). Exit code 1."""

    exit_code = 1


class ParamsError(StageError):
    """A bad value in params.yaml. Exit code 2."""

    exit_code = 2


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
