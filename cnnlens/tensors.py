"""The prepared data as tensors: loading the packed splits, cropping, augmentation, normalisation.

Images stay uint8 (N x 3 x S x S) until a batch is drawn, so the whole train set fits on a GPU
(hymenoptera at S=256: 48 MB). Augmentation is one batched grid_sample per batch on the same
device, instead of PIL transforms per image per epoch.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlens.errors import StageError
from cnnlens.packing import INDEX
from cnnlens.shards import ShardedTensor, open_split

MEAN = (0.485, 0.456, 0.406)  # ImageNet, as in the tutorial
STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    images: torch.Tensor | ShardedTensor  # uint8 N x 3 x S x S
    labels: torch.Tensor  # int64 N
    paths: list[str]  # relative to the raw ImageFolder, e.g. "val/ants/123.jpg"
    masks: torch.Tensor | ShardedTensor | None  # uint8 N x S x S, 1 = object (synthetic data only)

    def __len__(self):
        return len(self.labels)

    def subset(self, index) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(
            self.images[index],
            self.labels[index],
            [self.paths[i] for i in index.tolist()],
            None if self.masks is None else self.masks[index],
        )


def load_split(prepared: str | Path, split: str, *, allow_empty: bool = False) -> Split:
    """The split as the prepare stage wrote it: memory-mapped shards (shards/index.json), read only
    where indexed. Checked against classes.json beside them: every label names one of its classes;
    and the split holds images unless `allow_empty`. A failed check is one StageError line."""
    prepared = Path(prepared)
    images, labels, paths, masks = open_split(prepared / "shards", split)
    index = prepared / "shards" / INDEX
    if len(labels) == 0 and not allow_empty:
        raise StageError(
            f"{index}: the {split} split holds no images; every stage after prepare needs train and val "
            f"images: rerun `dvc repro prepare` (and check that its data source has {split} images)"
        )
    classes = load_classes(prepared)
    outside = ((labels < 0) | (labels >= len(classes))).nonzero()
    if len(outside):
        i = int(outside[0, 0])
        raise StageError(
            f"{index}: label {int(labels[i])} of {split} image {i} ({paths[i]}) is outside the "
            f"{len(classes)} classes in {prepared / 'classes.json'}; rerun `dvc repro prepare`"
        )
    return Split(images, labels, paths, masks)


def load_classes(prepared: str | Path) -> list[str]:
    """classes.json: the class names in label order, checked: a JSON list of at least 2 distinct,
    non-empty strings, else one StageError line."""
    path = Path(prepared) / "classes.json"
    if not path.exists():
        raise StageError(f"{path}: not found; run `dvc repro prepare` first")
    try:
        classes = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise StageError(f"{path}: not valid JSON ({exc}); rerun `dvc repro prepare`") from None
    names = classes if isinstance(classes, list) else []
    if len(names) < 2 or not all(isinstance(c, str) and c for c in names) or len(set(names)) < len(names):
        raise StageError(
            f"{path}: expected a JSON list of at least 2 distinct class names, got {reprlib.repr(classes)}; "
            "rerun `dvc repro prepare`"
        )
    return classes


def select_images(split: Split, paths: list[str], count: int) -> Split:
    """Explicit manifest paths (validated), else `count` images spread evenly over the split,
    so every class appears and the same images are chosen run after run."""
    if paths:
        missing = [p for p in paths if p not in split.paths]
        if missing:
            raise StageError(
                f"image(s) not in the prepared val split: {', '.join(missing)}; "
                f"use paths like {split.paths[0]!r} (see data/prepared/manifest.csv)"
            )
        return split.subset([split.paths.index(p) for p in paths])
    if len(split) == 0:
        raise StageError("the val split is empty; nothing to explain")
    return split.subset(spread_index(len(split), count))


def spread_index(n: int, count: int) -> torch.Tensor:
    """`count` indices spread evenly over 0..n-1 (all of them when count >= n)."""
    return torch.linspace(0, n - 1, min(count, n)).round().long().unique()


def mean_std(device=None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as 1 x 3 x 1 x 1 tensors (torch's default dtype unless `dtype`), to broadcast
    over N x 3 x H x W images."""
    return (
        torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1),
        torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1),
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1] float N x 3 x H x W -> ImageNet-normalised float32."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean, std = mean_std(x.device)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised N x 3 x H x W -> [0,1] float, for display."""
    mean, std = mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of the last two dims (the tutorial's val CenterCrop on the packed square)."""
    h, w = images.shape[-2:]
    if size > min(h, w):
        raise StageError(
            f"crop {size} is larger than the prepared images ({h}x{w}); "
            "lower train.crop or raise prepare.resize"
        )
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def eval_inputs(images: torch.Tensor, crop: int) -> torch.Tensor:
    return normalize(center_crop(images, crop))


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Float images (N x C x H x W) blurred with a square Gaussian kernel, each channel alone, the
    borders reflected; the same numbers as torchvision.transforms.functional.gaussian_blur, whose
    import costs a second, with the same operations in the same order."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=images.dtype, device=images.device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel = torch.mm(kernel1d[:, None], kernel1d[None, :])
    channels = images.shape[-3]
    pad = kernel_size // 2
    padded = F.pad(images, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, kernel_size, kernel_size), groups=channels)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    *,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip for a whole uint8 batch in one grid_sample.
    Returns normalised float32 N x 3 x size x size on the images' device."""
    n, _, h, w = images.shape
    boxes = crop_boxes(n, h, w, scale=scale, ratio=ratio, flip=flip, generator=generator)
    return resample(images, boxes, size)


def crop_boxes(
    n: int, h: int, w: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, generator=None
) -> torch.Tensor:
    """n random crop boxes (and flips) of an h x w image as affine_grid matrices, N x 2 x 3.

    Drawn as torchvision draws them (area fraction in `scale`, log-uniform aspect ratio, 10 tries,
    then the whole square) on the CPU generator, so runs are reproducible on any device. The draws
    for a batch of n do not depend on which rows are cropped later: several processes draw a whole
    global batch's boxes and each resamples its own rows (cnnlens.training.Loop.batch).
    """
    tries = 10
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, cw[torch.arange(n), pick], torch.full((n,), float(min(h, w))))
    ch = torch.where(first >= 0, ch[torch.arange(n), pick], torch.full((n,), float(min(h, w))))
    x0 = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))
    y0 = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
    x0 = torch.where(first >= 0, x0, (w - cw) / 2)
    y0 = torch.where(first >= 0, y0, (h - ch) / 2)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w * sign
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    return theta


def resample(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each uint8 image's box (crop_boxes) resized to size x size (bilinear), normalised float32."""
    n = len(images)
    grid = F.affine_grid(boxes.to(images.device), [n, 3, size, size], align_corners=False)
    x = images.float() / 255.0
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(out)


def normalize_maps(
    maps: torch.Tensor, mode: str = "minmax", percentile: float = 99.0, *, per_channel: bool = False
) -> torch.Tensor:
    """Scale each map to [0, 1], per image (and per channel when per_channel).

    maps: N x C x H x W or N x H x W. "minmax": (m - min) / (max - min). "percentile":
    (m - min) / (q - min) clipped to [0, 1], with q the `percentile`-th percentile, so a few
    extreme pixels do not make the rest look black (q falls back to max when q == min).
    A constant map becomes zeros, never NaN.
    """
    if mode not in ("minmax", "percentile"):
        raise StageError(f"normalize = {mode!r}; allowed: minmax, percentile")
    m = maps.detach().float()
    shape = m.shape
    if per_channel and m.dim() == 4:
        flat = m.flatten(2).flatten(0, 1)  # (N*C) x HW
    else:
        flat = m.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    if mode == "percentile":
        # numpy's default 'linear' percentile, by sorting (torch.quantile refuses > 16M values)
        srt = flat.sort(dim=1).values
        pos = percentile / 100.0 * (srt.shape[1] - 1)
        i0 = int(pos)
        i1 = min(i0 + 1, srt.shape[1] - 1)
        q = (srt[:, i0] + (pos - i0) * (srt[:, i1] - srt[:, i0]))[:, None]
        hi = torch.where(q > lo, q, hi)
    span = hi - lo
    out = torch.where(
        span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat)
    )
    return out.clamp(0.0, 1.0).reshape(shape)


def combine_channels(maps: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x H x W by the max over channels (the tutorial's combined map).
    An N x H x W input is returned as it is."""
    if maps.dim() == 3:
        return maps
    if maps.dim() != 4:
        raise ValueError(f"maps must be N x C x H x W or N x H x W, got shape {tuple(maps.shape)}")
    return maps.amax(dim=1)
