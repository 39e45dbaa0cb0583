"""A ResNet of cnnlens/resnet.py for serving, written as ONNX nodes directly instead of traced.

torch.onnx.export traces the model (torch.export, importing torch._dynamo) and decomposes every operator:
about 4 s for ResNet-18 on a 2-core CPU, most of the export stage's time. A ResNet is a fixed chain of
modules, each one standard ONNX operator, so serving_graph writes them in well under a second, each node
named after its module (layer1.0.conv1). Every BatchNorm is folded into its convolution (float64, then
float32), as the exporter's optimiser does. serving_graph returns None for anything else (the torchvision
architectures, a loss whose probability rule has no nodes here): onnx_export.export_onnx then uses
torch.onnx.export. Either way the export stage checks the file against PyTorch on every val image.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cnnlens.losses import LOSSES, renormalised_sigmoid, softmax
from cnnlens.resnet import BasicBlock, Bottleneck, ResNet
from cnnlens.tensors import MEAN, STD

IR_VERSION = 8  # the oldest that holds opset 18 (ONNX 1.13): onnxruntime 1.14 and later read it


class Graph:
    """The nodes and initializers written so far; each method appends one node and returns its output's name."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def constant(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of `conv` followed by `bn` in eval mode, as one convolution, float32."""
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = bn.bias.detach().double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    weight = w * scale.view(-1, 1, 1, 1)
    return weight.float().contiguous().numpy(), bias.float().numpy()


def conv_bn(g: Graph, x: str, name: str, *, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> str:
    """Conv2d + BatchNorm2d (eval) as one Conv node named `name`."""
    weight, bias = folded(conv, bn)
    (ph, pw), (sh, sw) = conv.padding, conv.stride
    return g.node(
        "Conv",
        [x, g.constant(f"{name}.weight", weight), g.constant(f"{name}.bias", bias)],
        name,
        kernel_shape=list(conv.kernel_size),
        strides=[sh, sw],
        pads=[ph, pw, ph, pw],
        dilations=list(conv.dilation),
        group=conv.groups,
    )


def block(g: Graph, x: str, name: str, *, module: BasicBlock | Bottleneck) -> str:
    """One residual block: its convolutions (ReLU between them), the shortcut, the sum and the last ReLU."""
    pairs = [(module.conv1, module.bn1), (module.conv2, module.bn2)]
    if isinstance(module, Bottleneck):
        pairs.append((module.conv3, module.bn3))
    out = x
    for i, (conv, bn) in enumerate(pairs, start=1):
        out = conv_bn(g, out, f"{name}.conv{i}", conv=conv, bn=bn)
        if i < len(pairs):
            out = g.node("Relu", [out], f"{name}.relu{i}")
    identity = x
    if module.downsample is not None:
        conv, bn = module.downsample
        identity = conv_bn(g, x, f"{name}.downsample", conv=conv, bn=bn)
    return g.node("Relu", [g.node("Add", [out, identity], f"{name}.add")], f"{name}.relu")


def network(g: Graph, x: str, model: ResNet) -> str:
    """The ResNet's forward pass from normalised N x 3 x S x S to logits N x classes."""
    x = g.node("Relu", [conv_bn(g, x, "conv1", conv=model.conv1, bn=model.bn1)], "relu")
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, module in enumerate(getattr(model, layer)):
            x = block(g, x, f"{layer}.{i}", module=module)
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    weight = model.fc.weight.detach().float().numpy()
    bias = model.fc.bias.detach().float().numpy()
    return g.node(
        "Gemm", [x, g.constant("fc.weight", weight), g.constant("fc.bias", bias)], "logits", transB=1
    )


def normalized(g: Graph, image: str) -> str:
    """uint8 pixels -> float32 / 255, minus MEAN, over STD: tensors.normalize's operations in its order."""
    x = g.node("Cast", [image], "to_float", to=TensorProto.FLOAT)
    x = g.node("Div", [x, g.constant("255", np.float32(255.0))], "scaled")
    mean = np.array(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    x = g.node("Sub", [x, g.constant("mean", mean)], "centred")
    return g.node("Div", [x, g.constant("std", std)], "normalized")


def renormalised_sigmoid_nodes(g: Graph, logits: str) -> str:
    p = g.node("Sigmoid", [logits], "sigmoid")
    total = g.node(
        "ReduceSum", [p, g.constant("class_axis", np.array([1], dtype=np.int64))], "sigmoid_sum", keepdims=1
    )
    total = g.node("Max", [total, g.constant("tiny", np.float32(1e-12))], "sigmoid_sum_clamped")
    return g.node("Div", [p, total], "probabilities")


# a loss's probability rule (losses.LOSSES) -> its nodes; a rule not here is exported by torch.onnx
PROBABILITY_NODES = {
    softmax: lambda g, logits: g.node("Softmax", [logits], "probabilities", axis=1),
    renormalised_sigmoid: renormalised_sigmoid_nodes,
}


def plain(module: nn.Module) -> bool:
    """A module that serving_graph writes as it is: one of resnet.ResNet's, with the settings the nodes assume
    (zero padding given as numbers; BatchNorm with its scale, shift and running statistics; a Linear with
    its bias)."""
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.BatchNorm2d):
        return module.affine and module.running_var is not None
    if isinstance(module, nn.Linear):
        return module.bias is not None
    return type(module) in (
        BasicBlock,
        Bottleneck,
        nn.Sequential,
        nn.ReLU,
        nn.MaxPool2d,
        ResNet,
        nn.AdaptiveAvgPool2d,
    )


def writable(model: nn.Module, loss: str) -> bool:
    """Whether serving_graph can write `model` with `loss`'s rule: exactly resnet.ResNet's modules."""
    pool = getattr(model, "maxpool", None)
    return (
        type(model) is ResNet
        and type(model.fc) is nn.Linear
        and model.avgpool.output_size in ((1, 1), 1)
        and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        == (3, 2, 1, 1, False)
        and all(plain(m) for m in model.modules())
        and loss in LOSSES
        and LOSSES[loss].probabilities in PROBABILITY_NODES
    )


def serving_graph(model: nn.Module, crop: int, *, loss: str, opset: int) -> onnx.ModelProto | None:
    """onnx_export.Serving(model, loss) as an ONNX model: uint8 `image` batch x 3 x crop x crop in,
    `logits` and `probabilities` batch x classes out. None where `model` is not a resnet.ResNet
    or `loss`'s rule has no nodes here (writable)."""
    if not writable(model, loss):
        return None
    model = model.cpu().eval()
    g = Graph()
    with torch.no_grad():
        logits = network(g, normalized(g, "image"), model)
    PROBABILITY_NODES[LOSSES[loss].probabilities](g, logits)
    classes = model.fc.out_features
    graph = helper.make_graph(
        g.nodes,
        "serving",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, crop, crop])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes])
            for name in ("logits", "probabilities")
        ],
        initializer=g.initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION, producer_name="cnnlens"
    )
