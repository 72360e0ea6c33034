"""Output allocation for fused-op launchers.

Launchers allocate every output through ``empty``/``empty_like`` here. Under
``fastgait.testing.poisoned_outputs()`` those fill the new tensor with NaN (floats) or the
most negative value (ints), so a test catches any element a kernel forgot to write.
"""
from __future__ import annotations

from typing import Sequence

import torch

_poison = False


def set_poison(enabled: bool) -> bool:
    """Turn poisoning on or off; returns the previous setting."""
    global _poison
    previous, _poison = _poison, bool(enabled)
    return previous


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
    return t


def empty(*shape, dtype=None, device=None) -> torch.Tensor:
    return _fill(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return _fill(torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format))


def stride_order(t: torch.Tensor) -> list[int]:
    """The dims of ``t`` from outermost to innermost in memory (its layout, as a permutation)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def empty_in_layout(shape: Sequence[int], order: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh tensor of ``shape`` laid out as ``order`` (see ``stride_order``), via ``_alloc``."""
    buffer = empty(*[shape[d] for d in order], dtype=dtype, device=device)
    return buffer.permute(*sorted(range(len(order)), key=lambda d: order[d]))
