"""``rmb_conv3d``: ReverseMask's RMFE, Plain RMB and Inception RMB convolutions (fused_ops.md §2).

One RMFE branch with weight ``W`` and scales ``(alpha, beta)`` computes
``lrelu(alpha*A + beta*B) + lrelu((1-alpha)*A + (1-beta)*B)`` with ``A = W*(X*Mm)`` and
``B = W*X - A`` (linearity: ``Xa`` and ``Xb`` are never built). Off the rows where ``A`` can be
non-zero, ``A = 0`` and, since lrelu is positively homogeneous and ``beta, 1-beta >= 0``, the
branch is ``lrelu(W*X)``. Scales ``(1, 1)`` give ``lrelu(W*X)`` everywhere: that is how "no
perturbation this pass" (``reg_prob``) is expressed, without a host-side branch.

Masks (shared by the batch, channels, frames and the branches of a block), from a
:class:`MaskDraw`:
- ``"unit"``: ``Mm[h, w] = philox(seed, h*W + w) < p * 2**32``, a pure function of the seed
  and the logical position (``fastgait.ops.masks.unit_mask``; the same bits as the Triton
  ``kernels/reverse_mask.py:unit_keep``); ``A`` is a full convolution of ``X*Mm``;
- ``"band"``: rows ``[row_start, row_start + rows)``; ``"block"``: that band times columns
  ``[col_start, col_start + cols)``. ``A`` is non-zero only on the ``rows + 2`` output rows
  around the band: the torch path convolves just that window.

Draws come from torch's generator (``torch.manual_seed`` repeats a run; every DDP rank draws
the same batch-shared values), and every implementation consumes the same draws.

Implementations: ``"reference"`` (materialised ``Xa``, ``Xb``: the spec) and ``"torch"`` (the
stacked ``[W_g; W_d; W_s]`` convolution of X, plus ``A`` from ``X*Mm`` on the rows it touches;
the masked input is recomputed in the backward, not saved). There is no Triton implementation
yet: ``impl="auto"`` takes ``"torch"`` on every device.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._nvtx import nvtx_range
from ._checks import check_same_dtype, check_tensor
from ._dispatch import resolve_impl
from .conv import conv3d
from .masks import band_height, draw_seed, unit_mask
from .reference import rmb_conv3d_reference

OP = "rmb_conv3d"
REGIONS = ("unit", "band", "block")
FUSES = ("add", "concat")


@dataclass(frozen=True)
class MaskDraw:
    """One ReverseMask draw for a map of ``height x width``: ``region``, the unit mask's keep
    probability ``keep_prob`` and ``seed`` (int64 tensor), or the band/block's ``row_start``/
    ``col_start`` (int64 tensors) and sizes ``rows``/``cols``."""

    region: str
    height: int
    width: int
    keep_prob: float = 0.5
    seed: Optional[torch.Tensor] = None
    row_start: Optional[torch.Tensor] = None
    rows: int = 0
    col_start: Optional[torch.Tensor] = None
    cols: int = 0

    def keep(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``Mm [height, width]`` materialised (the reference's, and the test's, view of the draw)."""
        if self.region == "unit":
            return unit_mask(self.seed, self.height, self.width, self.keep_prob, device=device).to(dtype)
        rows = torch.arange(self.height, device=device)
        row_ok = (rows >= self.row_start) & (rows < self.row_start + self.rows)
        cols = torch.arange(self.width, device=device)
        col_ok = torch.ones_like(cols, dtype=torch.bool)
        if self.region == "block":
            col_ok = (cols >= self.col_start) & (cols < self.col_start + self.cols)
        return (row_ok.view(-1, 1) & col_ok.view(1, -1)).to(dtype)


def draw_mask(region: str, ratio: float, height: int, width: int, device=None,
              generator: Optional[torch.Generator] = None) -> MaskDraw:
    """Draw a ReverseMask mask from torch's generator.

    ``"unit"``: a Philox seed (one ``torch.randint``); keep probability ``ratio``.
    ``"band"``: ``floor(ratio*height)`` rows from a uniform start; ``"block"``: also
    ``floor(ratio*width)`` columns from a uniform start (two ``torch.randint``).
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if region == "unit":
        return MaskDraw("unit", height, width, keep_prob=ratio, seed=draw_seed(device, generator))
    rows = band_height(height, ratio)
    row_start = torch.randint(0, height - rows + 1, (), device=device, generator=generator)
    if region == "band":
        return MaskDraw("band", height, width, row_start=row_start, rows=rows)
    cols = band_height(width, ratio)
    col_start = torch.randint(0, width - cols + 1, (), device=device, generator=generator)
    return MaskDraw("block", height, width, row_start=row_start, rows=rows, col_start=col_start, cols=cols)


def rmb_conv3d(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    scales: torch.Tensor,
    draw: Optional[MaskDraw],
    fuse: str = "add",
    negative_slope: float = 0.01,
    impl: str = "auto",
) -> torch.Tensor:
    """ReverseMask block convolutions: an optional global branch ``lrelu(W_g*X)`` and one RMFE
    branch per weight in ``weights`` (Plain RMB: one; Inception RMB: dropping and scaling),
    fused by sum (``"add"``) or along H (``"concat"``, global first).

    Args:
        x: ``[n, c_in, t, h, w]``; weights ``[c_out, c_in, 3, 3, 3]``.
        scales: ``[len(weights), 2]`` float: each branch's ``(alpha, beta)`` (dropping ``(1, 0)``;
            ``(1, 1)`` means no perturbation).
        draw: the mask (:func:`draw_mask`), or None in evaluation (every RMFE is ``c3(X)``).
    """
    _check_inputs(x, weight_global, weights, scales, draw, fuse)
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=False)
    with nullcontext() if torch.compiler.is_compiling() else nvtx_range(OP):
        if path == "reference":
            keep = None if draw is None else draw.keep(x.device, x.dtype)
            return rmb_conv3d_reference(x, weight_global, list(weights), scales.to(x.dtype), keep, fuse,
                                        negative_slope)
        return _rmb_conv3d_torch(x, weight_global, list(weights), scales, draw, fuse, negative_slope)


def _check_inputs(x, weight_global, weights, scales, draw, fuse) -> None:
    check_tensor(x, "x", op=OP, ndim=(5,))
    if len(weights) < 1:
        raise ValueError(f"{OP}: needs at least one RMFE weight")
    c_in = x.shape[1]
    named = [("weight_global", weight_global)] if weight_global is not None else []
    named += [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    for name, weight in named:
        check_tensor(weight, name, op=OP, ndim=(5,), device=x.device)
        if tuple(weight.shape) != (weights[0].shape[0], c_in, 3, 3, 3):
            raise ValueError(f"{OP}: {name} must be [c_out, c_in={c_in}, 3, 3, 3] like weights[0], got "
                             f"{tuple(weight.shape)}")
    if not torch.is_autocast_enabled(x.device.type):
        check_same_dtype(OP, x=x, **dict(named))
    check_tensor(scales, "scales", op=OP, ndim=(2,), device=x.device)
    if tuple(scales.shape) != (len(weights), 2):
        raise ValueError(f"{OP}: scales must be [{len(weights)}, 2] (alpha, beta per branch), got {tuple(scales.shape)}")
    if fuse not in FUSES:
        raise ValueError(f"{OP}: fuse must be one of {FUSES}, got {fuse!r}")
    if draw is not None and (draw.height, draw.width) != tuple(x.shape[3:]):
        raise ValueError(f"{OP}: the mask was drawn for {draw.height}x{draw.width} rows x columns, x has "
                         f"{x.shape[3]}x{x.shape[4]}; draw it for this map")


# ----------------------------------------------------------------------------------------
# "torch": one stacked convolution of X, A on the rows it touches
# ----------------------------------------------------------------------------------------


class _MaskedConv3d(torch.autograd.Function):
    """``conv3d(x * keep, weight, padding)`` that saves ``x`` and ``keep``, not the masked copy:
    the backward recomputes ``x * keep`` (one multiply) for the weight gradient. Under autocast
    it computes in the autocast dtype, like ``F.conv3d``."""

    @staticmethod
    def forward(ctx, x, keep, weight, padding):
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        ctx.dtypes = (x.dtype, weight.dtype)
        x_c, keep_c, weight_c = x.to(dtype), keep.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, keep_c, weight_c)
        ctx.padding = padding
        with torch.autocast(x.device.type, enabled=False):
            return F.conv3d(x_c * keep_c, weight_c, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        x, keep, weight = ctx.saved_tensors
        masked = x * keep
        dx, dweight, _ = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), masked, weight, None, [1, 1, 1], list(ctx.padding), [1, 1, 1], False, [0, 0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2], False],
        )
        dx = None if dx is None else (dx * keep).to(ctx.dtypes[0])
        dweight = None if dweight is None else dweight.to(ctx.dtypes[1])
        return dx, None, dweight, None


def _pair_terms(full, part, alpha, beta, negative_slope):
    """``lrelu(alpha*A + beta*(F - A)) + lrelu((1-alpha)*A + (1-beta)*(F - A))`` (``A = part``)."""
    rest = full - part
    return (F.leaky_relu(alpha * part + beta * rest, negative_slope)
            + F.leaky_relu((1 - alpha) * part + (1 - beta) * rest, negative_slope))


def _rmb_conv3d_torch(x, weight_global, weights, scales, draw, fuse, negative_slope):
    n, c_in, t, height, width = x.shape
    c_out = weights[0].shape[0]
    stacked = torch.cat(([weight_global] if weight_global is not None else []) + weights, dim=0)
    pre = conv3d(x, stacked, padding=1)  # [G; F_1; ...; F_k] in one convolution
    glob = None if weight_global is None else F.leaky_relu(pre[:, :c_out], negative_slope)
    full = pre[:, -len(weights) * c_out :]
    local = F.leaky_relu(full, negative_slope)
    if draw is not None:
        local = _add_mask_terms(local, x, full, torch.cat(weights, dim=0), scales, draw, negative_slope)
    branches = ([glob] if glob is not None else []) + list(local.split(c_out, dim=1))
    if fuse == "add":
        return sum(branches[1:], branches[0])
    return torch.cat(branches, dim=3)


def _add_mask_terms(local, x, full, weight, scales, draw, negative_slope):
    """``local`` with each RMFE branch's pair terms where ``A`` can be non-zero."""
    k = scales.shape[0]
    c_all = weight.shape[0]
    scale_shape = (1, k, 1, 1, 1, 1)
    alpha = scales[:, 0].to(full.dtype).view(scale_shape)
    beta = scales[:, 1].to(full.dtype).view(scale_shape)

    def terms(f, a):  # [n, k*c, ...] -> per branch scales
        shape = (f.shape[0], k, c_all // k) + tuple(f.shape[2:])
        value = _pair_terms(f.view(shape), a.view(shape), alpha, beta, negative_slope)
        return (value - F.leaky_relu(f.view(shape), negative_slope)).view(f.shape)

    keep = draw.keep(x.device, x.dtype)  # [h, w]
    if draw.region == "unit":  # A everywhere: a second convolution, of X*Mm
        part = _MaskedConv3d.apply(x, keep, weight, (1, 1, 1))
        return local + terms(full, part)
    # Band or block: A lives on the rows+2 output rows around the band. Convolve the band's
    # input rows (padded by 2 rows) and put the correction back on those rows, clamped to the map.
    height = x.shape[3]
    band_rows = draw.row_start + torch.arange(draw.rows, device=x.device)  # [rows]
    if draw.rows == 0:
        return local
    window = x.index_select(3, band_rows)  # [n, c_in, t, rows, w]
    part = _MaskedConv3d.apply(window, keep.index_select(0, band_rows), weight, (1, 2, 1))  # rows+2 rows
    out_rows = draw.row_start - 1 + torch.arange(draw.rows + 2, device=x.device)
    on_map = ((out_rows >= 0) & (out_rows < height)).to(x.dtype).view(1, 1, 1, -1, 1)
    out_rows = out_rows.clamp(0, height - 1)
    correction = terms(full.index_select(3, out_rows), part) * on_map
    return local.index_add(3, out_rows, correction)
