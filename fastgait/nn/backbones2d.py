"""2-D per-frame building blocks of set models (GaitSet, GaitBase), with OpenGait's parameter names.

``SetBlock`` runs a 2-D module on every frame of ``[n, c, s, h, w]``; ``ResNet9`` is OpenGait's
ResNet-9-like GaitBase backbone (torchvision's ``BasicBlock`` layout and key names: ``conv1``,
``bn1``, ``layer1..4``, each block ``conv1/bn1/conv2/bn2/downsample``), written here so
torchvision is not needed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


class BasicConv2d(nn.Module):
    """A bias-free 2-D convolution kept under ``.conv`` (OpenGait's naming)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SetBlock(nn.Module):
    """Apply ``forward_block`` (a 2-D module) to each frame: ``[n, c, s, h, w] -> [n, c', s, h', w']``."""

    def __init__(self, forward_block: nn.Module):
        super().__init__()
        self.forward_block = forward_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, s, h, w = x.shape
        y = self.forward_block(x.transpose(1, 2).reshape(n * s, c, h, w))
        return y.reshape(n, s, *y.shape[1:]).transpose(1, 2).contiguous()


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv2`` may be replaced by another module mapping ``planes -> planes`` channels at the same
    size (an Inception RMB for the ReverseMask plug-in)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, conv2: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv2 if conv2 is not None else nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet9(nn.Module):
    """OpenGait's GaitBase backbone: ``conv1 3x3 (in -> c0) -> bn1 -> relu (-> maxpool)`` then four
    layers of ``layers[i]`` basic blocks with ``channels[i]`` planes, the first block of a layer
    with ``strides[i]`` (a layer of 0 blocks is skipped).

    ``conv2_factory(layer_index, planes)``, when given, builds the second conv of every block of a
    layer (None keeps the plain 3x3 conv): the hook the RMB plug-in uses.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512), layers: Sequence[int] = (1, 1, 1, 1),
                 strides: Sequence[int] = (1, 2, 2, 1), in_channel: int = 1, maxpool: bool = False,
                 conv2_factory=None):
        super().__init__()
        if not len(channels) == len(layers) == len(strides) == 4:
            raise ValueError(f"ResNet9 needs 4 channels, layers and strides, got {channels}, {layers}, {strides}")
        self.maxpool_flag = maxpool
        self.conv1 = BasicConv2d(in_channel, channels[0], 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = channels[0]
        for i, (planes, blocks, stride) in enumerate(zip(channels, layers, strides)):
            modules = []
            for b in range(blocks):
                conv2 = conv2_factory(i, planes) if conv2_factory else None
                modules.append(BasicBlock(inplanes, planes, stride if b == 0 else 1, conv2))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*modules) if modules else nn.Identity())
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool_flag:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
