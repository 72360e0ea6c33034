"""Temporal max and GeM over horizontal strips (blocks.md §5)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import gem_hpp
from ..ops._dispatch import check_impl
from ..ops.reference import temporal_max


class TemporalMax(nn.Module):
    """Max over frames: ``[n, c, t, h, w] -> [n, c, h, w]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return temporal_max(x)


class GeMHPP(nn.Module):
    """GeM horizontal pyramid pooling with a learnable exponent ``p``.

    Drop-in for OpenGait's ``GeMHPP(bin_num=[64], p=6.5, eps=1e-6)``: ``[n, c, h, w] -> [n, c, sum(bins)]``.
    Also takes ``[n, c, t, h, w]``, doing the temporal max in the same fused pass.
    """

    def __init__(self, bin_num: Sequence[int] = (64,), p: float = 6.5, eps: float = 1.0e-6, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
        self.bin_num = list(bin_num)
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem_hpp(x, self.p, self.bin_num, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"bin_num={self.bin_num}, eps={self.eps}, impl={self.impl!r}"


class HorizontalPoolingPyramid(nn.Module):
    """OpenGait's HPP (GaitSet, GaitBase): for each bin count ``b``, split the rows into ``b``
    equal strips and take ``mean + max`` over each strip's rows and columns.
    ``[n, c, h, w] -> [n, c, sum(bins)]``; ``h`` must be divisible by every bin count."""

    def __init__(self, bin_num: Sequence[int] = (16, 8, 4, 2, 1)):
        super().__init__()
        self.bin_num = list(bin_num)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, _ = x.shape
        features = []
        for b in self.bin_num:
            if h % b:
                raise ValueError(f"HorizontalPoolingPyramid: {h} rows do not split into {b} equal strips")
            z = x.reshape(n, c, b, -1)
            features.append(z.mean(-1) + z.amax(-1))
        return torch.cat(features, -1)

    def extra_repr(self) -> str:
        return f"bin_num={self.bin_num}"
