"""``mla_conv3d``: the MLA block's convolutions with complementary band masks (fused_ops.md §1).

With a 3-row kernel, ``c3(X*M0) + c3(X*M1)`` equals ``lrelu(W*X)`` on every output row except
the <= 4 *boundary rows* per sample whose receptive rows straddle a band edge. So the pair
costs one convolution plus a correction on those rows, and the global branch rides in the
same convolution with stacked weights ``[W_g; W_l]``.

Implementations:
- ``"reference"``: three convolutions on materialised masked copies (the spec).
- ``"torch"``: the band-aware algorithm in plain PyTorch (the CPU path).
- ``"triton"``: the fused op (``fastgait.kernels.mla``), registered with ``torch.library`` as
  ``fastgait::mla_conv3d`` with its backward ``fastgait::mla_conv3d_backward``. Two designs,
  chosen with :func:`mla_conv3d_triton`'s ``design``; see ``docs/mla_notes.md``.
"""
from __future__ import annotations

import functools
import numbers
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from .._nvtx import nvtx_range
from . import _alloc
from ._checks import check_same_dtype, check_tensor
from ._dispatch import gpu_choices, resolve_impl
from .conv import conv3d
from .reference import mla_conv3d_reference

OP = "mla_conv3d"
FUSES = ("add", "concat")
DESIGNS = ("hybrid", "gemm")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The default design is "hybrid", chosen by reasoning because no GPU was available to time
# both: re-measure on an H100/H200 with `pytest bench --benchmark` and flip it if "gemm" wins.
# Why hybrid: at the GaitMask shapes the block is compute-bound (K = 27*C_in = 864..3456), and
# the vendor's convolutions (cuDNN forward, dgrad and wgrad) are tuned per architecture
# (wgmma, TMA, split-K wgrad) in a way this untuned Triton implicit GEMM is unlikely to match.
# Both designs save the same tensors (X and one byte of gates per pre-activation) and share the
# backward's gating and delta kernels; what "gemm" saves over "hybrid" is the round trip of the
# pre-activations [G; F] between the convolution and the epilogue: for MLA-A 32->64 at batch
# 128, ~1.8 GB of traffic (~0.4-0.6 ms) against ~1.3 ms of matrix work at 600 TFLOP/s. That
# is real, but an implicit GEMM with gathered (non-TMA) loads usually loses more than that.
DEFAULT_DESIGN = "hybrid"


def mla_conv3d(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weight_local: torch.Tensor,
    band_start: Optional[torch.Tensor],
    band_height: int,
    fuse: str = "add",
    negative_slope: float = 0.01,
    impl: str = "auto",
) -> torch.Tensor:
    """The MLA block: ``c3_g(X)`` fused with ``c3_l(X*M0) + c3_l(X*M1)``.

    Args:
        x: ``[n, c_in, t, h, w]`` float tensor (any memory format).
        weight_global: ``[c_out, c_in, 3, 3, 3]``, or None for the local branch alone.
        weight_local: ``[c_out, c_in, 3, 3, 3]``, shared by the two masked inputs.
        band_start: int tensor ``[n]`` with the first row of each sample's band, or None in
            evaluation (the local branch is then ``c3_l(X)``).
        band_height: rows in the band, ``0 <= band_height <= h``; ``band_start + band_height <= h``.
        fuse: ``"add"`` (MLA-A, ``[n, c_out, t, h, w]``) or ``"concat"`` (MLA-B: global rows
            then local rows, ``[n, c_out, t, 2h, w]``). Ignored without a global weight.
        negative_slope: of the LeakyReLU inside each branch.
        impl: ``"auto" | "reference" | "torch" | "triton"`` (see ``fastgait.ops``); ``"triton"``
            runs the default design (``DEFAULT_DESIGN``).

    Under autocast the op behaves like autocast's convolutions: ``x`` and the weights are cast
    to the autocast dtype and the output has that dtype.
    """
    _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse)
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=True)
    if path == "triton" and impl == "auto" and _compute_dtype(x) not in TRITON_DTYPES:
        path = "torch"  # float64 on CUDA: the kernels compute in fp32 at most
    if path == "triton":
        return _mla_conv3d_triton(
            x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, DEFAULT_DESIGN
        )
    with nullcontext() if torch.compiler.is_compiling() else nvtx_range(OP):
        if path == "reference":
            return mla_conv3d_reference(
                x, weight_global, weight_local, band_start, band_height, fuse, negative_slope
            )
        return _mla_conv3d_torch(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope)


def mla_conv3d_triton(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weight_local: torch.Tensor,
    band_start: Optional[torch.Tensor],
    band_height: int,
    fuse: str = "add",
    negative_slope: float = 0.01,
    design: str = DEFAULT_DESIGN,
) -> torch.Tensor:
    """:func:`mla_conv3d` with ``impl="triton"`` and a choice of design (for benchmarks and tests).

    Args are those of :func:`mla_conv3d`, plus ``design``:
    - ``"hybrid"``: the vendor convolution computes ``[G, F]`` with stacked weights; a Triton
      kernel computes ``P0`` on the boundary rows straight from X and applies the epilogue.
      Backward: vendor dgrad/wgrad on the gated gradient, Triton kernels for the delta terms.
    - ``"gemm"``: a Triton implicit-GEMM convolution reads each X tile once for ``G``, ``F``
      and ``P0`` and applies the epilogue; backward dgrad and wgrad are Triton kernels too.
    """
    _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse)
    resolve_impl("triton", x.device, op=OP, has_torch=True, has_triton=True)
    return _mla_conv3d_triton(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design)


def _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse) -> None:
    check_tensor(x, "x", op=OP, ndim=(5,))
    check_tensor(weight_local, "weight_local", op=OP, ndim=(5,), device=x.device)
    c_in = x.shape[1]
    expected = (weight_local.shape[0], c_in, 3, 3, 3)
    if tuple(weight_local.shape) != expected:
        raise ValueError(
            f"{OP}: weight_local must be [c_out, c_in={c_in}, 3, 3, 3] for x of shape {tuple(x.shape)}, "
            f"got {tuple(weight_local.shape)}"
        )
    if weight_global is not None:
        check_tensor(weight_global, "weight_global", op=OP, ndim=(5,), device=x.device)
        if weight_global.shape != weight_local.shape:
            raise ValueError(
                f"{OP}: weight_global {tuple(weight_global.shape)} and weight_local "
                f"{tuple(weight_local.shape)} must have the same shape"
            )
    if not torch.is_autocast_enabled(x.device.type):
        check_same_dtype(OP, x=x, weight_global=weight_global, weight_local=weight_local)
    if fuse not in FUSES:
        raise ValueError(f"{OP}: fuse must be one of {FUSES}, got {fuse!r}")
    height = x.shape[3]
    if isinstance(band_height, bool) or not isinstance(band_height, numbers.Integral):
        raise TypeError(
            f"{OP}: band_height must be an int (rows in the band), got {band_height!r} "
            f"({type(band_height).__name__}); use fastgait.ops.band_height(h, drop_ratio)"
        )
    if not 0 <= band_height <= height:
        raise ValueError(f"{OP}: band_height={band_height} must lie in [0, h={height}]")
    if band_start is None:
        return
    check_tensor(
        band_start, "band_start", op=OP, ndim=(1,), device=x.device, dtypes=(torch.int64, torch.int32)
    )
    if band_start.shape[0] != x.shape[0]:
        raise ValueError(f"{OP}: band_start has {band_start.shape[0]} entries for a batch of {x.shape[0]}")
    if torch.compiler.is_compiling():
        return
    inside = (band_start >= 0) & (band_start + band_height <= height)
    if band_start.device.type == "cpu":
        if not bool(inside.all()):
            raise ValueError(
                f"{OP}: every band must lie inside the map: need 0 <= band_start <= h - band_height = "
                f"{height - band_height}, got band_start={band_start.tolist()}"
            )
    else:  # no host sync on the GPU: the check fails asynchronously
        torch._assert_async(inside.all(), f"{OP}: band_start outside [0, h - band_height]")


# ----------------------------------------------------------------------------------------
# "torch": the band-aware algorithm in plain PyTorch (autograd derives the backward)
# ----------------------------------------------------------------------------------------


def boundary_rows(band_start: torch.Tensor, band_rows: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output rows whose 3-row receptive field straddles a band edge.

    Returns ``(rows [n, 4], live [n, 4])``: candidate rows ``start-1, start, end-1, end``
    (``end = start + band_rows``), clamped into the map, and which of them are real boundary
    rows (inside the map, reading both band and non-band rows, not a repeat of an earlier one).
    """
    start = band_start.long().view(-1, 1)
    offsets = torch.tensor([-1, 0, band_rows - 1, band_rows], device=band_start.device)
    candidates = start + offsets  # [n, 4]
    neighbours = candidates.unsqueeze(-1) + torch.tensor([-1, 0, 1], device=band_start.device)  # [n, 4, 3]
    on_map = (neighbours >= 0) & (neighbours < height)
    in_band = (neighbours >= start.unsqueeze(-1)) & (neighbours < start.unsqueeze(-1) + band_rows)
    reads_band = (on_map & in_band).any(-1)
    reads_rest = (on_map & ~in_band).any(-1)
    live = reads_band & reads_rest & (candidates >= 0) & (candidates < height)
    repeat = torch.zeros_like(live)
    for j in range(1, 4):
        repeat[:, j] = (candidates[:, :j] == candidates[:, j : j + 1]).any(-1)
    return candidates.clamp(0, height - 1), live & ~repeat


def _mla_conv3d_torch(x, weight_global, weight_local, band_start, band_rows, fuse, negative_slope):
    c_out = weight_local.shape[0]
    weight = weight_local if weight_global is None else torch.cat([weight_global, weight_local], dim=0)
    pre = conv3d(x, weight, padding=1)  # [n, (2)c_out, t, h, w]: [G, F] in one convolution
    pre_local = pre[:, -c_out:]
    local = F.leaky_relu(pre_local, negative_slope)
    if band_start is not None and band_rows > 0:
        local = _add_boundary_correction(local, x, weight_local, pre_local, band_start, band_rows, negative_slope)
    if weight_global is None:
        return local
    glob = F.leaky_relu(pre[:, :c_out], negative_slope)
    return glob + local if fuse == "add" else torch.cat([glob, local], dim=3)


def _add_boundary_correction(local, x, weight_local, pre_local, band_start, band_rows, negative_slope):
    """``local`` plus ``lrelu(P0) + lrelu(F - P0) - lrelu(F)`` on the boundary rows."""
    n, _, _, height, _ = x.shape
    rows, live = boundary_rows(band_start, band_rows, height)  # [n, 4]
    batch = torch.arange(n, device=x.device).view(n, 1)

    # P0 = W_l * (X*M0) on each boundary row, from its three input rows (masked to the band).
    taps = rows.unsqueeze(-1) + torch.tensor([-1, 0, 1], device=x.device)  # [n, 4, 3]
    start = band_start.long().view(n, 1, 1)
    tap_weight = ((taps >= start) & (taps < start + band_rows) & (taps >= 0) & (taps < height)).to(x.dtype)
    x_rows = x.permute(0, 3, 1, 2, 4)  # [n, h, c_in, t, w]
    gathered = x_rows[batch, taps.clamp(0, height - 1).view(n, 12)]  # [n, 12, c_in, t, w]
    gathered = gathered * tap_weight.view(n, 12, 1, 1, 1)
    gathered = gathered.view(n * 4, 3, *gathered.shape[2:]).permute(0, 2, 3, 1, 4)  # [4n, c_in, t, 3, w]
    band_part = conv3d(gathered, weight_local, padding=(1, 0, 1))  # [4n, c_out, t, 1, w]
    band_part = band_part.view(n, 4, *band_part.shape[1:3], band_part.shape[-1])  # [n, 4, c_out, t, w]

    full = pre_local.permute(0, 3, 1, 2, 4)[batch, rows]  # [n, 4, c_out, t, w]
    lrelu = lambda v: F.leaky_relu(v, negative_slope)  # noqa: E731
    correction = (lrelu(band_part) + lrelu(full - band_part) - lrelu(full)) * live.view(n, 4, 1, 1, 1)
    # Out of place, accumulating: repeated (dead) slots add zeros, and autograd stays exact.
    out = local.permute(0, 3, 1, 2, 4).index_put((batch.expand(n, 4), rows), correction, accumulate=True)
    return out.permute(0, 2, 3, 1, 4)  # [n, c_out, t, h, w]


# ----------------------------------------------------------------------------------------
# "triton": launchers, the torch.library ops and their autograd
# ----------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels see: autocast's when it is on (as for autocast convolutions)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _mla_conv3d_triton(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design):
    if design not in DESIGNS:
        raise ValueError(f"{OP}: design must be one of {DESIGNS}, got {design!r}")
    dtype = _compute_dtype(x)
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"{OP}: impl='triton' computes in float32, float16 or bfloat16, got {dtype}; use impl='torch'")
    # Custom ops are not auto-cast: cast here, like autocast does for F.conv3d.
    x, weight_local = x.to(dtype), weight_local.to(dtype)
    weight_global = None if weight_global is None else weight_global.to(dtype)
    y, _ = torch.ops.fastgait.mla_conv3d(
        x, weight_global, weight_local, band_start, int(band_height), fuse, float(negative_slope), design
    )
    return y


@functools.lru_cache(maxsize=None)
def _kernels():
    """``fastgait.kernels.mla``, imported on first use (Triton reads TRITON_INTERPRET at import)."""
    from fastgait.kernels import mla

    return mla


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(size: int, low: int, high: int) -> int:
    """A power-of-two block for a dimension of ``size``, in ``[low, high]`` (tl.dot needs >= 16)."""
    return max(low, min(high, 1 << max(size - 1, 0).bit_length()))


def _launch_configs(
    device: torch.device, c_in: int, c_out: int, c_pre: int, row_len: int, channels_last: bool = True
) -> dict:
    """Block sizes and warps per kernel.

    GPU: every ``tl.dot`` tile is 128 x 64 (or larger) over 8 warps, so that sm_90 runs it as
    wgmma with 64-row tiles per warpgroup; the forward GEMM's dot spans both branches (its
    ``BLOCK_N`` output channels are ``2*BLOCK_N`` pack columns). Checked to compile for sm_90a
    with Triton 3.6 and 3.9 (``python -m bench.compile_conv``); untuned otherwise: time them with
    ``pytest bench --benchmark``.
    Interpreter: large blocks, because its cost is per operation, not per element.
    """
    gpu = gpu_choices(device)

    def block(size, gpu_cap, interpreter_cap, low=16):
        return _block(size, low, gpu_cap if gpu else interpreter_cap)

    flat = 128  # positions per program of the per-sample kernels
    row = block(row_len, 128, 128, low=64 if gpu else 16)  # positions (t, w) per program of the per-row kernels
    gemm_n = 64 if c_pre == c_out and channels_last else 32  # with a global weight the dot is 2 * 32 columns wide
    return {
        # Without channels-last the A tiles are gathers strided in K: a 64-wide K block spills there.
        "gemm": dict(BLOCK_M=flat, BLOCK_N=block(c_out, gemm_n, 16), BLOCK_K=block(9 * c_in, 64 if channels_last else 32, 64),
                     num_warps=8),
        "dgrad": dict(BLOCK_M=flat, BLOCK_N=block(c_in, 64, 16), BLOCK_K=block(9 * c_pre, 64, 64), num_warps=8),
        "p0": dict(BLOCK_M=row, BLOCK_N=block(c_out, 64, 16), BLOCK_K=block(9 * c_in, 64, 64), num_warps=8),
        "delta_dgrad": dict(BLOCK_M=row, BLOCK_N=block(c_in, 64, 16), BLOCK_K=block(9 * c_out, 64, 64), num_warps=8),
        "elementwise": dict(BLOCK_M=64 if gpu else 128, BLOCK_N=block(c_out, 32, 16), num_warps=4 if gpu else 8),
        "wgrad": dict(BLOCK_M=64 if gpu else 256, BLOCK_O=_block(c_pre, 16, 128), num_warps=8),
    }


def _check_sample_extent(**tensors: torch.Tensor) -> None:
    """The kernels index within one sample in int32 (the batch offset is int64): check it fits."""
    for name, t in tensors.items():
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
        if extent >= 2**31:
            raise ValueError(
                f"{OP}: one sample of {name} spans {extent} elements (shape {tuple(t.shape)}, strides "
                f"{t.stride()}); impl='triton' needs fewer than 2**31. Use impl='torch'."
            )


def _has_band(band_start: Optional[torch.Tensor], band_rows: int, height: int) -> bool:
    """Whether there is any boundary row: a band, neither empty nor the whole map."""
    return band_start is not None and 0 < band_rows < height


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def _empty_activation(n: int, c: int, t: int, h: int, w: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A new ``[n, c, t, h, w]`` tensor in ``like``'s memory format (channels-last-3d stays so)."""
    dtype = dtype or like.dtype
    if _is_channels_last(like):
        return _alloc.empty(n, t, h, w, c, dtype=dtype, device=like.device).permute(0, 4, 1, 2, 3)
    return _alloc.empty(n, c, t, h, w, dtype=dtype, device=like.device)


def _in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (a no-op when the vendor already chose it)."""
    fmt = torch.channels_last_3d if _is_channels_last(like) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _stacked(weight_global: Optional[torch.Tensor], weight_local: torch.Tensor) -> torch.Tensor:
    """``[W_g; W_l]`` (``2*c_out`` output channels), or ``W_l`` alone."""
    return weight_local if weight_global is None else torch.cat([weight_global, weight_local], dim=0)


def _forward_pack(weight: torch.Tensor) -> torch.Tensor:
    """``[c_dst, c_src, kt, kh, kw]`` -> ``[kh, kt, kw, c_src, c_dst]``: one B matrix per kernel row."""
    return weight.permute(3, 2, 4, 1, 0).contiguous()


def _dgrad_pack(weight: torch.Tensor) -> torch.Tensor:
    """The flipped, transposed kernel, packed: ``[kh, kt, kw, c_dst, c_src]`` (dgrad = a forward conv)."""
    return _forward_pack(weight.flip(2, 3, 4).transpose(0, 1))


def _forward_outputs(x, c_out, c_pre, fuse_concat):
    """``y [n, c_out, t, h or 2h, w]`` and the gates ``[n, c_pre, t, h, w]`` (uint8), in x's format."""
    n, _, t, h, w = x.shape
    y = _empty_activation(n, c_out, t, 2 * h if fuse_concat else h, w, like=x)
    return y, _empty_activation(n, c_pre, t, h, w, like=x, dtype=torch.uint8)


def _slot_rows(x, c, dtype=None):
    """A per-sample boundary-slot buffer ``[n, 4, t, w, c]``; kernels touch its live slots only."""
    n, _, t, _, w = x.shape
    return _alloc.empty(n, 4, t, w, c, dtype=dtype or x.dtype, device=x.device)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors to fill (an H100/H200's 132 where there is no CUDA device, e.g. under the compile gate)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _wgrad(x, grad, grad_strides, c_grad, slots, band_start, band_rows, config):
    """fp32 ``[c_grad, c_in, 3, 3, 3]``: ``sum grad[p, o] * x[p + tap, c]`` over ``(n, slot, t, w)``.

    ``grad_strides``: ``(n, c, t, slot, w)`` strides of ``grad``. With ``band_start`` the slots
    are boundary slots and X is read through the band mask (the delta term).
    """
    n, c_in, t, h, w = x.shape
    block_k = _block(27 * c_in, 16, 64 if gpu_choices(x.device) else 128)
    tiles = _cdiv(c_grad, config["BLOCK_O"]) * _cdiv(27 * c_in, block_k)
    reductions = n * slots * _cdiv(t * w, config["BLOCK_M"])  # position tiles, each within one (n, slot) row
    if gpu_choices(x.device):  # split the reduction until the GPU is busy; partial sums keep it deterministic
        wanted = _cdiv(4 * _sm_count(x.device), tiles)
    else:  # the interpreter: two splits keep the partial-sum path exercised
        wanted = 2
    splits = max(1, min(reductions, wanted, 64))
    per_split = _cdiv(reductions, splits)
    splits = _cdiv(reductions, per_split)
    partial = _alloc.empty(splits, c_grad, 27 * c_in, dtype=torch.float32, device=x.device)
    band = band_start if band_start is not None else partial
    _kernels().conv3x3x3_wgrad_kernel[(tiles, splits)](
        x, grad, band, partial, reductions, per_split, slots, t, h, w, c_in, c_grad,
        *x.stride(), *grad_strides, band_rows, BAND_EDGES=band_start is not None, BLOCK_K=block_k, **config,
    )  # fmt: skip
    return partial.sum(0).view(c_grad, 3, 3, 3, c_in).permute(0, 4, 1, 2, 3)


def _interleaved(weight_global: Optional[torch.Tensor], weight_local: torch.Tensor) -> torch.Tensor:
    """The GEMM forward's stacked weight: output channel ``2*o + b`` is branch ``b`` (0 global, 1 local)
    of channel ``o``, so one dot over contiguous pack columns yields both branches of a channel block."""
    if weight_global is None:
        return weight_local
    return torch.stack([weight_global, weight_local], dim=1).flatten(0, 1)


def _forward(x, weight_global, weight_local, band_start, band_rows, fuse, negative_slope, design):
    """``(y, gates)``: the block's output and the one-byte gates its backward needs."""
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_out = weight_local.shape[0]
    has_global = weight_global is not None
    has_band = _has_band(band_start, band_rows, h)
    fuse_concat = has_global and fuse == "concat"
    weight = _stacked(weight_global, weight_local)
    configs = _launch_configs(x.device, c_in, c_out, weight.shape[0], t * w, x.stride(1) == 1)
    y, gates = _forward_outputs(x, c_out, weight.shape[0], fuse_concat)
    _check_sample_extent(x=x, y=y)
    band = band_start if has_band else gates  # a placeholder pointer when there is no band
    flags = dict(HAS_GLOBAL=has_global, HAS_BAND=has_band, FUSE_CONCAT=fuse_concat)
    plane = t * h * w  # positions per sample
    if design == "gemm":
        config = configs["gemm"]
        grid = (_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), n)
        kernels.mla_forward_gemm_kernel[grid](
            x, _forward_pack(_interleaved(weight_global, weight_local)), band, y, gates, t, h, w, c_in, c_out,
            *x.stride(), *y.stride(), *gates.stride(), band_rows, negative_slope, **flags, **config,
        )  # fmt: skip
        return y, gates

    pre = F.conv3d(x, weight, padding=1)  # [G; F] by the vendor, a temporary
    _check_sample_extent(pre=pre)
    p0_rows = _slot_rows(x, c_out, torch.float32) if has_band else gates  # (a placeholder without a band)
    if has_band:
        config = configs["p0"]
        kernels.mla_boundary_p0_kernel[(n * 4, _cdiv(t * w, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]))](
            x, _forward_pack(weight_local), band_start, p0_rows, t, h, w, c_in, c_out,
            *x.stride(), *p0_rows.stride(), band_rows, **config,
        )  # fmt: skip
    config = configs["elementwise"]
    kernels.mla_epilogue_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), n)](
        pre, p0_rows, band, y, gates, t, h, w, c_out,
        *pre.stride(), *p0_rows.stride(), *y.stride(), *gates.stride(), band_rows, negative_slope,
        **flags, **config,
    )  # fmt: skip
    return y, gates


def _backward(grad_y, x, weight_global, weight_local, band_start, gates, band_rows, fuse, negative_slope, design):
    """``(dx, d[W_g; W_l])`` from the saved gates."""
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_out = weight_local.shape[0]
    has_global = weight_global is not None
    has_band = _has_band(band_start, band_rows, h)
    weight = _stacked(weight_global, weight_local)
    c_pre = weight.shape[0]
    configs = _launch_configs(x.device, c_in, c_out, c_pre, t * w)
    plane = t * h * w  # positions per sample
    _check_sample_extent(grad_y=grad_y)

    # gpre = [g_G a'(G); g_L a'(F')], and delta = g_L (a'(P0) - a'(F - P0)) on the boundary slots.
    gpre = _empty_activation(n, c_pre, t, h, w, like=x)
    delta = _slot_rows(x, c_out) if has_band else gates
    config = configs["elementwise"]
    kernels.mla_gated_grad_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), n)](
        grad_y, gates, band_start if has_band else gates, gpre, delta, t, h, w, c_out,
        *grad_y.stride(), *gates.stride(), *gpre.stride(), *delta.stride(), band_rows, negative_slope,
        HAS_GLOBAL=has_global, HAS_BAND=has_band, FUSE_CONCAT=has_global and fuse == "concat", **config,
    )  # fmt: skip

    if design == "gemm":
        dx = _empty_activation(n, c_in, t, h, w, like=x)
        config = configs["dgrad"]
        kernels.conv3x3x3_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]), n)](
            gpre, _dgrad_pack(weight), dx, t, h, w, c_pre, c_in, *gpre.stride(), *dx.stride(), **config
        )
        dweight = _wgrad(x, gpre, gpre.stride(), c_pre, h, None, band_rows, configs["wgrad"])
    else:
        dx, dweight, _ = torch.ops.aten.convolution_backward(
            gpre, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False]
        )
        dx = _in_format_of(dx, like=x)
        dweight = dweight.float()

    if has_band:  # the delta terms: M0 * (W_l^T conv delta) into dx, (X*M0) conv delta into dW_l
        d = delta.stride()  # [n, 4, t, w, c]
        config = configs["delta_dgrad"]
        kernels.mla_delta_dgrad_kernel[(n * 4, _cdiv(t * w, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]))](
            delta, _dgrad_pack(weight_local), band_start, dx, t, h, w, c_out, c_in, *d, *dx.stride(), band_rows,
            **config,
        )  # fmt: skip
        delta_strides = (d[0], d[4], d[2], d[1], d[3])  # as (n, c, t, slot, w)
        config = dict(configs["wgrad"], BLOCK_O=_block(c_out, 16, 64))
        dweight[c_pre - c_out :] += _wgrad(x, delta, delta_strides, c_out, 4, band_start, band_rows, config)
    return dx, dweight.to(weight.dtype).contiguous()


_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight_global, Tensor weight_local, Tensor? band_start, int band_height, str fuse, "
    "float negative_slope, str design) -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? weight_global, Tensor weight_local, Tensor? band_start, Tensor gates, "
    "int band_height, str fuse, float negative_slope, str design) -> (Tensor, Tensor)"
)


@torch.library.custom_op("fastgait::mla_conv3d", mutates_args=(), schema=_FORWARD_SCHEMA)
def _mla_conv3d_op(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design):
    """The fused forward: ``(y, gates)``; the uint8 gates are what the backward needs."""
    with nvtx_range("mla_conv3d.forward"):
        return _forward(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design)


@_mla_conv3d_op.register_fake
def _(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design):
    c_out = weight_local.shape[0]
    c_pre = c_out if weight_global is None else 2 * c_out
    return _forward_outputs(x, c_out, c_pre, weight_global is not None and fuse == "concat")


@torch.library.custom_op("fastgait::mla_conv3d_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _mla_conv3d_backward_op(
    grad_y, x, weight_global, weight_local, band_start, gates, band_height, fuse, negative_slope, design
):
    """The fused backward: ``(dx, d[W_g; W_l])`` (the stacked weight gradient)."""
    with nvtx_range("mla_conv3d.backward"):
        return _backward(
            grad_y, x, weight_global, weight_local, band_start, gates, band_height, fuse, negative_slope, design
        )


@_mla_conv3d_backward_op.register_fake
def _(grad_y, x, weight_global, weight_local, band_start, gates, band_height, fuse, negative_slope, design):
    n, c_in, t, h, w = x.shape
    return _empty_activation(n, c_in, t, h, w, like=x), weight_local.new_empty(gates.shape[1], c_in, 3, 3, 3)


def _setup_context(ctx, inputs, output):
    x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design = inputs
    _, gates = output
    ctx.save_for_backward(x, weight_global, weight_local, band_start, gates)
    ctx.config = (band_height, fuse, negative_slope, design)
    ctx.mark_non_differentiable(gates)


def _autograd_backward(ctx, grad_y, _grad_gates):
    x, weight_global, weight_local, band_start, gates = ctx.saved_tensors
    dx, dweight = torch.ops.fastgait.mla_conv3d_backward(
        grad_y, x, weight_global, weight_local, band_start, gates, *ctx.config
    )
    c_out = weight_local.shape[0]
    dweight_global = None if weight_global is None else dweight[:c_out]
    return dx, dweight_global, dweight[-c_out:], None, None, None, None, None


_mla_conv3d_op.register_autograd(_autograd_backward, setup_context=_setup_context)
