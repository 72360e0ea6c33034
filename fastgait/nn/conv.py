"""Convolution building blocks: ``Conv3d`` (fast on CPU), ``BasicConv3d`` (OpenGait's naming) and
``C3`` (conv + LeakyReLU)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Triple = Union[int, Sequence[int]]

from ..ops.conv import conv3d

NEGATIVE_SLOPE = 0.01


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that runs ``fastgait.ops.conv.conv3d``: on a
    CPU with few input channels, a 2D convolution over stacked frames (its backward is faster
    there than oneDNN's 3D one); otherwise plain ``F.conv3d``."""

    def _conv_forward(self, input, weight, bias):
        plain = self.groups == 1 and self.padding_mode == "zeros" and self.dilation == (1, 1, 1) and bias is None
        if not plain or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, self.stride, self.padding)


class BasicConv3d(nn.Module):
    """A bias-free 3D convolution kept under ``.conv3d`` (OpenGait's parameter names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple = 3, stride: Triple = 1,
                 padding: Triple = 1, bias: bool = False, **kwargs):
        super().__init__()
        self.conv3d = Conv3d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(x)


class C3(nn.Module):
    """``c3(X) = lrelu(conv3d(X))``; bias-free, 'same' padding by default (blocks.md notation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple = 3, stride: Triple = 1,
                 padding: Triple | None = None, negative_slope: float = NEGATIVE_SLOPE):
        super().__init__()
        kernel = _triple(kernel_size)
        padding = tuple(k // 2 for k in kernel) if padding is None else padding
        self.conv = Conv3d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), self.negative_slope)


def _triple(value: Triple) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)
