"""The MLA block of GaitMask (blocks.md §2.2): a global branch and a complementary band-masked pair."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import mla_conv3d
from ..ops._dispatch import check_impl
from .conv import NEGATIVE_SLOPE, Conv3d
from .masks import ComplementaryBandMasks

BRANCHES = ("both", "global", "local")


class MLA(nn.Module):
    """Mask-based Local Augmentation block.

    - global branch ``Yg = c3_g(X)``;
    - local branch in training ``Ym = c3_l(X*M0) + c3_l(X*M1)`` (one weight for both masked inputs,
      a fresh band per sample each forward); in evaluation ``Ym = c3_l(X)``;
    - ``fuse="add"`` (MLA-A): ``Yg + Ym``; ``fuse="concat"`` (MLA-B): ``concat_H(Yg, Ym)`` (2H rows).

    ``branches="global"`` / ``"local"`` keep one branch (the GFR-only / LFR-only ablations of
    GaitMask's Table 5); then the output has H rows whatever ``fuse`` says.
    ``impl`` selects the op implementation (``fastgait.ops.mla_conv3d``).
    """

    def __init__(self, in_channels: int, out_channels: int, fuse: str = "add", drop_ratio: float = 0.4,
                 per_sample: bool = True, branches: str = "both", negative_slope: float = NEGATIVE_SLOPE,
                 impl: str = "auto"):
        super().__init__()
        if fuse not in ("add", "concat"):
            raise ValueError(f"fuse must be 'add' (MLA-A) or 'concat' (MLA-B), got {fuse!r}")
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
        check_impl(impl)
        self.fuse, self.branches, self.negative_slope, self.impl = fuse, branches, negative_slope, impl
        self.global_conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False) if branches != "local" else None
        self.local_conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False) if branches != "global" else None
        self.band = ComplementaryBandMasks(drop_ratio, per_sample)

    def out_rows(self, rows: int) -> int:
        return 2 * rows if self.fuse == "concat" and self.branches == "both" else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_conv is None:
            return F.leaky_relu(self.global_conv(x), self.negative_slope)
        band_start, band_rows = self.band.sample(x) if self.training else (None, 0)
        weight_global = None if self.global_conv is None else self.global_conv.weight
        return mla_conv3d(x, weight_global, self.local_conv.weight, band_start, band_rows,
                          self.fuse, self.negative_slope, impl=self.impl)

    def extra_repr(self) -> str:
        return f"fuse={self.fuse!r}, branches={self.branches!r}, impl={self.impl!r}"
