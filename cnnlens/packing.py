"""The packed format on disk: shard files and their index, written and checked with numpy alone.

A split is a list of shard files of at most prepare.shard_mb each, raw uint8 N x 3 x S x S
(`train-00000.u8`, ...; masks beside them as N x S x S `.mask.u8`), and one index, `index.json`, with
each shard's image count and every image's label and path. Raw files, not torch.save archives: a reader
maps them with mmap and can drop the pages it has read (cnnlens.shards), and the index is JSON, so
nothing pickled loads. The prepare stage writes them here without importing torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from cnnlens.errors import StageError

INDEX = "index.json"
FORMAT = "cnnlens-shards"
VERSION = 1


class ShardWriter:
    """Appends images (and masks) of one split to shard files of at most `max_bytes` of images each."""

    def __init__(self, folder: Path, split: str, *, side: int, max_bytes: int):
        self.folder, self.split, self.side = Path(folder), split, side
        self.per_shard = max(1, max_bytes // (3 * side * side))
        self.shards, self.labels, self.paths = [], [], []
        self.all_masks = True
        self.files = None

    def add(self, image: np.ndarray, *, mask: np.ndarray | None, label: int, path: str) -> None:
        if image.shape != (3, self.side, self.side) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 3x{self.side}x{self.side}, got {image.dtype} {image.shape}")
        if self.files is None or self.shards[-1]["images"] == self.per_shard:
            self._next_shard()
        self.files[0].write(image.tobytes())
        self.all_masks &= mask is not None
        m = np.zeros((self.side, self.side), np.uint8) if mask is None else mask.astype(np.uint8)
        self.files[1].write(np.ascontiguousarray(m).tobytes())
        self.shards[-1]["images"] += 1
        self.labels.append(int(label))
        self.paths.append(path)

    def _next_shard(self) -> None:
        self._close_files()
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.u8", "masks": f"{name}.mask.u8", "images": 0})
        self.files = (open(self.folder / f"{name}.u8", "wb"), open(self.folder / f"{name}.mask.u8", "wb"))

    def _close_files(self) -> None:
        if self.files is not None:
            for fh in self.files:
                fh.close()

    def close(self) -> dict:
        """Close the last shard; returns this split's index entry. Masks are kept only if every image had one."""
        self._close_files()
        self.files = None
        for shard in self.shards:
            if not self.all_masks:
                (self.folder / shard["masks"]).unlink()
            shard["masks"] = shard["masks"] if self.all_masks else None
        return {"images": len(self.labels), "shards": self.shards, "labels": self.labels, "paths": self.paths}


def write_index(folder: Path, side: int, splits: dict) -> None:
    """index.json: the format, the image side and each split's entry (ShardWriter.close)."""
    index = {"format": FORMAT, "version": VERSION, "side": side, "splits": splits}
    (Path(folder) / INDEX).write_text(json.dumps(index, separators=(",", ":")) + "\n")


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.exists():
        raise StageError(f"{path}: shard index not found; rerun `dvc repro prepare`")
    try:
        index = json.loads(path.read_text())
        ok = index.get("format") == FORMAT and isinstance(index["splits"], dict) and int(index["side"]) > 0
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StageError(
            f"{path}: not a shard index ({type(exc).__name__}: {exc}); rerun `dvc repro prepare`"
        ) from None
    if not ok or index.get("version") != VERSION:
        raise StageError(
            f"{path}: not a version-{VERSION} {FORMAT} index; rerun `dvc repro prepare` with this code"
        )
    return index


def split_entry(folder: Path, index: dict, split: str):
    """([(shard path, mask path or None)], image counts, labels, paths) of one split of `index`,
    checked: every count a whole number, every label an integer, every path a string, the counts in
    agreement, and every file name confined to `folder` (shard_path)."""
    where = f"{folder / INDEX}: split {split!r}"
    entry = index["splits"].get(split)
    try:
        shards, labels, paths = entry["shards"], entry["labels"], entry["paths"]
        if not all(isinstance(x, list) for x in (shards, labels, paths)):
            raise TypeError("shards, labels and paths must be lists")
        counts = [s["images"] for s in shards]
        names = [(s["file"], s["masks"]) for s in shards]
    except (KeyError, TypeError) as exc:
        raise StageError(
            f"{folder / INDEX}: no valid entry for split {split!r} ({type(exc).__name__}: {exc}); "
            "rerun `dvc repro prepare`"
        ) from None
    problem = _entry_problem(counts, labels, paths, total=entry.get("images"))
    if problem:
        raise StageError(f"{where}: {problem}; rerun `dvc repro prepare`")
    files = [
        (shard_path(folder, f, where), None if m is None else shard_path(folder, m, where)) for f, m in names
    ]
    return files, counts, labels, paths


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(counts: list, labels: list, paths: list, *, total) -> str | None:
    """What is wrong with a split entry's numbers, or None."""
    for i, n in enumerate(counts):
        if not _whole(n) or n < 0:
            return f"shard {i} has images = {n!r}, not a count of images"
    for i, label in enumerate(labels):
        if not _whole(label):
            return f"label {label!r} of image {i} is not a class index (an integer)"
    for i, path in enumerate(paths):
        if not isinstance(path, str):
            return f"path {path!r} of image {i} is not a string"
    if not (len(labels) == len(paths) == sum(counts) == total):
        return (
            f"lists {sum(counts)} images in shards, {len(labels)} labels and {len(paths)} paths, "
            f"and says images = {total!r}"
        )
    return None


def shard_path(folder: Path, name, where: str) -> Path:
    """`folder / name` for a file the index names: a plain file name (not absolute, no path separator,
    no `..`) of a file inside `folder`. A link there is followed only into `folder` or to a DVC cache
    object (DVC's cache.type symlink checks every file out as such a link). Else a StageError."""
    plain = isinstance(name, str) and name not in ("", ".") and not os.path.isabs(name)
    if not plain or "/" in name or "\\" in name or ".." in name:
        raise StageError(
            f"{where} names the file {name!r}, which is not a file name inside the shards folder "
            f"{folder}; rerun `dvc repro prepare`"
        )
    path = folder / name
    target = path.resolve()
    if target.parent != folder.resolve() and not _dvc_cache_object(target):
        raise StageError(
            f"{where}: {path} links to {target}, outside the shards folder {folder}; "
            "replace the link by the file or rerun `dvc repro prepare`"
        )
    return path


def _dvc_cache_object(path: Path) -> bool:
    """Whether `path` is named as a DVC cache object is: <cache>/files/md5/<2 hex>/<30 hex> (DVC 3)
    or <cache>/<2 hex>/<30 hex> (DVC 2)."""
    return bool(re.fullmatch("[0-9a-f]{2}", path.parent.name) and re.fullmatch("[0-9a-f]{30}", path.name))
