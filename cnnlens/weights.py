"""Weights files as data: which tensors a network's backbone needs, and whether a state_dict fits it.

Kept apart from model.py so that download_weights, which checks a local weights file, does not depend on
the model, loss and tensor code: an edit there must not rerun the download stages.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cnnlens.errors import StageError


def head_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer: `fc` for ResNets, `classifier.N` for MobileNet/EfficientNet."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise StageError(f"{type(model).__name__} has no Linear layer to use as the classification head")
    return names[-1]


def describe_mismatch(expected: dict, given: dict) -> str:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model: {'; '.join(shapes[:3])})")
    return ", ".join(parts)


def check_weights_file(path: str | Path, arch: str, key: str = "model.weights") -> int:
    """Check that a local weights file is what initial_model will load: readable with weights_only=True,
    a dict of tensors, every backbone tensor of `arch` present with its shape. Returns the tensor count.
    Fails with one line naming `key` and the file as configured."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for text, corrupt or unsafe files
        text = str(exc)
        if "WeightsUnpickler error:" in text:  # torch's long advice hides the reason in the middle
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        why = " ".join(text.split())[:160]
        raise StageError(
            f"{key} = {str(path)!r} is not a checkpoint that loads with weights_only=True "
            f"({type(exc).__name__}: {why}); expected a state_dict .pth for {arch}, "
            "saved with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageError(
            f"{key} = {str(path)!r} holds a {type(state).__name__}, not a state_dict (a dict of tensors); "
            f"save one with torch.save(model.state_dict(), path) for {arch}"
        )
    import torchvision  # here, not at the top: it takes ~3 s to import, and the data stages never need it

    model = torchvision.models.get_model(arch, weights=None)  # its head is left out of the comparison
    head = head_name(model) + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    problems = describe_mismatch(own, {k: v for k, v in state.items() if not k.startswith(head)})
    if problems:
        raise StageError(
            f"{key} = {str(path)!r} does not fit model.arch = {arch}: {problems}; "
            "point model.weights at weights for this architecture, or change model.arch"
        )
    return len(state)
