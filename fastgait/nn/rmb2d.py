"""ReverseMask blocks on per-frame maps (2-D): ``RMFE2d`` and ``InceptionRMB2d``.

The same maths as the 3-D blocks (blocks.md §3.2) with 3x3 convolutions on ``[n, c, h, w]``
frames, so they plug into 2-D set models (GaitSet, GaitBase; ReverseMask paper Table 4):

- RMFE: ``F = act(conv(Xa)) + act(conv(Xb))`` (one shared weight), ``Xa = X*Sa``, ``Xb = X*Sb``
  with the scale maps ``Sa = a*Mm + b*(1-Mm)``, ``Sb = (1-a)*Mm + (1-b)*(1-Mm)`` (``[h, w]``,
  shared by the batch, channels and frames); dropping: ``a=1, b=0``; scaling: ``a, b ~ U(0, 1)``.
- Inception RMB: ``act(conv_g(X)) + F_dropping + F_scaling`` (``fuse="add"``) or the three
  stacked along H (``fuse="concat"``).
- Evaluation (or a forward that does not perturb, probability ``1 - reg_prob``): ``act(conv(X))``.

Implementations (``impl``): ``"reference"`` builds each masked copy and runs one convolution per
branch input (5 for the Inception block); ``"torch"`` (also what ``"auto"`` and ``"triton"`` run:
there is no fused 2-D kernel yet) stacks the two masked inputs of a shared weight along the batch,
one convolution per weight (3 for the Inception block). A fused path would be the 3-D ReverseMask
op with a 1-frame kernel: an implicit-GEMM convolution that multiplies each loaded input tile by
``Sa`` and ``Sb`` (two scaled copies of one tile against one weight tile, one dot over the
concatenated rows), applies the activation to each product and sums them in the epilogue; its
backward needs ``dX = Sa*convT(g*act'(Ya)) + Sb*convT(g*act'(Yb))`` and ``dW`` accumulated over
both copies, i.e. the pre-activations' signs saved (or recomputed) per branch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._dispatch import check_impl
from .conv import NEGATIVE_SLOPE
from .reverse_mask import ReverseMask

Scales = Optional[tuple[torch.Tensor, torch.Tensor]]  # (Sa, Sb), each [h, w]; None: no perturbation


def _act(y: torch.Tensor, negative_slope: float) -> torch.Tensor:
    return F.leaky_relu(y, negative_slope) if negative_slope else F.relu(y)


def rmfe2d_reference(x: torch.Tensor, weight: torch.Tensor, scales: Scales, negative_slope: float = NEGATIVE_SLOPE):
    """``act(conv(X*Sa)) + act(conv(X*Sb))`` with two convolutions; ``act(conv(X))`` when ``scales`` is None."""
    pad = weight.shape[-1] // 2
    if scales is None:
        return _act(F.conv2d(x, weight, padding=pad), negative_slope)
    scale_a, scale_b = scales
    return (_act(F.conv2d(x * scale_a, weight, padding=pad), negative_slope)
            + _act(F.conv2d(x * scale_b, weight, padding=pad), negative_slope))


def rmfe2d_torch(x: torch.Tensor, weight: torch.Tensor, scales: Scales, negative_slope: float = NEGATIVE_SLOPE):
    """Same value as ``rmfe2d_reference``: the masked pair stacked along the batch, one convolution."""
    pad = weight.shape[-1] // 2
    if scales is None:
        return _act(F.conv2d(x, weight, padding=pad), negative_slope)
    scale_a, scale_b = scales
    pair = torch.cat([x * scale_a, x * scale_b])  # [2n, c, h, w]
    y = _act(F.conv2d(pair, weight, padding=pad), negative_slope)
    n = x.shape[0]
    return y[:n] + y[n:]


def inception_rmb2d_reference(x, weight_global, weight_dropping, weight_scaling, scales_dropping: Scales,
                              scales_scaling: Scales, fuse: str = "add", negative_slope: float = NEGATIVE_SLOPE):
    """The Inception RMB from its definition: five convolutions on materialised inputs."""
    pad = weight_global.shape[-1] // 2
    branches = [_act(F.conv2d(x, weight_global, padding=pad), negative_slope),
                rmfe2d_reference(x, weight_dropping, scales_dropping, negative_slope),
                rmfe2d_reference(x, weight_scaling, scales_scaling, negative_slope)]
    return branches[0] + branches[1] + branches[2] if fuse == "add" else torch.cat(branches, dim=2)


def inception_rmb2d_torch(x, weight_global, weight_dropping, weight_scaling, scales_dropping: Scales,
                          scales_scaling: Scales, fuse: str = "add", negative_slope: float = NEGATIVE_SLOPE):
    pad = weight_global.shape[-1] // 2
    branches = [_act(F.conv2d(x, weight_global, padding=pad), negative_slope),
                rmfe2d_torch(x, weight_dropping, scales_dropping, negative_slope),
                rmfe2d_torch(x, weight_scaling, scales_scaling, negative_slope)]
    return branches[0] + branches[1] + branches[2] if fuse == "add" else torch.cat(branches, dim=2)


def _use_reference(impl: str) -> bool:
    return impl == "reference"


class RMFE2d(nn.Module):
    """Reverse-mask feature extractor on frames ``[n, c, h, w]`` (a 3x3 convolution, bias-free).

    ``variant``/``region``/``ratio``/``reg_prob`` as ``fastgait.nn.ReverseMask`` (its draws are used,
    so a seed gives the 3-D layer's masks). ``negative_slope=0`` makes the activation a ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, variant: str = "dropping", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE,
                 kernel_size: int = 3, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
        self.mask = ReverseMask(variant, region, ratio, reg_prob)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.negative_slope, self.impl = negative_slope, impl

    def draw_scales(self, x: torch.Tensor) -> Scales:
        """``(Sa, Sb)`` for this forward, or None (evaluation, or ``reg_prob=0``); the same random
        draws, in the same order, as the 3-D layer's ``ReverseMask.draw`` (a forward that does not
        perturb gets scales ``(1, 1)``: ``Sa = 1``, ``Sb = 0``)."""
        mask, scales = self.mask.draw(x)
        if mask is None:
            return None
        keep = mask.keep(x.device, x.dtype)  # Mm, [h, w]
        alpha, beta = scales[0].to(x.dtype)
        return alpha * keep + beta * (1 - keep), (1 - alpha) * keep + (1 - beta) * (1 - keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = rmfe2d_reference if _use_reference(self.impl) else rmfe2d_torch
        return fn(x, self.conv.weight, self.draw_scales(x), self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, impl={self.impl!r}"


class InceptionRMB2d(nn.Module):
    """Inception RMB on frames: global conv, dropping RMFE and scaling RMFE, each its own 3x3 weight.
    ``fuse="add"`` sums them; ``fuse="concat"`` stacks them along H (3H rows)."""

    def __init__(self, in_channels: int, out_channels: int, fuse: str = "add", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE,
                 impl: str = "auto"):
        super().__init__()
        if fuse not in ("add", "concat"):
            raise ValueError(f"fuse must be 'add' or 'concat', got {fuse!r}")
        check_impl(impl)
        self.fuse, self.negative_slope, self.impl = fuse, negative_slope, impl
        self.global_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.dropping = RMFE2d(in_channels, out_channels, "dropping", region, ratio, reg_prob, negative_slope, impl=impl)
        self.scaling = RMFE2d(in_channels, out_channels, "scaling", region, ratio, reg_prob, negative_slope, impl=impl)

    def out_rows(self, rows: int) -> int:
        return 3 * rows if self.fuse == "concat" else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = inception_rmb2d_reference if _use_reference(self.impl) else inception_rmb2d_torch
        return fn(x, self.global_conv.weight, self.dropping.conv.weight, self.scaling.conv.weight,
                  self.dropping.draw_scales(x), self.scaling.draw_scales(x), self.fuse, self.negative_slope)

    def extra_repr(self) -> str:
        return f"fuse={self.fuse!r}, negative_slope={self.negative_slope}, impl={self.impl!r}"
