"""ReverseMask (blocks.md §3): the reversed-mask pair, RMFE, Plain RMB and Inception RMB."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.masks import band_height, band_masks, draw_band_starts
from .conv import NEGATIVE_SLOPE, Conv3d

VARIANTS = ("dropping", "scaling")
REGIONS = ("unit", "band", "block")


class ReverseMask(nn.Module):
    """Samples ``Mm[h, w]`` and its reverse ``Mr = 1 - Mm`` and returns the pair

    ``Xa = a*X*Mm + b*X*Mr`` and ``Xb = (1-a)*X*Mm + (1-b)*X*Mr``

    with ``(a, b) = (1, 0)`` for the dropping variant (``Xa = X*Mm``, ``Xb = X*Mr``) and
    ``a, b ~ U(0, 1)`` for the scaling variant. The mask is shared across the batch, channels and
    frames ("identical regions for sequences in a batch"); ``a`` and ``b`` are drawn once per forward.

    Regions (one interface): ``"unit"`` Bernoulli(``ratio``) per (h, w); ``"band"`` a horizontal band
    of ``floor(ratio*H)`` rows (as GaitMask's, §2.1); ``"block"`` a rectangle of
    ``floor(ratio*H) x floor(ratio*W)``. ``reg_prob`` is the probability that a forward perturbs at
    all: ``forward`` returns None when it does not (and always in evaluation), meaning "use X".
    """

    def __init__(self, variant: str = "dropping", region: str = "unit", ratio: float = 0.5, reg_prob: float = 1.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        if not 0.0 <= ratio <= 1.0 or not 0.0 <= reg_prob <= 1.0:
            raise ValueError(f"ratio and reg_prob must lie in [0, 1], got ratio={ratio}, reg_prob={reg_prob}")
        self.variant, self.region, self.ratio, self.reg_prob = variant, region, ratio, reg_prob

    def sample_mask(self, height: int, width: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """``Mm`` as ``[height, width]``."""
        if self.region == "unit":
            return torch.bernoulli(torch.full((height, width), self.ratio, device=device)).to(dtype)
        rows = band_height(height, self.ratio)
        row_start = draw_band_starts(1, height, rows, device=device)
        row_mask = band_masks(row_start, rows, height, dtype).view(height, 1)
        if self.region == "band":
            return row_mask.expand(height, width).contiguous()
        cols = band_height(width, self.ratio)
        col_start = draw_band_starts(1, width, cols, device=device)
        col_mask = band_masks(col_start, cols, width, dtype).view(1, width)
        return row_mask * col_mask

    def sample_scales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.variant == "dropping":
            one = torch.ones((), device=device)
            return one, torch.zeros((), device=device)
        alpha, beta = torch.rand(2, device=device).unbind()
        return alpha, beta

    def forward(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.training or self.reg_prob == 0.0:
            return None
        if self.reg_prob < 1.0 and float(torch.rand(())) >= self.reg_prob:
            return None
        keep = self.sample_mask(x.shape[-2], x.shape[-1], x.device, x.dtype)  # Mm, [h, w]
        alpha, beta = self.sample_scales(x.device)
        scale_a = alpha * keep + beta * (1 - keep)  # [h, w]
        scale_b = (1 - alpha) * keep + (1 - beta) * (1 - keep)
        return x * scale_a, x * scale_b

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, region={self.region!r}, ratio={self.ratio}, reg_prob={self.reg_prob}"


class RMFE(nn.Module):
    """Reverse-mask feature extractor: ``F = c3(Xa) + c3(Xb)`` with one shared weight; ``c3(X)``
    when the mask layer does not perturb (evaluation, or with probability ``1 - reg_prob``)."""

    def __init__(self, in_channels: int, out_channels: int, variant: str = "dropping", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE):
        super().__init__()
        self.mask = ReverseMask(variant, region, ratio, reg_prob)
        self.conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = self.mask(x)
        if pair is None:
            return F.leaky_relu(self.conv(x), self.negative_slope)
        x_a, x_b = pair
        return F.leaky_relu(self.conv(x_a), self.negative_slope) + F.leaky_relu(self.conv(x_b), self.negative_slope)


class PlainRMB(RMFE):
    """Plain reverse-mask block: a ReverseMask layer then an RMFE (dropping or scaling variant)."""

    def out_rows(self, rows: int) -> int:
        return rows


class InceptionRMB(nn.Module):
    """Three parallel branches on one input, each with its own weight: global ``c3_g(X)``,
    dropping RMFE and scaling RMFE. ``fuse="add"`` sums them (every stage but the last);
    ``fuse="concat"`` stacks them along H (3H rows, the last stage)."""

    def __init__(self, in_channels: int, out_channels: int, fuse: str = "add", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE):
        super().__init__()
        if fuse not in ("add", "concat"):
            raise ValueError(f"fuse must be 'add' or 'concat', got {fuse!r}")
        self.fuse = fuse
        self.global_conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.dropping = RMFE(in_channels, out_channels, "dropping", region, ratio, reg_prob, negative_slope)
        self.scaling = RMFE(in_channels, out_channels, "scaling", region, ratio, reg_prob, negative_slope)
        self.negative_slope = negative_slope

    def out_rows(self, rows: int) -> int:
        return 3 * rows if self.fuse == "concat" else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [F.leaky_relu(self.global_conv(x), self.negative_slope), self.dropping(x), self.scaling(x)]
        if self.fuse == "add":
            return branches[0] + branches[1] + branches[2]
        return torch.cat(branches, dim=3)

