"""ReverseMask (blocks.md §3): the reversed-mask pair, RMFE, Plain RMB and Inception RMB.

The blocks run ``fastgait.ops.rmb_conv3d`` (``impl``), which never builds ``Xa``/``Xb``: one
convolution of X with the stacked weights, plus ``A = W*(X*Mm)`` where the mask can change
anything (fused_ops.md §2). The draws (mask, ``alpha``/``beta``, the ``reg_prob`` decision)
come from torch's generator in a fixed order, so every ``impl`` sees the same ones for a seed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..ops._dispatch import check_impl
from ..ops.reverse_mask import REGIONS, MaskDraw, draw_mask, rmb_conv3d
from .conv import NEGATIVE_SLOPE, Conv3d

VARIANTS = ("dropping", "scaling")


class ReverseMask(nn.Module):
    """Samples ``Mm[h, w]`` and its reverse ``Mr = 1 - Mm`` and returns the pair

    ``Xa = a*X*Mm + b*X*Mr`` and ``Xb = (1-a)*X*Mm + (1-b)*X*Mr``

    with ``(a, b) = (1, 0)`` for the dropping variant (``Xa = X*Mm``, ``Xb = X*Mr``) and
    ``a, b ~ U(0, 1)`` for the scaling variant. The mask is shared across the batch, channels and
    frames ("identical regions for sequences in a batch"); ``a`` and ``b`` are drawn once per forward.

    Regions (one interface): ``"unit"`` Bernoulli(``ratio``) per (h, w), drawn as Philox bits of a
    seed (``fastgait.ops.masks.unit_mask``); ``"band"`` a horizontal band of ``floor(ratio*H)``
    rows (as GaitMask's, §2.1); ``"block"`` a rectangle of ``floor(ratio*H) x floor(ratio*W)``.
    ``reg_prob`` is the probability that a forward perturbs at all.

    :meth:`draw` is what the blocks use: the mask and the scales, with "no perturbation" expressed
    as scales ``(1, 1)`` (the pair is then ``(X, 0)``: no host-side branch). ``forward`` returns
    the materialised pair (None in evaluation or with ``reg_prob=0``) for inspection.
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

    def draw(self, x: torch.Tensor, variants: Optional[Sequence[str]] = None,
             generator: Optional[torch.Generator] = None) -> tuple[Optional[MaskDraw], Optional[torch.Tensor]]:
        """``(mask draw, scales [len(variants), 2])`` for ``x``, or ``(None, None)`` when the layer
        never perturbs (evaluation, ``reg_prob=0``). Draw order: the ``reg_prob`` decision (only
        when ``0 < reg_prob < 1``), the mask, then ``alpha, beta`` per scaling variant."""
        if not self.training or self.reg_prob == 0.0:
            return None, None
        device = x.device
        perturb = None
        if self.reg_prob < 1.0:
            perturb = torch.rand((), device=device, generator=generator) < self.reg_prob
        mask = draw_mask(self.region, self.ratio, x.shape[-2], x.shape[-1], device, generator)
        rows = []
        for variant in variants or (self.variant,):
            if variant == "dropping":
                rows.append(torch.tensor([1.0, 0.0], device=device))
            else:
                rows.append(torch.rand(2, device=device, generator=generator))
        scales = torch.stack(rows)
        if perturb is not None:
            scales = torch.where(perturb, scales, torch.ones_like(scales))
        return mask, scales

    def sample_mask(self, height: int, width: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """``Mm`` as ``[height, width]`` (a fresh draw)."""
        return draw_mask(self.region, self.ratio, height, width, device).keep(device, dtype)

    def forward(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        mask, scales = self.draw(x)
        if mask is None:
            return None
        keep = mask.keep(x.device, x.dtype)  # Mm, [h, w]
        alpha, beta = scales[0].to(x.dtype)
        scale_a = alpha * keep + beta * (1 - keep)
        scale_b = (1 - alpha) * keep + (1 - beta) * (1 - keep)
        return x * scale_a, x * scale_b

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, region={self.region!r}, ratio={self.ratio}, reg_prob={self.reg_prob}"


class RMFE(nn.Module):
    """Reverse-mask feature extractor: ``F = c3(Xa) + c3(Xb)`` with one shared weight; ``c3(X)``
    when the mask layer does not perturb (evaluation, or with probability ``1 - reg_prob``)."""

    def __init__(self, in_channels: int, out_channels: int, variant: str = "dropping", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE,
                 impl: str = "auto"):
        super().__init__()
        check_impl(impl)
        self.mask = ReverseMask(variant, region, ratio, reg_prob)
        self.conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.negative_slope = negative_slope
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draw, scales = self.mask.draw(x)
        if scales is None:
            scales = torch.ones(1, 2, device=x.device)
        return rmb_conv3d(x, None, [self.conv.weight], scales, draw, "add", self.negative_slope, impl=self.impl)


class PlainRMB(RMFE):
    """Plain reverse-mask block: a ReverseMask layer then an RMFE (dropping or scaling variant)."""

    def out_rows(self, rows: int) -> int:
        return rows


class InceptionRMB(nn.Module):
    """Three parallel branches on one input, each with its own weight: global ``c3_g(X)``,
    dropping RMFE and scaling RMFE. ``fuse="add"`` sums them (every stage but the last);
    ``fuse="concat"`` stacks them along H (3H rows, the last stage).

    **Decision** (fused_ops.md §2: "conv X·Mm with [W_d; W_s]"): the dropping and scaling
    branches share one mask draw (and one ``reg_prob`` decision); the scaling branch draws its
    own ``alpha, beta``. So the block is one convolution of X with ``[W_g; W_d; W_s]`` plus one
    of ``X*Mm`` with ``[W_d; W_s]``.
    """

    def __init__(self, in_channels: int, out_channels: int, fuse: str = "add", region: str = "unit",
                 ratio: float = 0.5, reg_prob: float = 1.0, negative_slope: float = NEGATIVE_SLOPE,
                 impl: str = "auto"):
        super().__init__()
        if fuse not in ("add", "concat"):
            raise ValueError(f"fuse must be 'add' or 'concat', got {fuse!r}")
        check_impl(impl)
        self.fuse = fuse
        self.impl = impl
        self.global_conv = Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.dropping = RMFE(in_channels, out_channels, "dropping", region, ratio, reg_prob, negative_slope, impl)
        self.scaling = RMFE(in_channels, out_channels, "scaling", region, ratio, reg_prob, negative_slope, impl)
        self.negative_slope = negative_slope

    def out_rows(self, rows: int) -> int:
        return 3 * rows if self.fuse == "concat" else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draw, scales = self.scaling.mask.draw(x, ("dropping", "scaling"))
        if scales is None:
            scales = torch.ones(2, 2, device=x.device)
        weights = [self.dropping.conv.weight, self.scaling.conv.weight]
        return rmb_conv3d(x, self.global_conv.weight, weights, scales, draw, self.fuse, self.negative_slope,
                          impl=self.impl)
