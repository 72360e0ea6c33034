"""Complementary band masks (blocks.md §2.1) as a module."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.masks import band_height, band_masks, draw_band_starts


class ComplementaryBandMasks(nn.Module):
    """Draws a band of ``floor(drop_ratio * H)`` rows per sample (or per batch) and its complement.

    ``forward(x)`` returns the materialised pair ``(M0, M1)``, each ``[n, 1, 1, H, 1]`` (M0 keeps
    only the band, ``M1 = 1 - M0``), for the reference path; ``sample(x)`` returns just the band
    starts ``[n]`` and the band height, which is all the fused ops need.
    """

    def __init__(self, drop_ratio: float = 0.4, per_sample: bool = True):
        super().__init__()
        band_height(1, drop_ratio)  # validates the ratio
        self.drop_ratio = drop_ratio
        self.per_sample = per_sample

    def sample(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, int]:
        rows = band_height(x.shape[3], self.drop_ratio)
        starts = draw_band_starts(
            x.shape[0], x.shape[3], rows, per_sample=self.per_sample, device=x.device, generator=generator
        )
        return starts, rows

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts, rows = self.sample(x)
        keep_band = band_masks(starts, rows, x.shape[3], x.dtype)
        return keep_band, 1.0 - keep_band

    def extra_repr(self) -> str:
        return f"drop_ratio={self.drop_ratio}, per_sample={self.per_sample}"
