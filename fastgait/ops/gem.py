"""``gem_hpp``: GeM pooling over horizontal strips, fused with the temporal max (fused_ops.md §3).

Implementations:
- ``"reference"``: the spec, ``fastgait.ops.reference.gem_hpp_reference``.
- ``"triton"``: ``fastgait.kernels.gem`` (see its design note). Forward: one program per
  (row, sample, block of channels) reads its row of every frame once (tiles vectorised over the
  channels, the contiguous dim of channels-last-3d) and computes the max over frames, the clamp
  and the row's power sum in fp32; with ``bins == (h,)`` (one strip per row, the models' case)
  it writes the output itself, otherwise a small second kernel combines rows into strips. The
  backward (same grid) sends the gradient to the first argmax frame and reduces ``d loss / d p``
  from per-program partials in a fixed order (deterministic). Saved for backward: the max over
  frames (input dtype) and its frame (int16), ``[n, c, h, w]`` each, never the input.

Both Triton ops are ``torch.library`` custom ops (``fastgait::gem_hpp_fwd`` / ``_bwd``) with
fake implementations and an autograd registration, so ``torch.compile(fullgraph=True)`` traces
through them; the output is computed in fp32 and cast to the input's dtype.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Sequence

import torch

from .._nvtx import nvtx_range
from . import _alloc
from ._checks import check_tensor
from ._dispatch import gpu_choices, resolve_impl
from .reference import gem_hpp_reference, strip_bounds

OP = "gem_hpp"
MAX_FRAMES = torch.iinfo(torch.int16).max  # the argmax frame is saved as int16
# Register cap (``maxnreg``) of the row kernels, by layout, from a maxnreg sweep (compiled with the compile gate's worker; docs/KERNELS.md shows the result)
# (sm_90a, Triton 3.6 and 3.9): channels-last-3d tiles need 40-95 registers and compile without
# spills uncapped; the contiguous layout's tiles, uncapped, had ptxas's occupancy heuristics spill
# a few bytes in one variant, and compile without spills under a cap of 128.
MAXNREG_CONTIGUOUS = 128


def gem_hpp(
    x: torch.Tensor, p: torch.Tensor, bins: Sequence[int] = (64,), eps: float = 1e-6, impl: str = "auto"
) -> torch.Tensor:
    """GeM over horizontal strips: ``[n, c, h, w]`` or ``[n, c, t, h, w]`` -> ``[n, c, sum(bins)]``.

    A 5-D input is max-pooled over frames first (the gradient goes to the first maximal frame).
    ``p`` is a one-element tensor (learnable); strip i of ``b`` covers rows ``[i*h//b, (i+1)*h//b)``.
    Any memory format is read through its strides (no copy). The Triton path computes in fp32
    and returns the input's dtype.

    ``p`` must be finite and ``> 0`` (GeM's domain; it is learnable, so it can leave it). On CPU
    tensors that is checked here (a ValueError). On a GPU reading ``p`` would make the host wait
    for the device every step, so it is not read: every path (reference and Triton) returns NaN
    for the whole output instead, which the trainer's non-finite guard sees. NaN or inf in ``x``
    propagate as in the reference.
    """
    bins = _check_inputs(x, p, bins, eps)
    _check_p_domain(p)
    path = resolve_impl(impl, x.device, op=OP, has_torch=False, has_triton=True)
    if impl == "auto" and x.dtype == torch.float64:
        path = "reference"  # the kernels compute in fp32
    if path == "reference":
        return gem_hpp_reference(x, p, bins, eps)
    if x.dim() == 5 and x.shape[2] > MAX_FRAMES:
        raise ValueError(f"{OP}: impl='triton' takes at most {MAX_FRAMES} frames, got t={x.shape[2]}")
    keep_frame_max = torch.is_grad_enabled() and (x.requires_grad or p.requires_grad)
    out, _, _ = gem_hpp_fwd(x, p, list(bins), float(eps), keep_frame_max)
    return out.to(x.dtype)


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _check_p_domain(p: torch.Tensor) -> None:
    """``p > 0``, where it costs no device sync: CPU tensors outside torch.compile tracing. A NaN or
    inf ``p`` (a diverged run) is not refused here: the op answers NaN, as on the GPU, so the
    trainer's non-finite guard names the divergence."""
    if p.device.type != "cpu" or _tracing() or isinstance(p, torch._subclasses.FakeTensor):
        return
    value = float(p.detach().reshape(()))
    if math.isfinite(value) and value <= 0:
        raise ValueError(f"{OP}: p must be finite and > 0 (GeM's exponent), got p={value}; re-initialise it (e.g. 6.5)")


def _check_inputs(x, p, bins, eps) -> tuple[int, ...]:
    check_tensor(x, "x", op=OP, ndim=(4, 5))
    check_tensor(p, "p", op=OP, device=x.device)
    if p.numel() != 1:
        raise ValueError(f"{OP}: p must hold one value (a learnable exponent), got shape {tuple(p.shape)}")
    try:
        bins = tuple(operator.index(b) for b in bins)
    except TypeError:
        raise TypeError(f"{OP}: bins must be a sequence of ints (strip counts), got {bins!r}") from None
    height = x.shape[-2]
    if not bins or any(not 1 <= b <= height for b in bins):
        raise ValueError(f"{OP}: every bin count must lie in [1, h={height}], got bins={bins}")
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0 (it keeps clamp(x, eps)^p differentiable), got {eps}")
    return bins


# ----------------------------------------------------------------------------------------
# Allocation (shared by the real and the fake implementations, so both give the same strides)
# ----------------------------------------------------------------------------------------


def _frame_max_order(x_order: Sequence[int]) -> list[int]:
    """``x``'s layout with the frame dim dropped: the layout of ``[n, c, h, w]`` frame maxima."""
    return [d if d < 2 else d - 1 for d in x_order if d != 2]


def _forward_outputs(x: torch.Tensor, bins: Sequence[int], keep_frame_max: bool):
    n, c, h, w = x.shape[0], x.shape[1], x.shape[-2], x.shape[-1]
    out = _alloc.empty(n, c, sum(bins), dtype=torch.float32, device=x.device)
    if x.dim() == 5 and keep_frame_max:
        order = _frame_max_order(_alloc.stride_order(x))
        frame_max = _alloc.empty_in_layout((n, c, h, w), order, x.dtype, x.device)
        frame_arg = _alloc.empty_in_layout((n, c, h, w), order, torch.int16, x.device)
    else:  # a 4-D input is its own frame max; nothing to keep without backward
        frame_max = _alloc.empty(0, dtype=x.dtype, device=x.device)
        frame_arg = _alloc.empty(0, dtype=torch.int16, device=x.device)
    return out, frame_max, frame_arg


def _backward_outputs(frame_max: torch.Tensor, p: torch.Tensor, frames: int, x_order: Sequence[int]):
    n, c, h, w = frame_max.shape
    shape = (n, c, frames, h, w) if frames else (n, c, h, w)
    grad_x = _alloc.empty_in_layout(shape, x_order, frame_max.dtype, frame_max.device)
    return grad_x, _alloc.empty(tuple(p.shape), dtype=p.dtype, device=p.device)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _strip_tables(bins: tuple[int, ...], height: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[2, S]`` row bounds of every strip (bins in order), int32 ``[bins, h]`` strip of each row."""
    bounds = [bound for count in bins for bound in strip_bounds(height, count)]
    strip_rows = torch.tensor(bounds, dtype=torch.int32).t().contiguous()
    row_strip = torch.empty(len(bins), height, dtype=torch.int32)
    first = 0
    for b, count in enumerate(bins):
        for i, (lo, hi) in enumerate(strip_bounds(height, count)):
            row_strip[b, lo:hi] = first + i
        first += count
    return strip_rows.to(device), row_strip.to(device)


def _pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _tile(c: int, t: int, w: int, itemsize: int, device: torch.device, channels_last: bool) -> dict:
    """Block sizes and warps of the row kernels (the same on every device; see kernels/gem.py).

    ``BLOCK_C``: up to 128 channels (the contiguous dim in channels-last-3d: 8 bf16 per thread).
    ``BLOCK_W``: the largest power of two that pads the row by at most ~10% (w = 22 -> 8: 24
    columns, w = 11 -> 4: 12), within a tile of at most 2048 elements (4096 bytes for fp16/bf16,
    8192 for fp32: no spills for any dtype). ``UNROLL_T``: frames per step, a divisor of t when one
    of 5, 4, 2 is (t = 10 -> 5), so the tail frames are rarely masked.
    """
    block_c = min(_pow2(c), 128)
    block_w = 1
    for candidate in (2, 4, 8, 16, 32):
        if candidate * block_c > 2048 or candidate > _pow2(w):
            break
        padded = -(-w // candidate) * candidate
        if padded <= 1.1 * w:
            block_w = candidate
    unroll = next((u for u in (5, 4, 2) if t % u == 0), min(t, 4))
    warps = 4 if block_w * block_c >= 512 else (2 if block_w * block_c >= 128 else 1)
    if gpu_choices(device) and itemsize >= 4 and block_w * block_c >= 1024:
        warps = 8  # fp32: keep 8 elements (two 16-byte loads) per thread per frame
    tile = dict(BLOCK_W=block_w, BLOCK_C=block_c, UNROLL_T=max(unroll, 1), num_warps=warps)
    if not channels_last:
        tile["maxnreg"] = MAXNREG_CONTIGUOUS
    return tile


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 5 else t.unsqueeze(2)


def _check_sample_extent(**tensors: torch.Tensor) -> None:
    """The kernels index one sample with int32 offsets (the sample base is int64): check it fits."""
    for name, t in tensors.items():
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
        if extent >= 2**31:
            raise ValueError(
                f"{OP}: one sample of {name} spans {extent} elements (shape {tuple(t.shape)}); impl='triton' "
                "needs fewer than 2**31. Use impl='reference'."
            )


@torch.library.custom_op("fastgait::gem_hpp_fwd", mutates_args=())
def gem_hpp_fwd(
    x: torch.Tensor, p: torch.Tensor, bins: list[int], eps: float, keep_frame_max: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out fp32 [n, c, S], frame_max [n, c, h, w], frame_arg int16 [n, c, h, w])``.

    ``frame_max``/``frame_arg`` are empty unless ``x`` is 5-D and ``keep_frame_max``. A ``p``
    outside ``(0, inf)`` gives an all-NaN ``out`` (checked on the device, no host sync).
    Launches ``gem_rows_fwd_kernel`` and, unless ``bins == [h]``, ``gem_strips_kernel``.
    """
    import triton

    from fastgait.kernels.gem import gem_rows_fwd_kernel, gem_strips_kernel

    with nvtx_range("gem_hpp.forward"):
        out, frame_max, frame_arg = _forward_outputs(x, bins, keep_frame_max)
        x5 = _as_5d(x)
        n, c, t, h, w = x5.shape
        _check_sample_extent(x=x5)
        if n > 65535:  # the grid's second dim
            raise ValueError(f"{OP}: impl='triton' takes at most 65535 samples per call, got {n}; split the batch")
        save = frame_arg.numel() > 0
        row_strips = list(bins) == [h]
        tile = _tile(c, t, w, x.element_size(), x.device, x5.stride(1) == 1)
        grid = (h, n, triton.cdiv(c, tile["BLOCK_C"]))
        stats = out if row_strips else _alloc.empty(2, n * h, c, dtype=torch.float32, device=x.device)
        gem_rows_fwd_kernel[grid](
            x5, p, out, stats,
            frame_max if save else out, frame_arg if save else out,
            c, t, h, w,
            *x5.stride(),
            *(frame_max.stride() if save else (0, 0, 0, 0)),
            eps,
            ROW_STRIPS=row_strips, SAVE_FRAME_MAX=save, **tile,
        )  # fmt: skip
        if not row_strips:
            strip_rows, _ = _strip_tables(tuple(bins), h, x.device)
            s = strip_rows.shape[1]
            block_c = min(_pow2(c), 256)
            gem_strips_kernel[(s, n, triton.cdiv(c, block_c))](
                stats, p, strip_rows, out, c, h, w, s, BLOCK_C=block_c, num_warps=max(1, min(4, block_c // 64))
            )
    return out, frame_max, frame_arg


@gem_hpp_fwd.register_fake
def _(x, p, bins, eps, keep_frame_max):
    return _forward_outputs(x, bins, keep_frame_max)


@torch.library.custom_op("fastgait::gem_hpp_bwd", mutates_args=())
def gem_hpp_bwd(
    grad_out: torch.Tensor,
    frame_max: torch.Tensor,
    frame_arg: torch.Tensor,
    out: torch.Tensor,
    p: torch.Tensor,
    bins: list[int],
    eps: float,
    frames: int,
    x_order: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: ``(grad_x, grad_p)``. ``frames = 0`` for a 4-D input (``frame_max`` is then
    the input itself); ``x_order`` is the input's layout, which ``grad_x`` copies."""
    import triton

    from fastgait.kernels.gem import gem_rows_bwd_kernel

    with nvtx_range("gem_hpp.backward"):
        grad_x, grad_p = _backward_outputs(frame_max, p, frames, x_order)
        n, c, h, w = frame_max.shape
        t = max(frames, 1)
        strip_rows, row_strip = _strip_tables(tuple(bins), h, frame_max.device)
        tile = _tile(c, t, w, frame_max.element_size(), frame_max.device, _as_5d(grad_x).stride(1) == 1)
        grid = (h, n, triton.cdiv(c, tile["BLOCK_C"]))
        _check_sample_extent(grad_x=_as_5d(grad_x))
        partials = _alloc.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=frame_max.device)
        has_frames = frames > 0
        gem_rows_bwd_kernel[grid](
            grad_out, out, p, frame_max, frame_arg if has_frames else frame_max,
            strip_rows, row_strip, grad_x, partials,
            c, t, h, w, strip_rows.shape[1], len(bins),
            *grad_out.stride(),
            *frame_max.stride(),
            *(frame_arg.stride() if has_frames else (0, 0, 0, 0)),
            *_as_5d(grad_x).stride(),
            eps,
            HAS_FRAMES=has_frames, **tile,
        )  # fmt: skip
        grad_p.copy_(partials.sum().reshape(p.shape))  # a fixed-order reduction: deterministic
    return grad_x, grad_p


@gem_hpp_bwd.register_fake
def _(grad_out, frame_max, frame_arg, out, p, bins, eps, frames, x_order):
    return _backward_outputs(frame_max, p, frames, x_order)


def _setup_context(ctx, inputs, output):
    x, p, bins, eps, _ = inputs
    out, frame_max, frame_arg = output
    ctx.bins, ctx.eps = bins, eps
    ctx.frames = x.shape[2] if x.dim() == 5 else 0
    ctx.x_order = _alloc.stride_order(x)
    ctx.mark_non_differentiable(frame_max, frame_arg)
    ctx.set_materialize_grads(False)  # no zero gradients for the frame max and argmax
    ctx.save_for_backward(frame_max if x.dim() == 5 else x, frame_arg, out, p)


def _backward(ctx, grad_out, _grad_frame_max, _grad_frame_arg):
    if grad_out is None:
        return None, None, None, None, None
    frame_max, frame_arg, out, p = ctx.saved_tensors
    if ctx.frames and frame_arg.numel() == 0:
        raise RuntimeError(f"{OP}: the forward ran with keep_frame_max=False; it cannot be differentiated")
    grad_x, grad_p = gem_hpp_bwd(grad_out, frame_max, frame_arg, out, p, ctx.bins, ctx.eps, ctx.frames, ctx.x_order)
    return grad_x, grad_p, None, None, None


gem_hpp_fwd.register_autograd(_backward, setup_context=_setup_context)
