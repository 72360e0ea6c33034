"""Complementary band masks (blocks.md §2.1): the draw of band starts.

The fused paths never materialise a mask: they take the per-sample band starts and route
rows by comparing the row index with ``[band_start, band_start + band_height)``.
``fastgait.ops.reference.band_masks`` builds the explicit ``M0`` for the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import band_height, band_masks

__all__ = [
    "band_height", "band_masks", "draw_band_starts", "set_batch_shard", "draw_per_sample",
    "philox_randint", "philox_rand", "unit_mask", "draw_seed",
]

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


# ----------------------------------------------------------------------------------------
# Philox4x32-10, bit for bit as Triton's tl.randint / tl.rand (triton/language/random.py)
# ----------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit words


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    """High 32 bits of ``a * b`` for a uint32 constant ``a`` and uint32 values ``b`` (held in int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    return (a_hi * b + ((a_lo * b) >> 16)) >> 16


def philox_randint(seed, offset: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """``tl.randint(seed, offset)`` in PyTorch: the first word of Philox4x32-``n_rounds`` of the
    counter ``(offset lo, offset hi, 0, 0)`` with key ``(seed lo, seed hi)``, as int32.

    seed: a Python int or an integer tensor (one element, any device); offset: an integer tensor
    (values below 2**32). Everything is computed in int64 holding uint32 values.
    """
    seed = torch.as_tensor(seed, device=offset.device).to(torch.int64).reshape(())
    c0 = offset.to(torch.int64) & _MASK32
    c1 = (offset.to(torch.int64) >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = (_PHILOX_ROUND_B * prev_c2) & _MASK32
        c3 = (_PHILOX_ROUND_A * prev_c0) & _MASK32
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return torch.where(c0 >= 2**31, c0 - 2**32, c0).to(torch.int32)


def philox_rand(seed, offset: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """``tl.rand(seed, offset)`` in PyTorch: uniform fp32 in [0, 1) from ``philox_randint``."""
    x = philox_randint(seed, offset, n_rounds)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def unit_threshold(keep_prob: float) -> int:
    """The uint32 threshold of a unit mask: an element is kept when its Philox word is below it."""
    return int(round(float(keep_prob) * 2**32))


def unit_mask(seed, height: int, width: int, keep_prob: float, device=None) -> torch.Tensor:
    """The unit mask ``Mm [height, width]`` (bool) of ``seed``: ``philox_randint(seed, h*W + w) < p * 2**32``
    (read as uint32), the same bits as the Triton kernels' ``unit_keep``."""
    device = device if device is not None else (seed.device if isinstance(seed, torch.Tensor) else None)
    offsets = torch.arange(height * width, device=device)
    bits = philox_randint(seed, offsets).to(torch.int64) & _MASK32
    return (bits < unit_threshold(keep_prob)).view(height, width)


def draw_seed(device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Philox seed drawn from torch's generator (so ``torch.manual_seed`` repeats it), int64 ``[]``."""
    return torch.randint(0, 2**31 - 1, (), device=device, generator=generator)
