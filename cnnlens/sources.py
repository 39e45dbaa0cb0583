"""Turning a data.source into an ImageFolder: <out>/{train,val}/<class>/<image> and <out>/SOURCE.json.

A source is one of
  hymenoptera     the PyTorch tutorial's ants/bees zip (size checked; hash pinned by data.sha256)
  synthetic       generated ants/bees-like images with object masks (cnnlens/synthetic.py), offline
  http(s)://...   any zip holding an ImageFolder (verified against data.sha256 when set)
  path/to.zip     a local zip, hashed (and verified against data.sha256 when set)
  path/to/dir     a local ImageFolder directory (train/<class>/<image>), copied
SOURCE.json records where the images came from and the hash that identifies them. The output is
written to a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from cnnlens.cli import die_with_parent, log
from cnnlens.errors import ParamsError, StageError
from cnnlens.fetch import DATA_HINT, download, safe_extract_zip
from cnnlens.files import atomic_path, sha256_file, write_json

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_BYTES = 47_286_322
# Test-only override (the tests serve fake files on 127.0.0.1; DVC does not track it):
#   HYMENOPTERA_URL  replaces the hymenoptera URL; the official size is then not checked.
ENV_HYMENOPTERA_URL = "HYMENOPTERA_URL"
IGNORED = shutil.ignore_patterns(".*", "__MACOSX")  # hidden files and macOS resource forks


def write_imagefolder(
    out: Path,
    source: str,
    *,
    sha256: str | None,
    timeout: float,
    retries: int,
    max_extract_mb: int,
    symlinks: str,
    seed: int,
    synthetic: dict,
) -> dict:
    """Write the ImageFolder of `source` (data.* values; `synthetic`: data.synthetic as a dict) to
    `out`, with SOURCE.json; returns what SOURCE.json says."""
    pinned = sha256.strip().lower() if sha256 else None
    if pinned is not None and not re.fullmatch(r"[0-9a-f]{64}", pinned):
        raise ParamsError(f"data.sha256 = {sha256!r} is not allowed; expected 64 hex digits or null")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(out) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work,
    ):
        tmp.mkdir()
        if source == "synthetic":
            info = write_synthetic(tmp, settings=synthetic, seed=seed)
            if sha256:
                log("note: data.sha256 is ignored for data.source = synthetic")
        elif source == "hymenoptera" or source.startswith(("http://", "https://")):
            info = get_url(
                source,
                Path(work),
                tmp,
                pinned=pinned,
                timeout=timeout,
                retries=retries,
                max_mb=max_extract_mb,
            )
        else:
            info = get_local(
                source, Path(work), tmp, out=out, pinned=pinned, max_mb=max_extract_mb, symlinks=symlinks
            )
        write_json(tmp / "SOURCE.json", info)
        summary = count_images(tmp)
    log(f"{out}: {summary} (source: {source})")
    if info.get("sha256") and pinned is None:
        log(
            f"data.sha256 is not set; recorded sha256 {info['sha256']} in {out / 'SOURCE.json'}. "
            f"To pin this archive, set `sha256: {info['sha256']}` under data: in params.yaml."
        )
    return info


def get_url(
    source: str, work: Path, tmp: Path, *, pinned: str | None, timeout: float, retries: int, max_mb: int
) -> dict:
    """The hymenoptera zip or any http(s) zip: download, verify, unpack into `tmp`."""
    if source == "hymenoptera":
        url = os.environ.get(ENV_HYMENOPTERA_URL) or HYMENOPTERA_URL
        size = HYMENOPTERA_BYTES if url == HYMENOPTERA_URL else None
    else:
        url, size = source, None
    archive = work / "archive.zip"
    got = download(
        url,
        archive,
        expected_size=size,
        expected_sha256=pinned,
        timeout=timeout,
        retries=retries,
        desc=Path(url).name or "archive",
        hint=DATA_HINT,
    )
    unpack(archive, work, tmp, max_mb=max_mb)
    return {
        "source": source,
        "url": url,
        "path": None,
        "bytes": got["bytes"],
        "sha256": got["sha256"],
        "sha256_pinned": pinned is not None,
    }


def get_local(
    source: str, work: Path, tmp: Path, *, out: Path, pinned: str | None, max_mb: int, symlinks: str
) -> dict:
    """A local ImageFolder directory or .zip, copied or unpacked into `tmp`."""
    path = Path(source)
    if path.is_dir():
        return copy_imagefolder(path, tmp, out=out, symlinks=symlinks)
    if not (path.is_file() and path.suffix.lower() == ".zip"):
        raise ParamsError(
            f"data.source = {source!r} is not allowed: not hymenoptera or synthetic, not an "
            "http(s) URL, and no such local .zip file or directory "
            f"(relative paths start at {Path.cwd()})"
        )
    digest = sha256_file(path)
    if pinned is not None and digest != pinned:
        raise StageError(
            f"{path}: expected SHA-256 {pinned} (data.sha256), got {digest}; "
            "the archive is not the pinned one. If it is trusted, update data.sha256."
        )
    unpack(path, work, tmp, max_mb=max_mb)
    return {
        "source": source,
        "url": None,
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": digest,
        "sha256_pinned": pinned is not None,
    }


def unpack(archive: Path, work: Path, tmp: Path, *, max_mb: int) -> None:
    """Extract a zip and move its ImageFolder root's contents into `tmp` (the output folder)."""
    unpacked = safe_extract_zip(archive, work / "unpacked", max_bytes=max_mb * 2**20)
    root = find_imagefolder_root(unpacked)
    for child in sorted(root.iterdir()):
        if not IGNORED(str(root), [child.name]):
            os.replace(child, tmp / child.name)


def find_imagefolder_root(directory) -> Path:
    """The folder that holds `train/`: `directory` itself or the shallowest one below it.

    Zips often wrap the data in a top folder (hymenoptera_data/train, hymenoptera_data/val).
    macOS resource folders (__MACOSX) and hidden folders are ignored.
    """
    directory = Path(directory)
    level = [directory]
    for _ in range(4):  # a few levels deep is plenty; deeper nesting is a different layout
        for folder in level:
            if (folder / "train").is_dir():
                return folder
        level = sorted(
            child
            for folder in level
            for child in folder.iterdir()
            if child.is_dir() and not child.name.startswith((".", "__MACOSX"))
        )
        if not level:
            break
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise StageError(
        f"{directory}: no train/ folder found (top level holds: {', '.join(found[:10]) or 'nothing'}); "
        "expected an ImageFolder layout train/<class>/<image>, optionally val/<class>/<image>"
    )


def copy_imagefolder(path: Path, tmp: Path, *, out: Path, symlinks: str) -> dict:
    """A local ImageFolder directory's files copied into `tmp` (links as plain files, by data.symlinks)."""
    src, dst = path.resolve(), out.resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise ParamsError(
            f"data.source = {str(path)!r} overlaps the output folder {out}; "
            "point it at an ImageFolder directory elsewhere"
        )
    root = find_imagefolder_root(src)
    entries, links = source_files(root, symlinks)
    for rel, file in entries:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, tmp / rel)  # a link becomes a plain file: nothing outside is referenced
    # A directory has no single hash; a hash over the sorted (path, file hash) list identifies its content.
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    tree = hashlib.sha256()
    for f in files:
        tree.update(f"{sha256_file(f)}  {f.relative_to(tmp).as_posix()}\n".encode())
    return {
        "source": "local_dir",
        "url": None,
        "path": str(root),
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": None,
        "tree_sha256": tree.hexdigest(),
        "files": len(files),
        "symlinks": {"mode": symlinks, "copied": links},
    }


def source_files(root: Path, mode: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """[(relative path, file to read)] under `root` and the symlinks among them, by data.symlinks.

    Hidden files and __MACOSX are left out. A link is refused when it dangles, when mode is refuse,
    when it leaves `root` (mode inside), and always when it puts one file into two <split>/<class>
    folders (train/val leakage or two labels); a link to a folder brings the folder's files.
    """
    entries, links, seen = [], [], {}
    # (folder to list, its relative path, the link it was reached through, the real folders above it)
    todo = [(root, "", None, frozenset({root.resolve()}))]
    while todo:
        folder, prefix, via, chain = todo.pop(0)
        for entry in sorted(folder.iterdir()):
            if IGNORED(str(folder), [entry.name]):
                continue
            rel, reached = prefix + entry.name, via
            if entry.is_symlink():
                check_link(root, rel, entry, mode=mode)
                links.append(rel)
                reached = rel
            if entry.is_dir():
                real = entry.resolve()
                if real in chain:
                    raise StageError(
                        f"{root}: symlink {reached} -> {real} loops back to a folder above it; remove it"
                    )
                todo.append((entry, rel + "/", reached, chain | {real}))
            elif entry.is_file():
                group, real = "/".join(rel.split("/")[:2]), entry.resolve()
                if seen.setdefault(real, (group, rel))[0] != group:
                    other = seen[real][1]
                    raise StageError(
                        f"{root}: symlink {reached or rel} makes {real} appear as {other} and as {rel} "
                        f"(in both {seen[real][0]} and {group}: leakage or two labels); remove the link"
                    )
                entries.append((rel, entry))
    return entries, links


def check_link(root: Path, rel: str, link: Path, *, mode: str) -> None:
    """Refuse the link at `rel` by data.symlinks = `mode` (always when it dangles)."""
    target = os.readlink(link)
    if mode == "refuse":
        raise StageError(
            f"{root}: {rel} is a symlink (-> {target}) and data.symlinks = refuse; "
            "replace it with the file, or set data.symlinks: inside"
        )
    if not link.exists():
        raise StageError(f"{root}: {rel} is a dangling symlink (-> {target}); remove it or fix its target")
    real = link.resolve()
    if mode == "inside" and root.resolve() not in real.parents:
        raise StageError(
            f"{root}: symlink {rel} points outside the data source (-> {real}); copy the file into "
            "the folder or remove the link (data.symlinks: follow allows it)"
        )


def write_synthetic(tmp: Path, *, settings: dict, seed: int) -> dict:
    """The synthetic images, masks and annotations.csv in `tmp`; `settings`: data.synthetic as a dict."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cnnlens import synthetic

    counts = synthetic.counts_from_settings(settings)
    jobs = [(*key, settings["image_size"], seed) for key in synthetic.sample_keys(counts)]
    rows = []
    # rendering is pure Python drawing (GIL-bound): one process per core; spawn, as the parent may hold torch
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(os.cpu_count() or 1, 8), mp_context=ctx, initializer=die_with_parent
    ) as pool:
        work = pool.map(synthetic.render_png, jobs, chunksize=16)
        bar = tqdm(
            work, total=len(jobs), desc="synthetic", unit="img", file=sys.stderr, leave=False, disable=None
        )
        for (split, class_name, index, *_), (image, mask, box) in zip(jobs, bar):
            rel = f"{split}/{class_name}/{index:04d}.png"
            mask_rel = f"masks/{rel}"
            for name, data in ((rel, image), (mask_rel, mask)):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            rows.append((rel, mask_rel, *box))
    with open(tmp / "annotations.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "mask", "x0", "y0", "x1", "y1"))
        writer.writerows(rows)
    return {
        "source": "synthetic",
        "url": None,
        "path": None,
        "bytes": None,
        "sha256": None,
        "seed": seed,
        "synthetic": dict(settings),
        "images": len(rows),
    }


def count_images(root: Path) -> str:
    parts = []
    for split in ("train", "val"):
        if (root / split).is_dir():
            classes = sorted(d for d in (root / split).iterdir() if d.is_dir())
            counts = ", ".join(f"{d.name} {sum(1 for f in d.rglob('*') if f.is_file())}" for d in classes)
            parts.append(f"{split}: {counts or 'no class folders'}")
    return "; ".join(parts)
