"""``gem_hpp``: GeM pooling over horizontal strips, fused with the temporal max (fused_ops.md §3).

Implementations: ``"reference"`` (the spec, ``fastgait.ops.reference.gem_hpp_reference``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_tensor
from ._dispatch import resolve_impl
from .reference import gem_hpp_reference

OP = "gem_hpp"


def gem_hpp(
    x: torch.Tensor, p: torch.Tensor, bins: Sequence[int] = (64,), eps: float = 1e-6, impl: str = "auto"
) -> torch.Tensor:
    """GeM over horizontal strips: ``[n, c, h, w]`` or ``[n, c, t, h, w]`` -> ``[n, c, sum(bins)]``.

    A 5-D input is max-pooled over frames first (the gradient goes to the first maximal frame).
    ``p`` is a one-element tensor (learnable); strip i of ``b`` covers rows ``[i*h//b, (i+1)*h//b)``.
    """
    bins = _check_inputs(x, p, bins, eps)
    resolve_impl(impl, x.device, op=OP, has_torch=False, has_triton=False)
    return gem_hpp_reference(x, p, bins, eps)


def _check_inputs(x, p, bins, eps) -> tuple[int, ...]:
    check_tensor(x, "x", op=OP, ndim=(4, 5))
    check_tensor(p, "p", op=OP, device=x.device)
    if p.numel() != 1:
        raise ValueError(f"{OP}: p must hold one value (a learnable exponent), got shape {tuple(p.shape)}")
    bins = tuple(int(b) for b in bins)
    height = x.shape[-2]
    if not bins or any(not 1 <= b <= height for b in bins):
        raise ValueError(f"{OP}: every bin count must lie in [1, h={height}], got bins={bins}")
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0 (it keeps clamp(x, eps)^p differentiable), got {eps}")
    return bins
