"""Complementary band masks (blocks.md §2.1): the draw of band starts.

The fused paths never materialise a mask: they take the per-sample band starts and route
rows by comparing the row index with ``[band_start, band_start + band_height)``.
``fastgait.ops.reference.band_masks`` builds the explicit ``M0`` for the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import band_height, band_masks

__all__ = ["band_height", "band_masks", "draw_band_starts", "set_batch_shard", "draw_per_sample"]

# (rank, world_size): this process holds the elements ``rank::world_size`` of a global batch
# ``world_size`` times larger (the sampler's split). Per-sample draws are made for the whole global
# batch (every rank seeds alike) and sliced, so a DDP run draws exactly what a single process with
# the global batch would.
_batch_shard = (0, 1)


def set_batch_shard(rank: int, world_size: int) -> None:
    """Declare this process's slice of the global batch (the trainer calls this under DDP)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    global _batch_shard
    _batch_shard = (rank, world_size)


def draw_per_sample(draw, batch: int):
    """Call ``draw(global_batch)`` and return this process's ``batch`` rows of the result."""
    rank, world = _batch_shard
    if world == 1:
        return draw(batch)
    return draw(batch * world)[rank::world]


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
    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, height - band_rows + 1, (count,), device=device, generator=generator)

    if per_sample:
        return draw_per_sample(draw, batch)
    return draw(1).expand(batch).contiguous()
