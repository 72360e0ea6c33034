"""Complementary band masks (blocks.md §2.1): the draw of band starts.

The fused paths never materialise a mask: they take the per-sample band starts and route
rows by comparing the row index with ``[band_start, band_start + band_height)``.
``fastgait.ops.reference.band_masks`` builds the explicit ``M0`` for the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import band_height, band_masks

__all__ = ["band_height", "band_masks", "draw_band_starts"]


def draw_band_starts(
    batch: int,
    height: int,
    band_rows: int,
    *,
    per_sample: bool = True,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Band starts drawn uniformly from ``{0, ..., height - band_rows}`` as an int64 tensor ``[batch]``.

    ``per_sample=True`` (default) draws one start per sequence; ``False`` draws one for the whole
    batch. Draws come from torch's generator (``generator`` or the device's default), so
    ``torch.manual_seed`` makes a run repeatable.
    """
    if not 0 <= band_rows <= height:
        raise ValueError(f"band of {band_rows} rows does not fit a map of {height} rows")
    draws = batch if per_sample else 1
    starts = torch.randint(0, height - band_rows + 1, (draws,), device=device, generator=generator)
    return starts.expand(batch).contiguous() if not per_sample else starts
