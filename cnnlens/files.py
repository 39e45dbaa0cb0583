"""Disk helpers shared by all stages: atomic writes, JSON, checksums, safe torch loads.

Every output a stage declares in dvc.yaml is written to a temporary sibling first and renamed
into place only when complete, so a killed stage never leaves a half-written file that DVC
could cache as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cnnlens.cli import StageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    Works for files and directories: the caller creates whatever it wants at the yielded path.
    On any exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        remove_path(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller creates a file or a directory here
    try:
        yield tmp
        if not tmp.exists():
            raise StageError(f"internal error: nothing was written for {path}")
        remove_path(path)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


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
