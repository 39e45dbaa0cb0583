"""cnnlens/resnet.py against torchvision: the same tensors from the same seed, the same forward, and
no torchvision (nor torch._dynamo, which it drags in) imported by the stages that use a ResNet; nor
pandas by any stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cnnlens.model import ARCHS, build_model, get_module, set_module
from cnnlens.resnet import RESNETS
from cnnlens.weights import head_name, imagenet_network

ROOT = Path(__file__).resolve().parents[1]


def torchvision_model(arch: str, num_classes: int) -> nn.Module:
    """What build_model built before cnnlens/resnet.py: torchvision's network, its head replaced."""
    model = torchvision.models.get_model(arch, weights=None)
    name = head_name(model)
    set_module(model, name, nn.Linear(get_module(model, name).in_features, num_classes))
    return model


@pytest.mark.parametrize(
    "arch, seed, num_classes",
    [("resnet18", 0, 2), ("resnet18", 7, 10), ("resnet34", 1, 2), ("resnet34", 3, 5), ("resnet50", 2, 2)],
)
def test_build_model_draws_the_same_resnet_as_torchvision(arch, seed, num_classes):
    torch.manual_seed(seed)
    ours = build_model(arch, num_classes)
    ours_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    theirs = torchvision_model(arch, num_classes)
    assert torch.equal(ours_rng, torch.get_rng_state()), "the construction drew other random numbers"
    assert type(ours).__name__ == type(theirs).__name__ == "ResNet"
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == [
        (n, type(m).__name__) for n, m in theirs.named_modules()
    ]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for train in (False, True):  # train mode: batch statistics (and the running stats it updates)
            assert torch.equal(ours.train(train)(x), theirs.train(train)(x)), f"train={train}"
    for key in ref:
        assert torch.equal(ours.state_dict()[key], theirs.state_dict()[key]), key


def test_the_imagenet_network_of_each_resnet_has_torchvision_s_keys_and_shapes():
    """The 1000-way network the weights files are checked against (check_weights_file)."""
    for arch in RESNETS:
        ours = imagenet_network(arch).state_dict()
        theirs = torchvision.models.get_model(arch, weights=None).state_dict()
        assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]


def test_the_other_archs_still_come_from_torchvision():
    others = [arch for arch in ARCHS if arch not in RESNETS]
    assert others, "every arch is a ResNet: drop this test or the torchvision path"
    for arch in others:
        torch.manual_seed(0)
        ours = build_model(arch, 2)
        torch.manual_seed(0)
        theirs = torchvision_model(arch, 2)
        assert type(ours) is type(theirs) and type(ours).__module__.startswith("torchvision.")
        assert all(
            torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values())
        )


def test_torchvision_stays_a_declared_dependency():
    """The other archs and the tests need it; only the ResNet path does without."""
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.strip().startswith("torchvision") for line in requirements)


# One process per module, so a failure names it; cnnlens.predict's also builds each ResNet and finds its
# ImageNet weights, stages.export's also exports a ResNet.
IMPORTS = """
import json, pathlib, sys, tempfile
import {module}
if {build}:
    from cnnlens.model import build_model
    from cnnlens.weights import imagenet_weights
    for arch in ("resnet18", "resnet34", "resnet50"):
        build_model(arch, 2)
        imagenet_weights(arch)
if {export}:
    from cnnlens.model import build_model
    from cnnlens.onnx_export import export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model("resnet18", 2).eval()
        writer = export_onnx(model, pathlib.Path(tmp) / "m.onnx", 32, loss="cross_entropy", metadata={{}})
        assert writer == "cnnlens.onnx_resnet", writer
print(json.dumps(sorted(sys.modules)))
"""
STAGES = ("download", "prepare", "finetune", "evaluate", "saliency", "activations", "export")
RESNET_USERS = ("download", "finetune", "evaluate", "saliency", "activations", "export", "cnnlens.predict")


@pytest.mark.parametrize("module", [*(f"stages.{s}" for s in STAGES), "cnnlens.predict"])
def test_the_stages_import_no_pandas_and_the_resnet_ones_neither_torchvision_nor_dynamo(module):
    """pandas costs a process 0.15-0.2 s: only cnnlens/compare.py (make compare) and the tests use it.
    import torchvision costs over a second (its ops import torch._dynamo); the stages that use a ResNet,
    cnnlens.predict, building a ResNet, finding its ImageNet weights and exporting it to ONNX (torch.onnx.export
    imports torch._dynamo) must not pay it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    build = module == "cnnlens.predict"
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS.format(module=module, build=build, export=module == "stages.export")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modules = json.loads(out.splitlines()[-1])
    assert module in modules and ("cnnlens.resnet" in modules or not build)
    unwanted = [m for m in modules if m.split(".")[0] == "pandas"]
    if module.removeprefix("stages.") in RESNET_USERS:
        unwanted += [m for m in modules if m.split(".")[0] == "torchvision" or m.startswith("torch._dynamo")]
    assert not unwanted, unwanted
