"""`python -m cnnlens.predict --explain`: saliency figures of image files, drawn as the saliency stage draws them.

One figure per image and method (the input, |map| per channel, the combined map, the overlay; Grad-CAM: its
map and the overlay), with the stage's colour map and scale (cnnlens.figures.saliency_figure,
figures.display_maps). The maps explain each image's predicted class (its largest logit), as in the stage,
with the methods' default settings (attribution.SMOOTHGRAD_SIGMA, ...) and the default display scale.
Imports torch: cnnlens.predict imports this module only for --explain, which needs the torch backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnlens.attribution import METHODS, explain, pixel_note
from cnnlens.figures import chw_to_hwc, display_maps, saliency_figure, save_figure, scale_label
from cnnlens.tensors import denormalize, eval_inputs

# the display scale of params.yaml's saliency section by default (saliency.normalize, saliency.percentile)
NORMALIZE, PERCENTILE = "minmax", 99.0


def figure_writer(backend, methods: list[str], folder: Path, *, names: dict, seed: int, batch_size: int = 16):
    """A callback for predict.predict_files: (squares, logits, proba, paths) of a batch -> one figure per
    image and method, `folder`/<method>/<names[path]>.png."""
    classes, crop = backend.meta["classes"], backend.meta["input_size"]

    def write(squares: np.ndarray, logits: np.ndarray, *, proba: np.ndarray, paths: list) -> None:
        x = eval_inputs(torch.from_numpy(squares), crop).to(backend.device)
        target = torch.from_numpy(np.asarray(logits).argmax(1))
        images = [chw_to_hwc(im) for im in denormalize(x.cpu())]
        titles = [
            f"{path}\npredicted {classes[int(t)]} (p={proba[i, int(t)]:.2f})"
            for i, (path, t) in enumerate(zip(paths, target))
        ]
        for name in methods:
            maps = explain(name, backend.model, x, target=target, seed=seed, batch_size=batch_size)
            write_figures(
                folder / name,
                maps,
                images,
                titles=titles,
                stems=[names[p] for p in paths],
                label=METHODS[name].label,
                title=f"{METHODS[name].label} ({METHODS[name].describe()})",
                note=pixel_note(name, backend.model, x),
            )

    return write


def write_figures(
    folder: Path,
    maps: torch.Tensor,
    images: list,
    *,
    titles: list[str],
    stems: list[str],
    label: str,
    title: str,
    note: str,
    normalize: str = NORMALIZE,
    percentile: float = PERCENTILE,
) -> None:
    """One saliency figure per image, `folder`/<stem>.png, as the saliency stage's figures/<method>/<image>.png:
    raw maps N x C x H x W scaled for display by figures.display_maps(normalize, percentile)."""
    channels, combined = display_maps(maps, normalize, percentile)
    scale = scale_label(normalize, percentile)
    for i, stem in enumerate(stems):
        figure = saliency_figure(
            images[i],
            channels[i].numpy(),
            combined[i].numpy(),
            title=f"{title}\n{titles[i]}",
            method=label,
            scale=scale,
            map_note=note,
        )
        save_figure(figure, folder / f"{stem}.png")
