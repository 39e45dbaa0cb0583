"""Matplotlib figures. Functions return figures; stages save them with save_figure."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC, CI and on GPU machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.fileio import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def image_grid(images: list[np.ndarray], titles: list[str], cols: int = 4, size: float = 2.6,
               suptitle: str = "", title_colors: list[str] | None = None):
    """H x W x 3 float [0,1] (or H x W) images in a grid with one title each."""
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size + (0.4 if suptitle else 0)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, title) in enumerate(zip(images, titles)):
        ax = axes.ravel()[i]
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray")
        ax.set_title(title, fontsize=8, color=(title_colors[i] if title_colors else "black"))
    if not images:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def chw_to_hwc(x) -> np.ndarray:
    """C x H x W tensor/array in [0,1] -> H x W x C numpy."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(arr.transpose(1, 2, 0), 0, 1)
