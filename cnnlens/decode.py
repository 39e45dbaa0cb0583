"""Decoding and resizing raw images for the prepare stage.

Every file is decoded fully (so truncated and corrupt files are caught here, not mid-training),
converted to 8-bit RGB whatever its mode, turned upright by its EXIF orientation, and resized.
`decode_stream` does that for a whole ImageFolder on a thread pool, a bounded number of images at
a time, so memory does not grow with the number of images.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from cnnlens.errors import StageError
from cnnlens.files import sha256_file

# torchvision's ImageFolder loads exactly these; anything else (e.g. the .gif placeholder in
# hymenoptera's train/ants) is reported as skipped, as ImageFolder would silently skip it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False
# JPEG stores at most 65,535 px a side; anything the resize makes larger cannot be a prepared image
JPEG_MAX_SIDE = 65_535


class BadImage(Exception):
    """A file that cannot become a training image; the message is the reason for the report."""


def decode_rgb(
    path: str | Path, max_pixels: int, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open, fully decode and convert one file; returns (RGB image, original (width, height))."""
    path = Path(path)
    if path.suffix.lower() not in IMG_EXTENSIONS:
        raise BadImage(f"extension {path.suffix or '(none)'} is not an image type ImageFolder loads")
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(
                    f"declared size {width}x{height} exceeds prepare.max_pixels={max_pixels} "
                    "(possible decompression bomb)"
                )
            if draft_size and img.format == "JPEG":
                # decode at a reduced DCT scale that is still >= the target: same pixels out of
                # the resize, several times less decoding work on the 2592x1944 originals
                img.draft("RGB", _draft_box(img.size, draft_size))
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None
    return to_rgb(ImageOps.exif_transpose(img)), (width, height)


def _draft_box(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    w, h = size
    scale = short_side / min(w, h)
    return max(1, int(w * scale) + 1), max(1, int(h * scale) + 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16/32-bit is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1


def resize_short_side(img: Image.Image, side: int, resample=Image.BILINEAR) -> Image.Image:
    w, h = img.size
    if min(w, h) == side:
        return img
    scale = side / min(w, h)
    new = (max(side, round(w * scale)), max(side, round(h * scale)))
    return img.resize(new, resample=resample, reducing_gap=None)


def center_square(img: Image.Image) -> Image.Image:
    """The centre square of an image whose short side is already the target size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def scan_imagefolder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: [files]}} for root/{train,val}/<class>/<file>; val may be absent.

    Hidden files are listed too (and later reported), so nothing in the raw data goes unseen.
    """
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            continue
        splits[split] = {
            d.name: sorted(f for f in d.rglob("*") if f.is_file())
            for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".")
        }
    return splits


def stratified_split(files: dict[str, list[Path]], val_fraction: float, seed: int):
    """Split {class: files} into train/val per class with a seeded shuffle (at least 1 of each)."""
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for cls, paths in files.items():
        order = rng.permutation(len(paths))
        n_val = min(max(1, round(len(paths) * val_fraction)), len(paths) - 1) if len(paths) > 1 else 0
        val[cls] = sorted(paths[i] for i in order[:n_val])
        train[cls] = sorted(paths[i] for i in order[n_val:])
    return {"train": train, "val": val}


def prepare_image(
    raw: Path, path: Path, mask_path: Path | None, *, side: int, max_pixels: int, max_aspect: float
):
    """Decode one file and resize its short side to `side`; returns the manifest record, the resized
    image as JPEG bytes, the packed centre square (C, H, W uint8) and its mask (or None).

    An image the pipeline cannot store or use (an aspect ratio over `max_aspect`, a resized side
    over JPEG's limit, a failed encode) is a BadImage, as is one decode_rgb refuses."""
    img, (w, h) = decode_rgb(path, max_pixels, draft_size=side)
    ratio = max(img.size) / min(img.size)
    if ratio > max_aspect:
        raise BadImage(f"aspect ratio {ratio:.0f}:1 ({w}x{h}) exceeds prepare.max_aspect={max_aspect:g}")
    resized = resize_short_side(img, side)
    if max(resized.size) > JPEG_MAX_SIDE:
        raise BadImage(
            f"resized to {resized.size[0]}x{resized.size[1]}: over JPEG's {JPEG_MAX_SIDE} px a side"
        )
    encoded = io.BytesIO()
    try:
        resized.save(encoded, format="JPEG", quality=95)
    except (OSError, ValueError) as exc:
        raise BadImage(
            f"cannot encode the resized {resized.size[0]}x{resized.size[1]} image as JPEG: {exc}"
        ) from None
    square = to_chw_uint8(center_square(resized))
    mask = None
    if mask_path is not None:
        m = Image.open(mask_path).convert("L").resize(img.size, Image.NEAREST)
        mask = (np.asarray(center_square(resize_short_side(m, side, Image.NEAREST))) > 127).astype(np.uint8)
    record = {
        "path": path.relative_to(raw).as_posix(),
        "orig_width": w,
        "orig_height": h,
        "sha256": sha256_file(path),
        "box": mask_box(mask),
    }
    return record, encoded.getvalue(), square, mask


def mask_box(mask) -> str:
    """ "x0 y0 x1 y1" (x1, y1 exclusive) around a mask's pixels; "" for no mask or an empty one."""
    if mask is None or not mask.any():
        return ""
    ys, xs = np.nonzero(mask)
    return f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"


def prepared_name(raw: Path, job: tuple[str, str, Path]) -> str:
    """<split>/<class>/<path inside the class folder> of job (split, class, path), plus .jpg unless it
    already ends so: distinct sources (img.bmp, img.png, sub/img.jpg) stay distinct prepared files."""
    split, cls, path = job
    inside = "/".join(path.relative_to(raw).parts[2:])
    return f"{split}/{cls}/{inside}" + ("" if inside.endswith(".jpg") else ".jpg")


def check_names(raw: Path, jobs: list) -> dict:
    """{job: prepared name}; two sources that would still share a name are refused, both named."""
    names, owner = {}, {}
    for job in jobs:
        name = prepared_name(raw, job)
        if name in owner:
            first, second = (j[2].relative_to(raw).as_posix() for j in (owner[name], job))
            raise StageError(f"{raw}: {first} and {second} would both become {name}; rename one of them")
        owner[name], names[job] = job, name
    return names


def read_annotations(raw: Path) -> dict[str, Path]:
    """{image path: mask file} from the synthetic source's annotations.csv, if there is one."""
    listing = raw / "annotations.csv"
    if not listing.exists():
        return {}
    with open(listing, newline="", encoding="utf-8") as fh:
        return {row["path"]: raw / row["mask"] for row in csv.DictReader(fh) if row["mask"]}


def bounded_map(fn, items: list, *, workers: int, depth: int):
    """fn over items on a thread pool, results in order, at most `depth` submitted and not yet taken:
    memory holds a few decoded images, however many there are."""
    pool = ThreadPoolExecutor(workers)  # PIL releases the GIL while decoding and resizing
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # a stop (SIGTERM from a dying dvc, Ctrl-C) must not wait for every queued image
        pool.shutdown(cancel_futures=True)


def decode_stream(
    raw: Path, splits: dict, classes: list[str], *, side: int, max_pixels: int, max_aspect: float
):
    """prepare_image over every file of `splits` ({split: {class: [files]}}, scan_imagefolder's), in
    order: yields (job, result or None, prepared name or the skip reason), job = (split, class, file)."""
    masks = read_annotations(raw)
    jobs = [(split, cls, f) for split in ("train", "val") for cls in classes for f in splits[split][cls]]
    names = check_names(raw, jobs)
    limits = {"side": side, "max_pixels": max_pixels, "max_aspect": max_aspect}

    def work(job):
        split, cls, f = job
        try:
            return job, prepare_image(raw, f, masks.get(f.relative_to(raw).as_posix()), **limits), names[job]
        except BadImage as exc:
            return job, None, str(exc)

    workers = min(32, (os.cpu_count() or 1) + 4)
    results = bounded_map(work, jobs, workers=workers, depth=4 * workers)
    # not at the top: predict's onnx backend imports this module with numpy and Pillow only
    from tqdm import tqdm

    yield from tqdm(results, total=len(jobs), desc="prepare", unit="img", leave=False, disable=None)
