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
from cnnlens.figures import chw_to_hwc, write_saliency_figures
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
            heading = f"{METHODS[name].label} ({METHODS[name].describe()})"
            write_saliency_figures(
                folder / name,
                maps,
                images,
                titles=[f"{heading}\n{t}" for t in titles],
                stems=[names[p] for p in paths],
                label=METHODS[name].label,
                note=pixel_note(name, backend.model, x),
                normalize=NORMALIZE,
                percentile=PERCENTILE,
            )

    return write
