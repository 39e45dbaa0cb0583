"""Disk helpers shared by all stages: atomic writes, JSON, checksums, safe torch loads.

Every output a stage declares in dvc.yaml is written to a temporary sibling first and renamed
into place only when complete, so a killed stage never leaves a half-written file that DVC
could cache as done.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cnnlens.errors import StageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    Works for files and directories: the caller creates whatever it wants at the yielded path.
    On any exception the temporary is removed and `path` is left as it was.
    """
    with atomic_outputs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of `paths`; when the block succeeds, rename them all
    into place in the order given (put the metrics file last), or, if any rename fails, put every
    old out back. A stage's outs are thus replaced together or not at all.

    The temporaries are reserved on entry, so a read-only or missing folder fails before any work
    is written. On any exception every temporary is removed and every `path` is left as it was.
    """
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in paths:
            try:
                tmps.append(_reserve(path))
            except OSError as exc:  # name the out, not its temporary
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
        try:
            yield tmps
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            # a failed write() names no file: name the folders the outs were being written in
            where = ", ".join(dict.fromkeys(str(p.parent) for p in paths))
            raise OSError(exc.errno, exc.strerror, f"a file under {where}") from exc
        for path, tmp in zip(paths, tmps):
            if not tmp.exists():
                raise StageError(f"internal error: nothing was written for {path}")
        _commit(paths, tmps)
    finally:
        for tmp in tmps:
            remove_path(tmp)


def _reserve(path: Path) -> Path:
    """A fresh temporary name beside `path` (created and removed: the caller makes a file or a dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # left by a killed run: exactly our names (mkdtemp adds 8 characters), not another out's (.x.json.*)
    mine = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(\.old\.tmp)?")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if mine.fullmatch(stale.name):
            remove_path(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()
    return tmp


def _commit(paths: list[Path], tmps: list[Path]) -> None:
    """Rename each tmp onto its path, keeping the old outs aside until all are in; undo on failure."""
    done: list[tuple[Path, Path | None]] = []  # (path, its old version moved aside, or None)
    try:
        for path, tmp in zip(paths, tmps):
            old = None
            if path.exists() or path.is_symlink():
                old = Path(f"{tmp}.old.tmp")
                os.replace(path, old)
            done.append((path, old))
            os.replace(tmp, path)
    except BaseException:
        for path, old in reversed(done):
            with contextlib.suppress(OSError):
                if old is not None:
                    remove_path(path)
                    os.replace(old, path)
        raise
    for _, old in done:
        if old is not None:
            remove_path(old)


def remove_path(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    # numpy scalars and arrays, Paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); delete it and rerun `dvc repro`") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save with its write errors made readable: torch reports a full disk as
    `RuntimeError: [enforce fail at inline_container.cc...] unexpected pos`, naming no file."""
    import torch

    try:
        torch.save(obj, path)
    except OSError:
        raise
    except RuntimeError as exc:
        free = shutil.disk_usage(Path(path).parent).free // 2**20
        raise StageError(
            f"cannot write {path}: torch.save failed ({str(exc).strip().splitlines()[0][:120]}); "
            f"{free} MiB free on that filesystem: free space (df -h) and rerun"
        ) from exc


def load_torch(path: str | os.PathLike, what: str = "file"):
    """torch.load with weights_only=True (no pickled code runs) and a clear error."""
    import torch

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: {what} not found; run the stage that writes it first (dvc repro)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise StageError(
            f"{path}: cannot load {what} ({type(exc).__name__}: {exc}); "
            "delete it and rerun the stage that writes it"
        ) from exc


def unique_stems(paths: list[str]) -> list[str]:
    """One file or folder name per manifest path: its stem, or the whole path when two stems collide."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else p.replace("/", "_").rsplit(".", 1)[0] for s, p in zip(stems, paths)]


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
