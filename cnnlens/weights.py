"""Weights files as data: where the ImageNet weights come from, which tensors a network's backbone
needs, and whether a state_dict fits it.

Kept apart from model.py so that download_weights, which checks a local weights file, does not depend on
the model, loss and tensor code: an edit there must not rerun the download stages. torch is imported
inside the functions that need it, so that download_weights with IMAGENET1K_V1 or none never loads it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlens.cli import log
from cnnlens.errors import ParamsError, StageError
from cnnlens.files import sha256_file

if TYPE_CHECKING:
    from torch import nn

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_BYTES = 46_830_571
RESNET18_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"
# IMAGENET1K_V1 of the other ResNets, as torchvision lists it (tests/test_download.py compares), so that
# fetching them does not import torchvision; the hash prefix in the file name verifies the download
RESNET_URLS = {
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}

# Test-only overrides (the tests serve fake files on 127.0.0.1; DVC does not track these):
#   WEIGHTS_URL_OVERRIDE  replaces the IMAGENET1K_V1 URL; WEIGHTS_SHA256, if set, is its hash.
ENV_WEIGHTS_URL = "WEIGHTS_URL_OVERRIDE"
ENV_WEIGHTS_SHA256 = "WEIGHTS_SHA256"


def imagenet_weights(arch: str) -> tuple[str, int | None, str]:
    """(url, size or None, full SHA-256 or the hash prefix in the file name) of IMAGENET1K_V1."""
    if arch == "resnet18":
        return RESNET18_URL, RESNET18_BYTES, RESNET18_SHA256
    url = RESNET_URLS.get(arch) or torchvision_weights_url(arch)
    # torchvision names its files <name>-<first hex digits of the SHA-256>.pth (torch.hub checks the same)
    match = re.search(r"-([a-f0-9]{8,})\.", url.rsplit("/", 1)[-1])
    if not match:
        raise StageError(
            f"{url}: no hash prefix in the file name; cannot verify it. "
            "Download it yourself and set model.weights to its path."
        )
    return url, None, match.group(1)


def torchvision_weights_url(arch: str) -> str:
    """The IMAGENET1K_V1 URL torchvision lists for `arch`, which the archs outside RESNET_URLS need."""
    import torchvision  # slow to import (over a second): only for those archs

    try:
        return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    except (ValueError, AttributeError) as exc:
        raise ParamsError(
            f"model.arch = {arch!r} has no IMAGENET1K_V1 weights in torchvision "
            f"{torchvision.__version__} ({exc}); use model.weights: none or a local file"
        ) from None


def imagenet_source(arch: str) -> tuple[str, int | None, str | None]:
    """imagenet_weights(arch), or the test-only override WEIGHTS_URL_OVERRIDE (+ WEIGHTS_SHA256) when set."""
    if not os.environ.get(ENV_WEIGHTS_URL):
        return imagenet_weights(arch)
    url, sha = os.environ[ENV_WEIGHTS_URL], os.environ.get(ENV_WEIGHTS_SHA256) or None
    log(f"note: {ENV_WEIGHTS_URL} is set: fetching {url}" + ("" if sha else " unverified"))
    return url, None, sha


def imagenet_network(arch: str) -> nn.Module:
    """The architecture as its ImageNet weights file holds it (the 1000-way head), randomly initialised
    from torch's global RNG. The ResNets come from cnnlens/resnet.py, without torchvision's second of
    imports (it pulls in torch._dynamo); the other archs from torchvision, imported only for them."""
    from cnnlens.resnet import RESNETS, resnet

    if arch in RESNETS:
        return resnet(arch)
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


def head_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer: `fc` for ResNets, `classifier.N` for MobileNet/EfficientNet."""
    from torch import nn

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


def backbone_state(model: nn.Module, state: dict) -> tuple[dict, str]:
    """(the tensors of `state` outside the model's head, how they differ from the model's own; "" when
    they fit). The head is left out of the comparison: it is replaced for the new classes anyway."""
    head = head_name(model) + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    return given, describe_mismatch(own, given)


def check_weights_file(path: str | Path, arch: str, key: str = "model.weights") -> int:
    """Check that a local weights file is what initial_model will load: readable with weights_only=True,
    a dict of tensors, every backbone tensor of `arch` present with its shape. Returns the tensor count.
    Fails with one line naming `key` and the file as configured."""
    import torch

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
    _, problems = backbone_state(imagenet_network(arch), state)
    if problems:
        raise StageError(
            f"{key} = {str(path)!r} does not fit model.arch = {arch}: {problems}; "
            "point model.weights at weights for this architecture, or change model.arch"
        )
    return len(state)


def copy_local_weights(path: Path, arch: str, dest: Path) -> dict:
    """A local state_dict file, checked here (not first in finetune) and copied to `dest`; its weights.json."""
    if not path.is_file():
        raise ParamsError(
            f"model.weights = {str(path)!r} is not allowed: not IMAGENET1K_V1 or none, and no "
            f"such file (relative paths start at {Path.cwd()}); expected a state_dict .pth"
        )
    tensors = check_weights_file(path, arch)
    shutil.copyfile(path, dest)
    return {
        "source": "local",
        "url": None,
        "path": str(path.resolve()),
        "arch": arch,
        "tensors": tensors,
        "bytes": dest.stat().st_size,
        "sha256": sha256_file(dest),
    }
