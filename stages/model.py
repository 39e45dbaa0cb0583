"""Building, loading and saving the classifier: a torchvision network with a new head.

Weights are always read with torch.load(weights_only=True): a checkpoint is data, never code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.fileio import StageError, atomic_path, load_torch, read_json


def head_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer: `fc` for ResNets, `classifier.N` for MobileNet/EfficientNet."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise StageError(f"{type(model).__name__} has no Linear layer to use as the classification head")
    return names[-1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """The ImageNet architecture with its 1000-way head replaced by `num_classes` outputs."""
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as exc:
        raise StageError(f"unknown model.arch {arch!r}: {exc}") from exc
    name = head_name(model)
    old = get_module(model, name)
    set_module(model, name, nn.Linear(old.in_features, num_classes))
    return model


def load_backbone(model: nn.Module, state: dict, source: str) -> None:
    """Load ImageNet (or any) weights into everything but the head; the head keeps its fresh init.

    Every backbone tensor must be present with the right shape: a file for another architecture
    fails here with a clear message instead of training a half-initialised network.
    """
    head = head_name(model) + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    problems = describe_mismatch(own, given)
    if problems:
        raise StageError(f"{source}: these weights do not fit {type(model).__name__}: {problems}; "
                         "check model.arch and model.weights")
    model.load_state_dict(given, strict=False)


def describe_mismatch(expected: dict, given: dict) -> str:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model: {'; '.join(shapes[:3])})")
    return ", ".join(parts)


def initial_model(arch: str, num_classes: int, weights_dir: str | Path) -> tuple[nn.Module, dict]:
    """The untuned network: downloaded weights (or random init) with a new head, as in the tutorial.

    The head's init comes from torch's global RNG: seed it first for reproducible runs.
    """
    info = read_json(Path(weights_dir) / "weights.json")
    model = build_model(arch, num_classes)
    if info.get("source") != "none":
        path = Path(weights_dir) / "weights.pth"
        state = load_torch(path, what="backbone weights")
        if not isinstance(state, dict):
            raise StageError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
        load_backbone(model, state, str(path))
    return model, info


def save_checkpoint(models_dir: str | Path, model: nn.Module, meta: dict) -> None:
    """models/model.pt (state_dict only) + models/model.json, written together atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(models_dir) as tmp:
        tmp.mkdir()
        torch.save(state, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(models_dir: str | Path) -> tuple[nn.Module, dict]:
    meta = read_json(Path(models_dir) / "model.json")
    path = Path(models_dir) / "model.pt"
    state = load_torch(path, what="model checkpoint")
    model = build_model(meta["arch"], len(meta["classes"]))
    problems = describe_mismatch(model.state_dict(), state)
    if problems:
        raise StageError(f"{path} does not fit {meta['arch']} with {len(meta['classes'])} classes "
                         f"(as {models_dir}/model.json says): {problems}; rerun `dvc repro finetune`")
    model.load_state_dict(state)
    return model.eval(), meta
