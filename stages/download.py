"""Stages download_data and download_weights: get the raw images and the pretrained weights.

    python -m stages.download data --out data/raw [--params params.yaml]
    python -m stages.download weights --out data/weights [--params params.yaml]

data (params data.*): `source` is one of
  hymenoptera     the PyTorch tutorial's ants/bees zip (size checked; hash pinned by data.sha256)
  synthetic       generated ants/bees-like images with object masks (cnnlens/synthetic.py), offline
  http(s)://...   any zip holding an ImageFolder (verified against data.sha256 when set)
  path/to.zip     a local zip, hashed (and verified against data.sha256 when set)
  path/to/dir     a local ImageFolder directory (train/<class>/<image>), copied
and the result is data/raw/{train,val}/<class>/<image> plus data/raw/SOURCE.json.

weights (params model.*): `weights` is IMAGENET1K_V1 (torchvision's file for model.arch, always
verified), none (random init; only weights.json is written) or a path to a state_dict file.
The output folder holds weights.pth (when any) and weights.json {source, url, arch, bytes, sha256}.
Nothing is loaded here: the finetune stage loads weights.pth with weights_only=True.

Both outputs are written to a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from cnnlens.cli import die_with_parent, log, run_main
from cnnlens.config import load_params
from cnnlens.errors import ParamsError, StageError
from cnnlens.fetch import download, find_imagefolder_root, safe_extract_zip
from cnnlens.files import atomic_path, lock_outputs, sha256_file, write_json

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_BYTES = 47_286_322
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_BYTES = 46_830_571
RESNET18_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"

# Test-only overrides (the tests serve fake files on 127.0.0.1; DVC does not track these):
#   HYMENOPTERA_URL       replaces the hymenoptera URL; the official size is then not checked.
#   WEIGHTS_URL_OVERRIDE  replaces the IMAGENET1K_V1 URL; WEIGHTS_SHA256, if set, is its hash.
ENV_HYMENOPTERA_URL = "HYMENOPTERA_URL"
ENV_WEIGHTS_URL = "WEIGHTS_URL_OVERRIDE"
ENV_WEIGHTS_SHA256 = "WEIGHTS_SHA256"

DATA_HINT = (
    "To work offline: `make demo` uses synthetic data; or set data.source in params.yaml "
    "to a local .zip or ImageFolder directory."
)
WEIGHTS_HINT = (
    "To work offline: set model.weights: none (random init, as `make demo` does) or "
    "model.weights: path/to/state_dict.pth in params.yaml."
)
IGNORED = shutil.ignore_patterns(".*", "__MACOSX")  # hidden files and macOS resource forks


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("data", "weights"), help="which output to fetch")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/raw or data/weights)")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    p = load_params(args.params)
    lock_outputs(args.out)
    if args.what == "data":
        get_data(p, args.out)
    else:
        get_weights(p, args.out)


# ---------------------------------------------------------------------------------------------
# data


def get_data(p, out: Path) -> None:
    source = p.data.source
    pinned = p.data.sha256.strip().lower() if p.data.sha256 else None
    if pinned is not None and not re.fullmatch(r"[0-9a-f]{64}", pinned):
        raise ParamsError(f"data.sha256 = {p.data.sha256!r} is not allowed; expected 64 hex digits or null")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(out) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work,
    ):
        tmp.mkdir()
        if source == "synthetic":
            info = write_synthetic(p, tmp)
        elif source == "hymenoptera" or source.startswith(("http://", "https://")):
            info = get_url(p, pinned, Path(work), tmp)
        else:
            info = get_local(p, pinned, out, Path(work), tmp)
        write_json(tmp / "SOURCE.json", info)
        summary = count_images(tmp)
    log(f"{out}: {summary} (source: {source})")
    if info.get("sha256") and pinned is None:
        log(
            f"data.sha256 is not set; recorded sha256 {info['sha256']} in {out / 'SOURCE.json'}. "
            f"To pin this archive, set `sha256: {info['sha256']}` under data: in params.yaml."
        )


def get_url(p, pinned: str | None, work: Path, tmp: Path) -> dict:
    """The hymenoptera zip or any http(s) zip: download, verify, unpack into `tmp`."""
    source = p.data.source
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
        timeout=p.data.timeout,
        retries=p.data.retries,
        desc=Path(url).name or "archive",
        hint=DATA_HINT,
    )
    unpack(p, archive, work, tmp)
    return {
        "source": source,
        "url": url,
        "path": None,
        "bytes": got["bytes"],
        "sha256": got["sha256"],
        "sha256_pinned": pinned is not None,
    }


def get_local(p, pinned: str | None, out: Path, work: Path, tmp: Path) -> dict:
    """A local ImageFolder directory or .zip, copied or unpacked into `tmp`."""
    source = p.data.source
    path = Path(source)
    if path.is_dir():
        return copy_imagefolder(path, out, tmp, p.data.symlinks)
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
    unpack(p, path, work, tmp)
    return {
        "source": source,
        "url": None,
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": digest,
        "sha256_pinned": pinned is not None,
    }


def unpack(p, archive: Path, work: Path, tmp: Path) -> None:
    """Extract a zip and move its ImageFolder root's contents into `tmp` (the output folder)."""
    unpacked = safe_extract_zip(archive, work / "unpacked", max_bytes=p.data.max_extract_mb * 2**20)
    root = find_imagefolder_root(unpacked)
    for child in sorted(root.iterdir()):
        if not IGNORED(str(root), [child.name]):
            os.replace(child, tmp / child.name)


def copy_imagefolder(path: Path, out: Path, tmp: Path, symlinks: str) -> dict:
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
                check_link(root, rel, entry, mode)
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


def check_link(root: Path, rel: str, link: Path, mode: str) -> None:
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


def write_synthetic(p, tmp: Path) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cnnlens import synthetic

    s = p.data.synthetic
    counts = synthetic.counts_from_params(s)
    jobs = [(*key, s.image_size, p.seed) for key in synthetic.sample_keys(counts)]
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
    if p.data.sha256:
        log("note: data.sha256 is ignored for data.source = synthetic")
    return {
        "source": "synthetic",
        "url": None,
        "path": None,
        "bytes": None,
        "sha256": None,
        "seed": p.seed,
        "synthetic": dataclasses.asdict(s),
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


# ---------------------------------------------------------------------------------------------
# weights


def imagenet_weights(arch: str) -> tuple[str, int | None, str]:
    """(url, size or None, full SHA-256 or the hash prefix in the file name) of IMAGENET1K_V1."""
    if arch == "resnet18":
        return RESNET18_URL, RESNET18_BYTES, RESNET18_SHA256
    import torchvision  # slow to import; only needed for the other archs

    try:
        url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    except (ValueError, AttributeError) as exc:
        raise ParamsError(
            f"model.arch = {arch!r} has no IMAGENET1K_V1 weights in torchvision "
            f"{torchvision.__version__} ({exc}); use model.weights: none or a local file"
        ) from None
    # torchvision names its files <name>-<first hex digits of the SHA-256>.pth (torch.hub checks the same)
    match = re.search(r"-([a-f0-9]{8,})\.", url.rsplit("/", 1)[-1])
    if not match:
        raise StageError(
            f"{url}: no hash prefix in the file name; cannot verify it. "
            "Download it yourself and set model.weights to its path."
        )
    return url, None, match.group(1)


def get_weights(p, out: Path) -> None:
    arch, choice = p.model.arch, p.model.weights
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if choice == "none":
            info = {"source": "none", "url": None, "arch": arch, "bytes": None, "sha256": None}
        elif choice == "IMAGENET1K_V1":
            url, size, sha = imagenet_weights(arch)
            if os.environ.get(ENV_WEIGHTS_URL):
                url, size, sha = os.environ[ENV_WEIGHTS_URL], None, os.environ.get(ENV_WEIGHTS_SHA256) or None
                log(f"note: {ENV_WEIGHTS_URL} is set: fetching {url}" + ("" if sha else " unverified"))
            got = download(
                url,
                tmp / "weights.pth",
                expected_size=size,
                expected_sha256=sha,
                timeout=p.data.timeout,
                retries=p.data.retries,
                desc=f"{arch} weights",
                hint=WEIGHTS_HINT,
            )
            info = {
                "source": choice,
                "url": url,
                "arch": arch,
                "bytes": got["bytes"],
                "sha256": got["sha256"],
            }
        else:
            info = local_weights(Path(choice), arch, tmp)
        write_json(tmp / "weights.json", info)
    what = (
        "no weights (random init)"
        if info["source"] == "none"
        else f"{info['bytes']} bytes, sha256 {info['sha256']}"
    )
    log(f"{out}: {arch} {choice}: {what}")


def local_weights(path: Path, arch: str, tmp: Path) -> dict:
    """A local state_dict file, checked here (not first in finetune) and copied into `tmp`."""
    if not path.is_file():
        raise ParamsError(
            f"model.weights = {str(path)!r} is not allowed: not IMAGENET1K_V1 or none, and no "
            f"such file (relative paths start at {Path.cwd()}); expected a state_dict .pth"
        )
    from cnnlens.weights import check_weights_file  # imports torch: only for a local file

    tensors = check_weights_file(path, arch)
    shutil.copyfile(path, tmp / "weights.pth")
    return {
        "source": "local",
        "url": None,
        "path": str(path.resolve()),
        "arch": arch,
        "tensors": tensors,
        "bytes": (tmp / "weights.pth").stat().st_size,
        "sha256": sha256_file(tmp / "weights.pth"),
    }


if __name__ == "__main__":
    run_main(main)
