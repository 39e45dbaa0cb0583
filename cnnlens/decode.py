"""Decoding and resizing raw images for the prepare stage.

Every file is decoded fully (so truncated and corrupt files are caught here, not mid-training),
converted to 8-bit RGB whatever its mode, turned upright by its EXIF orientation, and resized.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# torchvision's ImageFolder loads exactly these; anything else (e.g. the .gif placeholder in
# hymenoptera's train/ants) is reported as skipped, as ImageFolder would silently skip it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
