"""What the network's layers compute: forward hooks, top-k feature maps, activation statistics.

Layer names are the ResNet stage names: `stem` (the output of conv1 -> bn1 -> relu -> maxpool)
and `layer1`..`layer4` (each ends in a ReLU, so exact zeros mean "this unit did not fire").
For MobileNet / EfficientNet the same names are mapped onto `features.N` blocks by output stride
(their blocks end in Hardswish / SiLU or no activation at all, so sparsity is not comparable).
Tensors in, tensors or dicts out; nothing here touches the disk (cnnlens.figures draws and writes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cnnlens.errors import StageError
from cnnlens.model import probabilities
from cnnlens.tensors import denormalize, eval_inputs, normalize_maps

# The layers one can hook, one registry (config validates activations.layers against it): stage name ->
# ResNet module.
RESNET_LAYERS = {
    "stem": "maxpool",
    "layer1": "layer1",
    "layer2": "layer2",
    "layer3": "layer3",
    "layer4": "layer4",
}


def available_layers(model: nn.Module, input_size: int = 224) -> dict[str, str]:
    """Stage name -> dotted module name, for the layers this model has.

    ResNet: stem = maxpool, layerK = layerK. A model with a `features` Sequential: stem =
    features.0, layerK = the last block whose output stride is 4 * 2**(K-1) (4, 8, 16, 32, the
    strides of a ResNet's layer1..layer4), found with one forward pass of a blank image.
    """
    children = dict(model.named_children())
    if all(name in children for name in ("conv1", "bn1", "relu", "maxpool")):
        return {k: v for k, v in RESNET_LAYERS.items() if v in children}
    features = children.get("features")
    if not isinstance(features, nn.Sequential) or len(features) == 0:
        raise StageError(
            f"{type(model).__name__}: cannot tell where its stem and layer1..layer4 are; "
            "the activations stage supports ResNets and models with a `features` Sequential "
            "(MobileNet, EfficientNet)"
        )
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, input_size, input_size, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()  # a probe in train mode would update the batch-norm running statistics
    found = {}
    try:
        with torch.no_grad():
            for i, block in enumerate(features):
                x = block(x)
                stride = round(input_size / x.shape[-1])
                if i == 0:
                    found["stem"] = "features.0"
                elif stride in (4, 8, 16, 32):
                    found[f"layer{stride.bit_length() - 2}"] = f"features.{i}"  # 4 -> layer1 ... 32 -> layer4
    finally:
        model.train(was_training)
    return {name: found[name] for name in RESNET_LAYERS if name in found}


def resolve_layers(model: nn.Module, names: list[str], input_size: int = 224) -> dict[str, nn.Module]:
    """The modules to hook, in the order asked for; an unknown name lists the available ones."""
    available = available_layers(model, input_size)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise StageError(
            f"layer(s) {', '.join(map(repr, unknown))} not available in {type(model).__name__}; "
            f"available: {', '.join(available)} (set activations.layers in params.yaml)"
        )
    if not names:
        raise StageError(f"activations.layers is empty; choose from: {', '.join(available)}")
    return {n: model.get_submodule(available[n]) for n in names}


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module], *, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Forward hooks that store each module's output under its name, for the forward passes run
    inside the `with` (a module called twice keeps its last output); the hooks are removed on exit,
    also after an error. detach=False keeps the outputs in the autograd graph, for gradients with
    respect to a layer (the CAM methods in cnnlens.attribution)."""
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_storing(store, name, detach)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _storing(store: dict[str, Tensor], name: str, detach: bool = True):
    """A forward hook (module, inputs, output) that keeps the output (detached or not) as store[name]."""
    return lambda _module, _inputs, out: store.__setitem__(name, out.detach() if detach else out)


def top_maps(act: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Channel indices of the k maps (C x H x W) with the highest mean activation, highest first
    (ties: lower channel first), and those means."""
    means = act.flatten(1).float().mean(1)
    order = torch.argsort(means, descending=True, stable=True)[: min(k, act.shape[0])]
    return order, means[order]


@dataclass
class TopMaps:
    """One image's strongest maps of one layer, highest mean activation first: maps K x h x w (each
    min-max scaled on its own to [0, 1]), their channels and mean activations; shape: the layer's C, H, W."""

    maps: np.ndarray
    channels: list[int]
    means: list[float]
    shape: tuple[int, int, int]


def strongest_maps(act: Tensor, k: int) -> TopMaps:
    """The k maps of one image's activation (C x H x W) with the highest mean (top_maps), scaled."""
    idx, means = top_maps(act, k)
    return TopMaps(normalize_maps(act[idx]).numpy(), [int(c) for c in idx], means.tolist(), tuple(act.shape))


def image_activations(
    model: nn.Module,
    modules: dict[str, nn.Module],
    images,
    *,
    input_size: int,
    loss: str,
    batch_size: int,
    k: int,
) -> Iterator[tuple[Tensor, Tensor, dict[str, TopMaps]]]:
    """Per image of `images` (uint8 N x 3 x H x W, on the CPU or memory-mapped), in order: its
    de-normalised centre crop (3 x h x w in [0, 1], CPU), the model's class probabilities (`loss`'s
    rule) and per hooked layer its k strongest maps. batch_size images a forward, every hook on."""
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = eval_inputs(images[start : start + batch_size].to(device), input_size)
        with capture(modules) as acts, torch.no_grad():
            proba = probabilities(model(x).float().cpu(), loss)
        shown = denormalize(x).cpu()
        for j in range(len(x)):
            yield shown[j], proba[j], {layer: strongest_maps(act[j].cpu(), k) for layer, act in acts.items()}


def split_statistics(
    model: nn.Module, modules: dict[str, nn.Module], images, *, input_size: int, batch_size: int
) -> dict[str, dict]:
    """layer_statistics over all of `images` (a split's, uint8), batch by batch: all activations would
    not fit."""
    device = next(model.parameters()).device
    starts = range(0, len(images), batch_size)
    batches = (
        eval_inputs(images[s : s + batch_size].to(device), input_size)
        for s in tqdm(starts, desc="activation statistics", unit="batch", leave=False, disable=None)
    )
    return layer_statistics(model, modules, batches)


def headline_statistics(stats: dict[str, dict]) -> dict:
    """The declared metrics of layer_statistics(): the mean sparsity over the layers and the dead
    channels of all layers together."""
    return {
        "mean_sparsity": sum(s["sparsity"] for s in stats.values()) / len(stats),
        "dead_channels": sum(s["dead_channels"] for s in stats.values()),
    }


class LayerStats:
    """Running statistics of one layer's activations over many batches (N x C x H x W).

    Sums are kept in float64 (float32 on MPS, which has no float64) so the whole val set adds up
    without drift; std is the population std of all activation values.
    """

    def __init__(self):
        self.count = self.zeros = 0
        self.total = self.total_sq = 0.0
        self.shape = None
        self.fired = None  # per channel: nonzero somewhere in the data seen

    def update(self, x: Tensor) -> None:
        x = x.detach()
        if self.shape is not None and tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"activation shape changed from {self.shape} to {tuple(x.shape[1:])}")
        self.shape = tuple(x.shape[1:])
        wide = x.to(torch.float32 if x.device.type == "mps" else torch.float64)
        self.count += x.numel()
        self.zeros += int((x == 0).sum())
        self.total += float(wide.sum())
        self.total_sq += float((wide * wide).sum())
        fired = (x != 0).transpose(0, 1).flatten(1).any(1).cpu()
        self.fired = fired if self.fired is None else self.fired | fired

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("no activations seen")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)  # rounding can make it a hair below 0
        channels, height, width = self.shape
        return {
            "sparsity": self.zeros / self.count,
            "mean": mean,
            "std": var**0.5,
            "channels": channels,
            "height": height,
            "width": width,
            "dead_channels": int((~self.fired).sum()),
        }


def layer_statistics(
    model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Tensor]
) -> dict[str, dict]:
    """Per layer: sparsity (fraction of exact zeros), mean, std, channels, height, width and
    dead_channels (channels that are zero for every image), over all model-ready `batches`."""
    stats = {name: LayerStats() for name in modules}
    with capture(modules) as acts, torch.no_grad():
        for x in batches:
            acts.clear()
            model(x)
            for name in modules:
                stats[name].update(acts[name])
    return {name: s.result() for name, s in stats.items()}
