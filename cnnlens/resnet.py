"""ResNet-18, -34 and -50 as torchvision.models.resnet builds them, without importing torchvision.

`import torchvision` costs over a second: its ops import all of torch._dynamo. The stages need only
the network, so it is written here with torchvision's exact layout: the same module names and
classes (ResNet, BasicBlock, Bottleneck), so the same state_dict keys and shapes and the ImageNet
weight files load as they are; the same forward arithmetic; and the same initialisation, with the
modules created in the same order, so that a seeded random init draws the same numbers.
tests/test_resnet.py checks all of it against torchvision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and the shortcut (resnet18, resnet34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, downsample: nn.Module | None = None):
        super().__init__()
        # the attribute order is the state_dict's key order: as torchvision's
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (carrying the stride: torchvision's "ResNet V1.5"), 1x1 up, and the shortcut (resnet50)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def make_layer(
    block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, *, blocks: int, stride: int = 1
) -> nn.Sequential:
    """One stage (layer1..layer4): `blocks` blocks, the first one striding and, where the shape
    changes, with a 1x1 convolution on its shortcut (created before its block, as in torchvision)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
        )
    layers = [block(inplanes, planes, stride, downsample=downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """The stem (conv1, bn1, relu, maxpool), layer1..layer4, avgpool and the Linear head fc."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        e = block.expansion
        self.layer1 = make_layer(block, 64, 64, blocks=layers[0])
        self.layer2 = make_layer(block, 64 * e, 128, blocks=layers[1], stride=2)
        self.layer3 = make_layer(block, 128 * e, 256, blocks=layers[2], stride=2)
        self.layer4 = make_layer(block, 256 * e, 512, blocks=layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # after every module exists (their default inits drew from the RNG first), in module order
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# arch -> (block, blocks per stage), as torchvision.models.resnet18/34/50
RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def resnet(arch: str, num_classes: int = 1000) -> ResNet:
    """The randomly initialised network, as torchvision.models.get_model(arch, weights=None,
    num_classes=num_classes) builds it: the same tensors from the same RNG state."""
    block, layers = RESNETS[arch]
    return ResNet(block, layers, num_classes)
