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

Implementations: ``"reference"`` (materialised ``Xa``, ``Xb``: the spec); ``"torch"`` (the
stacked ``[W_g; W_d; W_s]`` convolution of X, plus ``A`` from ``X*Mm`` on the rows it touches;
the masked input is recomputed in the backward, not saved); ``"triton"`` (``fastgait::rmb_conv3d``,
``kernels/reverse_mask.py``): the vendor convolution of X with the stacked weights, then Triton
kernels for ``A`` on the window of rows with the mask evaluated in-kernel (Philox for unit
masks), the epilogue (one byte of gates per pre-activation), and in the backward the gated
gradient, vendor dgrad/wgrad of it, and Triton kernels for the masked terms. Saved for the
backward: X, the gates, the scales and the draw's three integers.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import functools

from .._nvtx import nvtx_range
from . import _alloc
from ._checks import check_same_dtype, check_tensor
from ._dispatch import gpu_choices, resolve_impl, sm_count
from .conv import conv3d
from .conv_engine import (
    TRITON_DTYPES, _block, _cdiv, _check_sample_extent, _dgrad_pack, _empty_activation, _forward_pack, _in_format_of,
    compute_dtype, k_tiling,
)
from .masks import unit_threshold
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
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=True)
    if path == "triton" and impl == "auto" and compute_dtype(x) not in TRITON_DTYPES:
        path = "torch"
    if path == "triton":
        return _rmb_conv3d_triton(x, weight_global, list(weights), scales, draw, fuse, negative_slope)
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


# ----------------------------------------------------------------------------------------
# "triton": launchers, the torch.library ops and their autograd
# ----------------------------------------------------------------------------------------

_REGION_IDS = {"unit": 0, "band": 1, "block": 2, "none": 0}


@functools.lru_cache(maxsize=None)
def _kernels():
    """``fastgait.kernels.reverse_mask``, imported on first use (Triton reads TRITON_INTERPRET at import)."""
    from fastgait.kernels import reverse_mask

    return reverse_mask


def _rmb_conv3d_triton(x, weight_global, weights, scales, draw, fuse, negative_slope):
    dtype = compute_dtype(x)
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"{OP}: impl='triton' computes in float32, float16 or bfloat16, got {dtype}; use impl='torch'")
    x = x.to(dtype)
    weight_rm = torch.cat(weights, dim=0).to(dtype)  # [K*c_out, ...]: autograd splits the gradient
    weight_global = None if weight_global is None else weight_global.to(dtype)
    if draw is None:
        region, rows, cols, keep_prob = "none", 0, 0, 0.0
        params = torch.zeros(3, dtype=torch.int64, device=x.device)
    else:
        region, rows, cols, keep_prob = draw.region, draw.rows, draw.cols, draw.keep_prob
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        parts = [draw.seed, draw.row_start, draw.col_start]
        params = torch.stack([zero if p is None else p.to(device=x.device, dtype=torch.int64).reshape(()) for p in parts])
    y, _ = torch.ops.fastgait.rmb_conv3d(
        x, weight_global, weight_rm, scales.to(device=x.device, dtype=torch.float32).contiguous(), params, region,
        int(rows), int(cols), float(keep_prob), len(weights), fuse, float(negative_slope),
    )  # fmt: skip
    return y


def _window(region: str, height: int, rows: int) -> int:
    """Rows of the window where ``A`` can be non-zero: all for a unit mask, the band's and one either side."""
    return height if region == "unit" else rows + 2


def _rm_configs(device, c_in, c_all, c_pre, channels_last):
    gpu = gpu_choices(device)

    def block(size, gpu_cap, interpreter_cap):
        return _block(size, 16, gpu_cap if gpu else interpreter_cap)

    return {
        "masked": dict(BLOCK_M=128, BLOCK_N=block(c_all, 64, 16), **k_tiling(c_in, 64 if channels_last else 32, gpu),
                       num_warps=8),
        "dgrad": dict(BLOCK_M=128, BLOCK_N=block(c_in, 64, 16), **k_tiling(c_all, 64 if channels_last else 32, gpu),
                      num_warps=8),
        "elementwise": dict(BLOCK_M=64 if gpu else 128, BLOCK_N=block(c_pre, 32, 16), num_warps=4 if gpu else 8),
        "wgrad": dict(BLOCK_M=64 if gpu else 256, BLOCK_O=_block(c_all, 16, 128),
                      **k_tiling(c_in, 64, gpu, taps=27, interpreter_cap=128), num_warps=8),
    }


def _window_buffer(x, c, window, dtype=torch.float32):
    """``[n, c, t, window, w]`` with channels innermost (fp32: ``F - A`` loses nothing)."""
    n, _, t, _, w = x.shape
    return _alloc.empty(n, t, window, w, c, dtype=dtype, device=x.device).permute(0, 4, 1, 2, 3)


def _rm_forward(x, weight_global, weight_rm, scales, params, region, rows, cols, keep_prob, branches, fuse, slope):
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_all = weight_rm.shape[0]
    c_out = c_all // branches
    has_global = weight_global is not None
    has_mask = region != "none"
    weight = weight_rm if weight_global is None else torch.cat([weight_global, weight_rm], dim=0)
    c_pre = weight.shape[0]
    configs = _rm_configs(x.device, c_in, c_all, c_out, x.stride(1) == 1)
    y, gates = _rm_outputs(x, c_out, c_pre, branches + has_global if fuse == "concat" else 1)
    pre = F.conv3d(x, weight, padding=1)  # [G; F_1..F_K] by the vendor, a temporary
    _check_sample_extent(x=x, y=y, pre=pre)
    window = _window(region, h, rows) if has_mask else 1
    part = _window_buffer(x, c_all, window) if has_mask else gates
    mask_args = (rows, cols, unit_threshold(keep_prob))
    if has_mask:
        config = configs["masked"]
        grid = (_cdiv(t * window * w, config["BLOCK_M"]), _cdiv(c_all, config["BLOCK_N"]), n)
        kernels.rm_masked_conv_kernel[grid](
            x, _forward_pack(weight_rm), params, part, t, h, w, window, c_in, c_all, *x.stride(), *part.stride(),
            *mask_args, REGION=_REGION_IDS[region], **config,
        )  # fmt: skip
    config = configs["elementwise"]
    kernels.rm_epilogue_kernel[(_cdiv(t * h * w, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), n)](
        pre, part, params, scales, y, gates, t, h, w, window, c_out,
        *pre.stride(), *part.stride(), *y.stride(), *gates.stride(), slope,
        REGION=_REGION_IDS[region], K=branches, HAS_GLOBAL=int(has_global), HAS_MASK=has_mask,
        FUSE_CONCAT=fuse == "concat", **config,
    )  # fmt: skip
    return y, gates


def _rm_outputs(x, c_out, c_pre, row_blocks):
    n, _, t, h, w = x.shape
    y = _empty_activation(n, c_out, t, row_blocks * h, w, like=x)
    return y, _empty_activation(n, c_pre, t, h, w, like=x, dtype=torch.uint8)


def _rm_backward(grad_y, x, weight_global, weight_rm, scales, params, gates, region, rows, cols, keep_prob, branches,
                 fuse, slope):
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_all = weight_rm.shape[0]
    c_out = c_all // branches
    has_global = weight_global is not None
    has_mask = region != "none"
    weight = weight_rm if weight_global is None else torch.cat([weight_global, weight_rm], dim=0)
    c_pre = weight.shape[0]
    configs = _rm_configs(x.device, c_in, c_all, c_out, x.stride(1) == 1)
    _check_sample_extent(grad_y=grad_y)
    window = _window(region, h, rows) if has_mask else 1
    gpre = _empty_activation(n, c_pre, t, h, w, like=x)
    grad_part = _window_buffer(x, c_all, window, x.dtype) if has_mask else gates  # gA, an MMA operand
    mask_args = (rows, cols, unit_threshold(keep_prob))
    config = configs["elementwise"]
    kernels.rm_gated_grad_kernel[(_cdiv(t * h * w, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), n)](
        grad_y, gates, params, scales, gpre, grad_part, t, h, w, window, c_out,
        *grad_y.stride(), *gates.stride(), *gpre.stride(), *grad_part.stride(), slope,
        REGION=_REGION_IDS[region], K=branches, HAS_GLOBAL=int(has_global), HAS_MASK=has_mask,
        FUSE_CONCAT=fuse == "concat", **config,
    )  # fmt: skip
    dx, dweight, _ = torch.ops.aten.convolution_backward(
        gpre, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False]
    )
    dx = _in_format_of(dx, like=x)
    dweight = dweight.float()
    if has_mask:  # Mm * (W^T conv gA) into dx, (X*Mm) conv gA into the RMFE weights' gradient
        config = configs["dgrad"]
        grid = (_cdiv(t * window * w, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]), n)
        kernels.rm_masked_dgrad_kernel[grid](
            grad_part, _dgrad_pack(weight_rm), params, dx, t, h, w, window, c_all, c_in,
            *grad_part.stride(), *dx.stride(), *mask_args, REGION=_REGION_IDS[region], **config,
        )  # fmt: skip
        config = configs["wgrad"]
        tiles = _cdiv(c_all, config["BLOCK_O"]) * _cdiv(27 * c_in, config["BLOCK_K"])
        reductions = n * window * _cdiv(t * w, config["BLOCK_M"])
        wanted = _cdiv(4 * sm_count(x.device), tiles) if gpu_choices(x.device) else 2
        per_split = _cdiv(reductions, max(1, min(reductions, wanted, 64)))
        splits = _cdiv(reductions, per_split)
        partial = _alloc.empty(splits, c_all, 27 * c_in, dtype=torch.float32, device=x.device)
        kernels.rm_masked_wgrad_kernel[(tiles, splits)](
            x, grad_part, params, partial, reductions, per_split, t, h, w, window, c_in, c_all,
            *x.stride(), *grad_part.stride(), *mask_args, REGION=_REGION_IDS[region], **config,
        )  # fmt: skip
        dweight[c_pre - c_all :] += partial.sum(0).view(c_all, 3, 3, 3, c_in).permute(0, 4, 1, 2, 3)
    return dx, dweight.to(weight.dtype).contiguous()


_RM_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight_global, Tensor weight_rm, Tensor scales, Tensor params, str region, int rows, int cols, "
    "float keep_prob, int branches, str fuse, float negative_slope) -> (Tensor, Tensor)"
)
_RM_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? weight_global, Tensor weight_rm, Tensor scales, Tensor params, Tensor gates, "
    "str region, int rows, int cols, float keep_prob, int branches, str fuse, float negative_slope) -> (Tensor, Tensor)"
)


@torch.library.custom_op("fastgait::rmb_conv3d", mutates_args=(), schema=_RM_FORWARD_SCHEMA)
def _rmb_op(x, weight_global, weight_rm, scales, params, region, rows, cols, keep_prob, branches, fuse, slope):
    """The fused forward: ``(y, gates)``."""
    with nvtx_range("rmb_conv3d.forward"):
        return _rm_forward(x, weight_global, weight_rm, scales, params, region, rows, cols, keep_prob, branches,
                           fuse, slope)


@_rmb_op.register_fake
def _(x, weight_global, weight_rm, scales, params, region, rows, cols, keep_prob, branches, fuse, slope):
    c_out = weight_rm.shape[0] // branches
    c_pre = weight_rm.shape[0] + (0 if weight_global is None else c_out)
    return _rm_outputs(x, c_out, c_pre, branches + (weight_global is not None) if fuse == "concat" else 1)


@torch.library.custom_op("fastgait::rmb_conv3d_backward", mutates_args=(), schema=_RM_BACKWARD_SCHEMA)
def _rmb_backward_op(grad_y, x, weight_global, weight_rm, scales, params, gates, region, rows, cols, keep_prob,
                     branches, fuse, slope):
    """The fused backward: ``(dx, d[W_g; W_1..W_K])``."""
    with nvtx_range("rmb_conv3d.backward"):
        return _rm_backward(grad_y, x, weight_global, weight_rm, scales, params, gates, region, rows, cols, keep_prob,
                            branches, fuse, slope)


@_rmb_backward_op.register_fake
def _(grad_y, x, weight_global, weight_rm, scales, params, gates, region, rows, cols, keep_prob, branches, fuse, slope):
    n, c_in, t, h, w = x.shape
    return _empty_activation(n, c_in, t, h, w, like=x), weight_rm.new_empty(gates.shape[1], c_in, 3, 3, 3)


def _rm_setup_context(ctx, inputs, output):
    x, weight_global, weight_rm, scales, params, *config = inputs
    ctx.save_for_backward(x, weight_global, weight_rm, scales, params, output[1])
    ctx.config = tuple(config)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient for the gates


def _rm_autograd_backward(ctx, grad_y, _grad_gates):
    if grad_y is None:
        return (None,) * 12
    x, weight_global, weight_rm, scales, params, gates = ctx.saved_tensors
    dx, dweight = torch.ops.fastgait.rmb_conv3d_backward(
        grad_y, x, weight_global, weight_rm, scales, params, gates, *ctx.config
    )
    c_all = weight_rm.shape[0]
    dweight_global = None if weight_global is None else dweight[: dweight.shape[0] - c_all]
    return (dx, dweight_global, dweight[-c_all:]) + (None,) * 9


_rmb_op.register_autograd(_rm_autograd_backward, setup_context=_rm_setup_context)
