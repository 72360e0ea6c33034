"""The regularisation baselines the ReverseMask paper compares against (blocks.md §3.3).

All are identities in evaluation. Feature maps are ``[n, c, t, h, w]`` (or ``[n, c, h, w]``);
the dropped regions are shared over frames, as ReverseMask's masks are.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.masks import draw_per_sample


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018): zero ``block_size x block_size`` squares of each channel map
    so that about ``drop_prob`` of the units are dropped, and rescale the rest by kept/total."""

    def __init__(self, drop_prob: float = 0.1, block_size: int = 5):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0 or block_size < 1:
            raise ValueError(f"need 0 <= drop_prob < 1 and block_size >= 1, got {drop_prob}, {block_size}")
        self.drop_prob, self.block_size = drop_prob, block_size

    def block_mask(self, x: torch.Tensor) -> torch.Tensor:
        """1 where kept, 0 in the dropped blocks: ``[n, c, 1, h, w]`` (5-D input) or ``[n, c, h, w]``."""
        h, w = x.shape[-2:]
        size = min(self.block_size, h, w)
        valid = (h - size + 1) * (w - size + 1)
        gamma = self.drop_prob / (size * size) * (h * w) / valid
        shape = (*x.shape[:2], 1, h, w) if x.dim() == 5 else (*x.shape[:2], h, w)
        seeds = torch.bernoulli(torch.full(shape, gamma, device=x.device, dtype=torch.float32))
        seeds = seeds.flatten(0, -3)  # [n*c, h, w]: one map per channel
        # Only seeds whose whole block fits the map count (the paper's valid region).
        seeds[:, h - size + 1 :, :] = 0
        seeds[:, :, w - size + 1 :] = 0
        # Each seed covers the block below and to its right.
        dropped = F.max_pool2d(F.pad(seeds.unsqueeze(1), (size - 1, 0, size - 1, 0)), size, stride=1)
        return (1.0 - dropped).view(shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = self.block_mask(x)
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


class ScalingDropBlock(DropBlock):
    """DropBlock's blocks scaled by ``a ~ U(0, 1)`` (drawn once per forward) instead of zeroed, with
    no rescaling: the DropBlock counterpart of ReverseMask's scaling variant.

    **Decision**: the ReverseMask paper names this baseline without defining it; this is the
    reading that mirrors its own dropping/scaling pair.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = self.block_mask(x)
        scale = torch.rand((), device=x.device, dtype=x.dtype)
        return x * (keep + (1.0 - keep) * scale)


class RandomErasing(nn.Module):
    """Input-level random erasing (Zhong et al., 2020) for silhouette sequences ``[n, t, h, w]`` (or
    ``[n, 1, t, h, w]``): with probability ``p`` per sequence, one rectangle of area fraction in
    ``area`` and aspect ratio in ``ratio`` is set to ``value`` in every frame."""

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.02, 0.2),
                 ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0):
        super().__init__()
        self.p, self.area, self.ratio, self.value = p, area, ratio, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n, (h, w) = x.shape[0], x.shape[-2:]
        gen = draw_per_sample(lambda count: torch.rand(count, 5), n)  # one row of choices per sequence
        area = h * w * (self.area[0] + gen[:, 0] * (self.area[1] - self.area[0]))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + gen[:, 1] * (log_hi - log_lo))
        eh = (area * aspect).sqrt().round().clamp(1, h).long()
        ew = (area / aspect).sqrt().round().clamp(1, w).long()
        top = (gen[:, 2] * (h - eh + 1).float()).long()
        left = (gen[:, 3] * (w - ew + 1).float()).long()
        apply = gen[:, 4] < self.p
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & apply.view(-1, 1, 1))
        inside = inside.to(x.device).view(n, *([1] * (x.dim() - 3)), h, w)
        return torch.where(inside, torch.full_like(x, self.value), x)
