"""The row-cut convolution engine: one 3x3x3 convolution whose rows are cut at given borders.

Shared by the MLA block (``fastgait.ops.mla``: a per-sample band, the complementary pair),
GaitGL's GL block (``fastgait.ops.gl``: fixed strips, zero padding at every strip border) and
the band-region ReverseMask pair. The math (``kernels/conv_engine.py``, docs/mla_notes.md):
``[G; F] = [W_g; W_l] * X`` as one convolution with stacked weights; on the *cut rows* (the
rows either side of a border, at most 2 per border) also ``P``, the kernel rows of ``F`` that
read across the border; the local branch is ``lrelu(P) + lrelu(F - P)`` (terms ``"pair"``) or
``lrelu(F - P)`` (terms ``"rest"``) there and ``lrelu(F)`` elsewhere; fusion by add or concat.

Paths:
- ``cut_conv3d_torch``: the engine in plain PyTorch (autograd derives the backward); the CPU path.
- ``cut_conv3d_triton``: the fused op ``fastgait::cut_conv3d`` (+ ``fastgait::cut_conv3d_backward``),
  registered with ``torch.library``, in three designs: ``"hybrid"`` (vendor convolution for
  ``[G; F]``, Triton kernels for ``P`` on the cut rows and the epilogue; vendor dgrad/wgrad plus
  Triton kernels for the cut rows' terms), ``"hybrid2d"`` (the same, with the vendor's
  convolution done as a 2-D one over frame-stacked channels: cuDNN's NHWC 2-D kernels, its most
  tuned, instead of its 3-D ones; see ``_frame_stacked_conv``) and ``"gemm"`` (Triton implicit
  GEMM throughout).

Designs. ``design="auto"`` (the default) picks per shape, by timing the designs on the GPU
(``fastgait.ops._autotune``): the forward and the backward separately, each keyed by
direction, x's shape, dtype and layout, ``c_out``, global branch, fuse, terms, geometry, cut
size, whether rows are cut, and the GPU's name. The designs' forwards save the same
``(y, gates)`` (the same epilogue writes both), so any forward pairs with any backward. Off
CUDA (the interpreter, the compile gate's fake tensors) and during CUDA-graph capture "auto"
is ``FALLBACK_DESIGN``, untimed. ``FASTGAIT_CONV_DESIGN=hybrid|hybrid2d|gemm|auto`` overrides
what "auto" resolves to (an explicit ``design=`` other than "auto" is always obeyed). With
``$FASTGAIT_CACHE`` set, timed choices persist in ``$FASTGAIT_CACHE/autotune/cut_conv3d.json``.

The ops that use it validate their inputs; the engine assumes valid ones.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .._nvtx import nvtx_range
from . import _alloc, _autotune
from ._dispatch import gpu_choices, sm_count
from .conv import conv3d

OP = "cut_conv3d"
GEOMETRIES = ("band", "strips")
TERMS = ("pair", "rest")
FUSES = ("add", "concat")
DESIGNS = ("hybrid", "hybrid2d", "gemm")  # the implementations
DESIGN_CHOICES = ("auto",) + DESIGNS  # what ``design`` accepts
DESIGN_ENV = "FASTGAIT_CONV_DESIGN"  # hybrid | hybrid2d | gemm | auto: overrides what "auto" resolves to
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The default is "auto": each shape's forward and backward run the design that was faster on
# this GPU (timed once per process, logged; see the module docstring). Which design wins
# depends on shape and GPU: the first H200 run (shared/measurements/2026-11-30-nvidia-h200*,
# before the gemm design's rewrite) had hybrid ahead at every CASIA-B shape (MLA fwd+bwd,
# hybrid 0.65-0.99x the eager reference, gemm 2.0-3.7x; hybrid2d did not exist yet: it is the
# hybrid on cuDNN's 2-D NHWC kernels, its most tuned, where its 3-D ones reached 200-500 TFLOP/s;
# not measured yet). `pytest bench --benchmark` records
# what "auto" chose per shape (provider triton-auto, and the step's design_choices); delete a
# design once it never wins.
DEFAULT_DESIGN = "auto"
# What "auto" runs where it cannot time (CPU tensors under the interpreter, the compile gate's
# fake tensors, CUDA-graph capture): the design that won the first H200 run.
FALLBACK_DESIGN = "hybrid"


@dataclass(frozen=True)
class Cuts:
    """Where a sample's rows are cut: ``geometry="band"`` (two segments: ``[start, start + size)``
    per sample from ``band_start [n]``, and the rest) or ``"strips"`` (strips of ``size`` rows,
    the last one shorter when ``size`` does not divide the height)."""

    geometry: str
    size: int
    band_start: Optional[torch.Tensor] = None

    @property
    def geom_id(self) -> int:
        return GEOMETRIES.index(self.geometry)

    def slots(self, height: int) -> int:
        """Cut-row slots per sample: 4 for a band, 2 per border for strips."""
        if self.geometry == "band":
            return 4
        return 2 * (_cdiv(height, self.size) - 1)

    def any(self, height: int) -> bool:
        """Whether any row is cut (a band that is neither empty nor the whole map; more than one strip)."""
        if self.geometry == "band":
            return self.band_start is not None and 0 < self.size < height
        return self.size < height

    def band_pointer(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.band_start if self.geometry == "band" and self.band_start is not None else placeholder

    def chunk(self, rows: slice) -> "Cuts":
        """The cuts of the samples ``rows`` (a slice of the batch): the band starts sliced alike."""
        return self if self.band_start is None else Cuts(self.geometry, self.size, self.band_start[rows])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------
# "torch": the engine in plain PyTorch (autograd derives the backward)
# ----------------------------------------------------------------------------------------


def cut_rows(cuts: Cuts, batch: int, height: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut rows of each sample, slot by slot: ``(rows [n, slots], live [n, slots])``.

    ``rows`` are clamped into the map; ``live`` marks real cut rows that no earlier slot holds
    (the same slot order and liveness as the kernels').
    """
    slots = cuts.slots(height)
    index = torch.arange(slots, device=device)
    if cuts.geometry == "band":
        start = cuts.band_start.long().view(-1, 1)
        rows = start - 1 + index + (index // 2) * (cuts.size - 2)  # start-1, start, end-1, end
        repeat = (index == 2) & (rows == start)
    else:
        rows = ((index // 2 + 1) * cuts.size - 1 + index % 2).expand(batch, slots)
        repeat = ((index % 2 == 0) & (index > 0) & (cuts.size == 1)).expand(batch, slots)
    on_map = (rows >= 0) & (rows < height)
    cut = (_across(cuts, rows, rows - 1, height) | _across(cuts, rows, rows + 1, height)) & on_map
    return rows.clamp(0, height - 1), cut & ~repeat


def _segment(cuts: Cuts, rows: torch.Tensor) -> torch.Tensor:
    if cuts.geometry == "band":
        start = cuts.band_start.long().view(-1, *([1] * (rows.dim() - 1)))
        return ((rows >= start) & (rows < start + cuts.size)).long()
    return torch.div(rows, cuts.size, rounding_mode="floor")


def _across(cuts: Cuts, rows: torch.Tensor, sources: torch.Tensor, height: int) -> torch.Tensor:
    """Source rows on the map and in another segment than the output rows (same shapes)."""
    return (sources >= 0) & (sources < height) & (_segment(cuts, sources) != _segment(cuts, rows))


def local_terms(full: torch.Tensor, cut_part: torch.Tensor, terms: str, negative_slope: float) -> torch.Tensor:
    """The local branch on a cut row from ``F`` and ``P``."""
    rest = full - cut_part
    if terms == "pair":
        return F.leaky_relu(cut_part, negative_slope) + F.leaky_relu(rest, negative_slope)
    return F.leaky_relu(rest, negative_slope)


def cut_conv3d_torch(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weight_local: torch.Tensor,
    cuts: Cuts,
    fuse: str = "add",
    terms: str = "pair",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """The engine in plain PyTorch: ``[G; F]`` in one convolution, then the cut rows' correction."""
    c_out = weight_local.shape[0]
    weight = weight_local if weight_global is None else torch.cat([weight_global, weight_local], dim=0)
    pre = conv3d(x, weight, padding=1)  # [n, (2)c_out, t, h, w]: [G, F] in one convolution
    pre_local = pre[:, -c_out:]
    local = F.leaky_relu(pre_local, negative_slope)
    if cuts.any(x.shape[3]):
        local = _add_cut_correction(local, x, weight_local, pre_local, cuts, terms, negative_slope)
    if weight_global is None:
        return local
    glob = F.leaky_relu(pre[:, :c_out], negative_slope)
    return glob + local if fuse == "add" else torch.cat([glob, local], dim=3)


def _add_cut_correction(local, x, weight_local, pre_local, cuts, terms, negative_slope):
    """``local`` plus ``terms(F, P) - lrelu(F)`` on the cut rows.

    ``P`` only has kernel rows 0 and 2 (the middle row is never across): the across source rows
    above and below each cut row, stacked along channels, make one 2-D convolution over
    ``(t, w)`` with the kernel ``[W[:, :, :, 0]; W[:, :, :, 2]]`` (2-D convolutions are much faster
    than 3-D ones of one row on a CPU). It costs ``2*slots/(3*h)`` of a convolution.
    """
    n, c_in, t, height, w = x.shape
    rows, live = cut_rows(cuts, n, height, x.device)  # [n, S]
    slots = rows.shape[1]
    batch = torch.arange(n, device=x.device).view(n, 1)
    x_rows = x.permute(0, 3, 1, 2, 4)  # [n, h, c_in, t, w]
    sources = []
    for kh in (0, 2):
        src = rows + (kh - 1)
        across = _across(cuts, rows, src, height) & live  # [n, S]
        sources.append(x_rows[batch, src.clamp(0, height - 1)] * across.to(x.dtype).view(n, slots, 1, 1, 1))
    stacked = torch.stack(sources, dim=2).reshape(n * slots, 2 * c_in, t, w)  # channel index kh_side*c_in + c
    weight2d = torch.stack([weight_local[:, :, :, 0], weight_local[:, :, :, 2]], dim=1)  # [c_out, 2, c_in, kt, kw]
    weight2d = weight2d.reshape(weight_local.shape[0], 2 * c_in, 3, 3)
    cut_part = F.conv2d(stacked, weight2d, padding=1).view(n, slots, -1, t, w)  # [n, S, c_out, t, w]
    full = pre_local.permute(0, 3, 1, 2, 4)[batch, rows]  # [n, S, c_out, t, w]
    correction = local_terms(full, cut_part, terms, negative_slope) - F.leaky_relu(full, negative_slope)
    correction = correction * live.view(n, slots, 1, 1, 1)
    # Out of place, accumulating: dead slots add zeros, and autograd stays exact.
    out = local.permute(0, 3, 1, 2, 4).index_put((batch.expand(n, slots), rows), correction, accumulate=True)
    return out.permute(0, 2, 3, 1, 4)  # [n, c_out, t, h, w]


# ----------------------------------------------------------------------------------------
# "triton": launchers, the torch.library ops and their autograd
# ----------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels see: autocast's when it is on (as for autocast convolutions)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.lru_cache(maxsize=None)
def _kernels():
    """``fastgait.kernels.conv_engine``, imported on first use (Triton reads TRITON_INTERPRET at import)."""
    from fastgait.kernels import conv_engine

    return conv_engine


def _block(size: int, low: int, high: int) -> int:
    """A power-of-two block for a dimension of ``size``, in ``[low, high]`` (tl.dot needs >= 16)."""
    return max(low, min(high, 1 << max(size - 1, 0).bit_length()))


def k_tiling(c_src: int, cap: int, gpu: bool, taps: int = 9, interpreter_cap: int = 64) -> dict:
    """``BLOCK_K`` and ``C_BLOCKS`` of an implicit-GEMM K over ``taps`` taps x ``c_src`` channels.

    Aligned (``c_src`` a multiple of 16): ``BLOCK_K`` is the largest power of two <= ``cap`` that
    divides ``c_src`` and ``C_BLOCKS = c_src / BLOCK_K``: each K block is one tap's channels, so
    the kernels test bounds per row and load each row's channels as vectors
    (``_accumulate_row_taps``). Otherwise (OU-MVLP's ragged counts) ``C_BLOCKS = 0``: K runs flat
    over ``(tap, channel)`` with per-element masks.
    """
    if c_src % 16 == 0:
        block_k = 16
        while block_k * 2 <= cap and c_src % (block_k * 2) == 0:
            block_k *= 2
        return dict(BLOCK_K=block_k, C_BLOCKS=c_src // block_k)
    return dict(BLOCK_K=_block(taps * c_src, 16, cap if gpu else interpreter_cap), C_BLOCKS=0)


def launch_configs(
    device: torch.device, c_in: int, c_out: int, c_pre: int, row_len: int, channels_last: bool = True,
    element_size: int = 2,
) -> dict:
    """Block sizes and warps per kernel.

    GPU: every ``tl.dot`` tile is 128 x 64 (or larger) over 8 warps, so that sm_90 runs it as
    wgmma with 64-row tiles per warpgroup; the forward GEMM's dot spans both branches (its
    ``BLOCK_N`` output channels are ``2*BLOCK_N`` pack columns). Checked to compile for sm_90a
    with Triton 3.6 and 3.9 (``python -m fastgait.compile_gate``, docs/KERNELS.md); untuned otherwise: time them with
    ``pytest bench --benchmark``.
    Interpreter: large blocks, because its cost is per operation, not per element.
    """
    gpu = gpu_choices(device)

    def block(size, gpu_cap, interpreter_cap, low=16):
        return _block(size, low, gpu_cap if gpu else interpreter_cap)

    flat = 128  # positions per program of the per-sample kernels
    row = block(row_len, 128, 128, low=64 if gpu else 16)  # positions (t, w) per program of the per-row kernels
    # With a global weight the forward's dot is 2 * BLOCK_N columns wide: 128 where the K loop is aligned
    # (k_tiling) on 16-bit data; the flat K loop's per-element masks (ragged c_in) spilled at 128 in fp32,
    # and fp32 (TF32) tiles took 245-255 registers at 128 (the compile gate): 64 columns there.
    gemm_n = 64 if channels_last and c_in % 16 == 0 and element_size <= 2 else 32

    def ragged(c: int) -> bool:  # OU-MVLP's 196 channels: tiles mask a tail (they spilled at 64)
        return c % 32 != 0

    def k_cap(*channels: int, wide: bool = True) -> int:
        # 64-wide K blocks unless a channel count they step through is ragged (the compile gate)
        return 64 if wide and not any(ragged(c) for c in channels) else 32

    return {
        # Without channels-last the A tiles are gathers strided in K: a 64-wide K block spills there.
        "gemm": dict(BLOCK_M=flat, BLOCK_N=block(c_out, 16 if ragged(c_out) else gemm_n, 16),
                     **k_tiling(c_in, k_cap(c_in, c_out, wide=channels_last), gpu), num_warps=8),
        "dgrad": dict(BLOCK_M=flat, BLOCK_N=block(c_in, 32 if ragged(c_pre) else 64, 16),
                      **k_tiling(c_pre, k_cap(c_pre, c_in, wide=channels_last), gpu), num_warps=8),
        "p0": dict(BLOCK_M=row, BLOCK_N=block(c_out, 64, 16), **k_tiling(c_in, k_cap(c_in, c_out), gpu), num_warps=8),
        "delta_dgrad": dict(BLOCK_M=row, BLOCK_N=block(c_in, 64, 16), **k_tiling(c_out, k_cap(c_out, c_in), gpu),
                            num_warps=8),
        "elementwise": dict(BLOCK_M=64 if gpu else 128, BLOCK_N=block(c_out, 32, 16), num_warps=8),
        "frames": dict(BLOCK_M=64 if gpu else 128, BLOCK_N=block(c_in, 32, 16), num_warps=4),  # stack / fold
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


def _frames(t5: torch.Tensor) -> torch.Tensor:
    """``[n, c, t, h, w] -> [n*t, c, h, w]``: the frames as a batch (a view when ``t5`` is channels-last-3d)."""
    n, c, t, h, w = t5.shape
    return t5.permute(0, 2, 3, 4, 1).reshape(n * t, h, w, c).permute(0, 3, 1, 2)


def _clips(frames: torch.Tensor, n: int) -> torch.Tensor:
    """``[n*t, c, h, w] -> [n, c, t, h, w]``, the inverse of ``_frames`` (a view when ``frames`` is channels-last)."""
    nt, c, h, w = frames.shape
    return frames.permute(0, 2, 3, 1).reshape(n, nt // n, h, w, c).permute(0, 4, 1, 2, 3)


def _stacked_frames(x: torch.Tensor, config: dict) -> torch.Tensor:
    """``[n*t, 3c, h, w]``, channels-last: frame ``t`` holds ``x[t-1], x[t], x[t+1]`` along channels
    (zeros beyond the clip), the input of a same-padded 3x3x3 convolution as a 2-D one; written in
    one pass by ``stack_frames_kernel``."""
    n, c, t, h, w = x.shape
    stacked = _alloc.empty(n, t, h, w, 3 * c, dtype=x.dtype, device=x.device)
    clips = stacked.permute(0, 4, 1, 2, 3)  # [n, 3c, t, h, w]
    _check_sample_extent(stacked=clips)
    _kernels().stack_frames_kernel[(_cdiv(t * h * w, config["BLOCK_M"]), _cdiv(c, config["BLOCK_N"]), n)](
        x, clips, t, h, w, c, *x.stride(), *clips.stride(), **config
    )
    return stacked.view(n * t, h, w, 3 * c).permute(0, 3, 1, 2)


def _stacked_channels(design: str, c_in: int) -> int:
    """Channels of the stacked frames (hybrid2d: ``3*c_in``; the other designs have none)."""
    return 3 * c_in if design == "hybrid2d" else 0


def _frame_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[c_dst, c_src, 3, 3, 3] -> [c_dst, 3*c_src, 3, 3]`` (input channel ``k*c_src + c`` is frame
    tap ``k``), channels-last: cuDNN then runs NHWC kernels, the dgrad's included."""
    c_dst, c_src = weight.shape[:2]
    return weight.permute(0, 2, 1, 3, 4).reshape(c_dst, 3 * c_src, 3, 3).contiguous(memory_format=torch.channels_last)


def _frame_stacked_conv(x: torch.Tensor, frame_weight: torch.Tensor, config: dict) -> torch.Tensor:
    """The "hybrid2d" forward: ``F.conv3d(x, weight, padding=1)`` as one 2-D convolution of the
    stacked frames (``_stacked_frames``, a temporary three times x's size) with ``_frame_weight``;
    equal up to summation order (one fp32 accumulation, one rounding, as the 3-D one)."""
    return _clips(F.conv2d(_stacked_frames(x, config), frame_weight, padding=1), x.shape[0])


def _frame_stacked_conv_backward(grad: torch.Tensor, x: torch.Tensor, frame_weight: torch.Tensor,
                                 dx: torch.Tensor, config: dict) -> torch.Tensor:
    """The "hybrid2d" backward of ``_frame_stacked_conv``: writes dX into ``dx`` and returns dW
    ``[c_dst, c_src, 3, 3, 3]`` (fp32). The wgrad first, with the stacked frames rebuilt and freed
    after it; then the dgrad of the stacked frames (three times x's size), folded back into dX by
    ``fold_frames_kernel`` (the three taps summed in fp32, rounded once)."""
    n, c_in, t, h, w = x.shape
    grad2d = _frames(grad)
    stacked = _stacked_frames(x, config)
    dw2d = torch.ops.aten.convolution_backward(
        grad2d, stacked, frame_weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    shape = stacked.shape
    del stacked
    # dgrad alone: the input only gives its shape (a stride-0 view); the channels-last weight keeps cuDNN in NHWC
    dstacked = torch.ops.aten.convolution_backward(
        grad2d, grad2d.new_empty(1).expand(shape), frame_weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, False, False],
    )[0]
    ds = _clips(dstacked, n)  # [n, 3c, t, h, w]
    _check_sample_extent(ds=ds)
    _kernels().fold_frames_kernel[(_cdiv(t * h * w, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]), n)](
        ds, dx, t, h, w, c_in, *ds.stride(), *dx.stride(), **config
    )
    del dstacked, ds
    return dw2d.float().reshape(dw2d.shape[0], 3, c_in, 3, 3).permute(0, 2, 1, 3, 4)


def gate_bytes(c_out: int, c_pre: int) -> int:
    """Channels of the packed gates: 2 bits per channel of ``[G; F]``, four channels a byte, per branch."""
    return (c_pre // c_out) * _cdiv(c_out, 4)


def _forward_outputs(x, c_out, c_pre, fuse_concat):
    """``y [n, c_out, t, h or 2h, w]`` and the packed gates ``[n, gate_bytes, t, h, w]`` (uint8;
    ``_store_gates`` in the kernels), in x's format."""
    n, _, t, h, w = x.shape
    y = _empty_activation(n, c_out, t, 2 * h if fuse_concat else h, w, like=x)
    return y, _empty_activation(n, gate_bytes(c_out, c_pre), t, h, w, like=x, dtype=torch.uint8)


def _wgrad(x, grad, grad_strides, c_grad, slots, cuts, config):
    """fp32 ``[c_grad, c_in, 3, 3, 3]``: ``sum grad[p, o] * x[p + tap, c]`` over ``(n, slot, t, w)``.

    ``grad_strides``: ``(n, c, t, slot, w)`` strides of ``grad``. With ``cuts`` (a :class:`Cuts`)
    the slots are cut slots and X is read on the across rows only (the delta term).
    """
    n, c_in, t, h, w = x.shape
    k_config = k_tiling(c_in, 64, gpu_choices(x.device), taps=27, interpreter_cap=128)
    tiles = _cdiv(c_grad, config["BLOCK_O"]) * _cdiv(27 * c_in, k_config["BLOCK_K"])
    reductions = n * slots * _cdiv(t * w, config["BLOCK_M"])  # position tiles, each within one (n, slot) row
    if gpu_choices(x.device):  # split the reduction until the GPU is busy; partial sums keep it deterministic
        wanted = _cdiv(4 * sm_count(x.device), tiles)
    else:  # the interpreter: two splits keep the partial-sum path exercised
        wanted = 2
    splits = max(1, min(reductions, wanted, 64))
    per_split = _cdiv(reductions, splits)
    splits = _cdiv(reductions, per_split)
    partial = _alloc.empty(splits, c_grad, 27 * c_in, dtype=torch.float32, device=x.device)
    band = cuts.band_pointer(partial) if cuts is not None else partial
    _kernels().conv3x3x3_wgrad_kernel[(tiles, splits)](
        x, grad, band, partial, reductions, per_split, slots, t, h, w, c_in, c_grad,
        *x.stride(), *grad_strides, cuts.size if cuts is not None else 0, CUT_EDGES=cuts is not None,
        GEOM=cuts.geom_id if cuts is not None else 0, **k_config, **config,
    )  # fmt: skip
    return partial.sum(0).view(c_grad, 3, 3, 3, c_in).permute(0, 4, 1, 2, 3)


def _interleaved(weight_global: Optional[torch.Tensor], weight_local: torch.Tensor) -> torch.Tensor:
    """The GEMM forward's stacked weight: output channel ``2*o + b`` is branch ``b`` (0 global, 1 local)
    of channel ``o``, so one dot over contiguous pack columns yields both branches of a channel block."""
    if weight_global is None:
        return weight_local
    return torch.stack([weight_global, weight_local], dim=1).flatten(0, 1)


def cut_conv3d_triton(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weight_local: torch.Tensor,
    cuts: Cuts,
    fuse: str = "add",
    terms: str = "pair",
    negative_slope: float = 0.01,
    design: str = DEFAULT_DESIGN,
    op: str = OP,
) -> torch.Tensor:
    """The fused op; under autocast, x and the weights are cast first (custom ops are not
    auto-cast), like autocast does for ``F.conv3d``. ``op`` names the caller in errors.
    ``design``: ``"auto"`` (resolved per shape inside the op, forward and backward apart; see
    the module docstring), ``"hybrid"``, ``"hybrid2d"`` or ``"gemm"``."""
    if design not in DESIGN_CHOICES:
        raise ValueError(f"{op}: design must be one of {DESIGN_CHOICES}, got {design!r}")
    dtype = compute_dtype(x)
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: impl='triton' computes in float32, float16 or bfloat16, got {dtype}; use impl='torch'")
    x, weight_local = x.to(dtype), weight_local.to(dtype)
    weight_global = None if weight_global is None else weight_global.to(dtype)
    y, _ = torch.ops.fastgait.cut_conv3d(
        x, weight_global, weight_local, cuts.band_start, cuts.geometry, int(cuts.size), fuse, terms,
        float(negative_slope), design,
    )  # fmt: skip
    return y


def _slot_rows(x, slots, c, dtype=None):
    """A per-sample cut-slot buffer ``[n, slots, t, w, c]``; kernels touch its live slots only."""
    n, _, t, _, w = x.shape
    return _alloc.empty(n, max(slots, 1), t, w, c, dtype=dtype or x.dtype, device=x.device)


# Samples per chunk (memory). The launchers run the batch in chunks of samples so that their big
# temporaries exist for one chunk at a time: the hybrid forward's vendor output ``pre``
# ``[n, c_pre, t, h, w]`` and the P rows; the backward's ``gpre`` ``[n, c_pre, t, h, w]``, the
# vendor's dgrad of it (hybrid), the ``delta`` slots and the wgrad partial sums. The outputs
# (``y``, the gates, ``dx``) are whole-batch tensors and each chunk writes its slice: every kernel
# takes per-sample base pointers and strides, so a chunk is just views ``x[a:b]``, ``y[a:b]``,
# ``gates[a:b]``, ``band_start[a:b]``, ``dx[a:b]``. The weight gradient is summed over the chunks
# in fp32, in chunk order (deterministic).
# Rule (``chunk_samples``): the most samples whose biggest temporary (``pre`` or ``gpre``, else the
# fp32 P rows) fits in ``CHUNK_BYTES``, at least ``MIN_CHUNK_SAMPLES`` (the GEMMs stay large),
# then spread evenly over as few chunks as that takes; one chunk when the batch fits.
# Why: the fused MLA block's fwd+bwd peak target is <= 0.5x the eager reference's
# (docs/memory_notes.md). At the CASIA-B shapes (n = 128, bf16) gpre is 880 / 440 / 440 MiB for
# MLA-A 32->64 / MLA-A 64->128 / MLA-B; this rule makes 8 / 4 / 4 chunks of 16 / 32 / 32 samples.
# Memory model (bench/memory_model.py; not measured), fwd+bwd peak vs the reference, with the
# gates packed (2 bits a channel): 0.30 / 0.35 / 0.45x (hybrid), 0.29 / 0.34 / 0.43x (gemm); in
# one chunk 0.65 / 0.67 / 0.69x with byte gates. 64 MiB (more, smaller chunks: more launches)
# would gain little more; the backward stays the peak.
CHUNK_BYTES = 128 << 20
MIN_CHUNK_SAMPLES = 16
# FASTGAIT_CHUNK_MIB overrides CHUNK_BYTES (in MiB; 0: no chunks, the whole batch at once), read
# at each call: the MLA bench's `triton-unchunked` provider sets it to 0 beside `triton-auto`, so
# one run measures what the chunks cost in time and save in memory.
CHUNK_ENV = "FASTGAIT_CHUNK_MIB"


def _chunk_bytes() -> Optional[int]:
    """The chunk budget in bytes (None: no chunks)."""
    text = os.environ.get(CHUNK_ENV)
    if text is None or text.strip() == "":
        return CHUNK_BYTES
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"{CHUNK_ENV}={text!r}: must be a number of MiB (0: no chunks)") from None
    if mib < 0:
        raise ValueError(f"{CHUNK_ENV}={text!r}: must be a number of MiB >= 0 (0: no chunks)")
    return None if mib == 0 else int(mib * 2**20)


def chunk_samples(n: int, per_sample_bytes: int) -> int:
    """Samples per chunk for a batch of ``n`` whose biggest temporary takes ``per_sample_bytes`` per
    sample (see ``CHUNK_BYTES``): ``n`` (one chunk) when it fits, else the even split of ``n`` over
    the fewest chunks of at most ``max(MIN_CHUNK_SAMPLES, CHUNK_BYTES // per_sample_bytes)``."""
    budget = _chunk_bytes()
    if budget is None:
        return max(n, 1)
    fit = max(1, MIN_CHUNK_SAMPLES, budget // max(1, per_sample_bytes))
    if fit >= n:
        return max(n, 1)
    return _cdiv(n, _cdiv(n, fit))


def sample_chunks(n: int, per_sample_bytes: int) -> list[slice]:
    """The batch ``[0, n)`` as consecutive slices of ``chunk_samples(n, per_sample_bytes)`` samples
    (the last one shorter when they do not divide ``n``)."""
    step = chunk_samples(n, per_sample_bytes)
    return [slice(start, min(n, start + step)) for start in range(0, n, step)] or [slice(0, n)]


def _forward(x, weight_global, weight_local, cuts, fuse, terms, negative_slope, design):
    """``(y, gates)``: the block's output and the one-byte gates its backward needs.

    In chunks of samples (``sample_chunks``): per chunk the P rows (fp32, cut slots) and, in the
    hybrid design, the vendor's ``[G; F]`` output ``pre`` (the biggest temporary: ``2*c_out``
    channels at full size), then the epilogue writes the chunk's slices of ``y`` and the gates.
    The GEMM design has no ``pre``; its P rows are small, so it runs as one chunk at CASIA-B sizes.
    """
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_out = weight_local.shape[0]
    has_global = weight_global is not None
    has_cuts = cuts.any(h)
    slots = cuts.slots(h)
    fuse_concat = has_global and fuse == "concat"
    weight = _stacked(weight_global, weight_local)
    c_pre = weight.shape[0]
    configs = launch_configs(x.device, c_in, c_out, c_pre, t * w, x.stride(1) == 1, x.element_size())
    y, gates = _forward_outputs(x, c_out, c_pre, fuse_concat)
    _check_sample_extent(x=x, y=y)
    flags = dict(GEOM=cuts.geom_id, TERMS=TERMS.index(terms), HAS_GLOBAL=has_global, HAS_CUTS=has_cuts,
                 FUSE_CONCAT=fuse_concat)
    plane = t * h * w  # positions per sample
    p_pack = _forward_pack(weight_local) if has_cuts else None
    gemm_pack = _forward_pack(_interleaved(weight_global, weight_local)) if design == "gemm" else None
    p_bytes = slots * t * w * c_out * 4 if has_cuts else 0
    # the biggest temporary: the vendor's [G; F] (hybrid), or the stacked frames (hybrid2d)
    pre_channels = 0 if design == "gemm" else max(c_pre, _stacked_channels(design, c_in))
    pre_bytes = pre_channels * plane * x.element_size()
    frame_weight = _frame_weight(weight) if design == "hybrid2d" else None
    for rows in sample_chunks(n, max(pre_bytes, p_bytes)):
        xs, ys, gs, cs = x[rows], y[rows], gates[rows], cuts.chunk(rows)
        m = xs.shape[0]
        band = cs.band_pointer(gs) if has_cuts else gs  # a placeholder pointer where unused
        p_rows = _slot_rows(xs, slots, c_out, torch.float32) if has_cuts else gs  # (a placeholder without cuts)
        if has_cuts:  # P on the cut rows, straight from X (both designs)
            config = configs["p0"]
            grid = (m * slots, _cdiv(t * w, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]))
            kernels.cut_rows_p_kernel[grid](
                xs, p_pack, band, p_rows, slots, t, h, w, c_in, c_out,
                *xs.stride(), *p_rows.stride(), cuts.size, GEOM=cuts.geom_id, **config,
            )  # fmt: skip
        if design == "gemm":
            config = configs["gemm"]
            grid = (_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), m)
            kernels.cut_conv_forward_gemm_kernel[grid](
                xs, gemm_pack, band, p_rows, ys, gs, t, h, w, c_in, c_out,
                *xs.stride(), *p_rows.stride(), *ys.stride(), *gs.stride(), cuts.size, negative_slope, **flags,
                **config,
            )  # fmt: skip
        else:
            # [G; F] by the vendor, a temporary of this chunk
            pre = (F.conv3d(xs, weight, padding=1) if design == "hybrid"
                   else _frame_stacked_conv(xs, frame_weight, configs["frames"]))
            _check_sample_extent(pre=pre)
            config = configs["elementwise"]
            kernels.cut_conv_epilogue_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), m)](
                pre, p_rows, band, ys, gs, t, h, w, c_out,
                *pre.stride(), *p_rows.stride(), *ys.stride(), *gs.stride(), cuts.size, negative_slope,
                **flags, **config,
            )  # fmt: skip
            del pre
        del p_rows
    return y, gates


def _backward(grad_y, x, weight_global, weight_local, cuts, gates, fuse, terms, negative_slope, design):
    """``(dx, d[W_g; W_l])`` from the saved gates.

    In chunks of samples (``sample_chunks``, sized by ``gpre``, the biggest temporary): per chunk
    ``gpre`` ``[m, c_pre, t, h, w]`` and ``delta`` (the cut slots' dY/dP), the dgrad into the
    chunk's slice of ``dx`` (hybrid: the vendor's chunk-sized dX, copied into place when there is
    more than one chunk; hybrid2d: folded into place from the stacked frames' dgrad), the wgrad,
    and the delta terms; ``gpre`` is freed before the delta terms.
    dW: an fp32 sum over the chunks, in chunk order.
    """
    kernels = _kernels()
    n, c_in, t, h, w = x.shape
    c_out = weight_local.shape[0]
    has_global = weight_global is not None
    has_cuts = cuts.any(h)
    slots = cuts.slots(h)
    weight = _stacked(weight_global, weight_local)
    c_pre = weight.shape[0]
    configs = launch_configs(x.device, c_in, c_out, c_pre, t * w, x.stride(1) == 1, x.element_size())
    plane = t * h * w  # positions per sample
    _check_sample_extent(grad_y=grad_y)
    # by the biggest temporary's bytes per sample: gpre, or (hybrid2d) the stacked frames' gradient
    chunks = sample_chunks(n, max(c_pre, _stacked_channels(design, c_in)) * plane * x.element_size())
    dgrad_pack = _dgrad_pack(weight) if design == "gemm" else None
    delta_pack = _dgrad_pack(weight_local) if has_cuts else None
    frame_weight = _frame_weight(weight) if design == "hybrid2d" else None
    dx = _empty_activation(n, c_in, t, h, w, like=x) if design != "hybrid" or len(chunks) > 1 else None
    dweight = None
    for rows in chunks:
        xs, gys, gs, cs = x[rows], grad_y[rows], gates[rows], cuts.chunk(rows)
        m = xs.shape[0]
        band = cs.band_pointer(gs) if has_cuts else gs

        # gpre = [g_G a'(G); g_L a'(F')], and delta = dY/dP on the cut slots.
        gpre = _empty_activation(m, c_pre, t, h, w, like=x)
        delta = _slot_rows(xs, slots, c_out) if has_cuts else gs
        config = configs["elementwise"]
        kernels.cut_conv_gated_grad_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_out, config["BLOCK_N"]), m)](
            gys, gs, band, gpre, delta, t, h, w, c_out,
            *gys.stride(), *gs.stride(), *gpre.stride(), *delta.stride(), cuts.size, negative_slope,
            GEOM=cuts.geom_id, TERMS=TERMS.index(terms), HAS_GLOBAL=has_global, HAS_CUTS=has_cuts,
            FUSE_CONCAT=has_global and fuse == "concat", **config,
        )  # fmt: skip

        if design == "gemm":
            dxs = dx[rows]
            config = configs["dgrad"]
            kernels.conv3x3x3_kernel[(_cdiv(plane, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]), m)](
                gpre, dgrad_pack, dxs, t, h, w, c_pre, c_in, *gpre.stride(), *dxs.stride(), **config
            )
            dws = _wgrad(xs, gpre, gpre.stride(), c_pre, h, None, configs["wgrad"])
        elif design == "hybrid2d":
            dxs = dx[rows]
            dws = _frame_stacked_conv_backward(gpre, xs, frame_weight, dxs, configs["frames"])
        else:
            dxs, dws, _ = torch.ops.aten.convolution_backward(
                gpre, xs, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False]
            )
            if dx is None:  # one chunk: the vendor's dX is the output
                dx = dxs = _in_format_of(dxs, like=x)
            else:
                dx[rows].copy_(dxs)
                dxs = dx[rows]
            dws = dws.float()
        del gpre
        if dweight is None:
            dweight = dws
        else:
            dweight += dws
        del dws

        if has_cuts:  # the delta terms: W_l^T conv delta into dx's across rows, X[across] conv delta into dW_l
            d = delta.stride()  # [m, S, t, w, c]
            config = configs["delta_dgrad"]
            grid = (m * slots, _cdiv(t * w, config["BLOCK_M"]), _cdiv(c_in, config["BLOCK_N"]))
            kernels.cut_conv_delta_dgrad_kernel[grid](
                delta, delta_pack, band, dxs, slots, t, h, w, c_out, c_in, *d, *dxs.stride(), cuts.size,
                GEOM=cuts.geom_id, **config,
            )  # fmt: skip
            delta_strides = (d[0], d[4], d[2], d[1], d[3])  # as (n, c, t, slot, w)
            config = dict(configs["wgrad"], BLOCK_O=_block(c_out, 16, 64))
            dweight[c_pre - c_out :] += _wgrad(xs, delta, delta_strides, c_out, slots, cs, config)
        del delta, dxs
    return dx, dweight.to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------------------
# design="auto": the faster design per shape, forward and backward apart
# ----------------------------------------------------------------------------------------


def _sources_digest() -> str:
    """The engine's and its kernels' sources: a persisted choice is only reused for the same code."""
    import fastgait.kernels

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(fastgait.kernels.__file__).resolve().parent / "conv_engine.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CHOOSER = _autotune.Chooser(OP, DESIGNS, FALLBACK_DESIGN, env_var=DESIGN_ENV, store=OP,
                            context=functools.lru_cache(maxsize=None)(_sources_digest))


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _layout(x: torch.Tensor) -> str:
    if _is_channels_last(x):
        return "channels_last_3d"
    return "contiguous" if x.is_contiguous() else "strided"


def design_key(direction: str, x, weight_global, weight_local, cuts: Cuts, fuse: str, terms: str) -> tuple:
    """What decides which design is faster: the chooser's key."""
    return (OP, direction, tuple(x.shape), str(x.dtype).removeprefix("torch."), _layout(x), int(weight_local.shape[0]),
            weight_global is not None, fuse, terms, cuts.geometry, int(cuts.size), cuts.any(x.shape[3]),
            _device_name(x.device))


KEY_FIELDS = ("op", "direction", "x_shape", "dtype", "layout", "c_out", "has_global", "fuse", "terms", "geometry",
              "size", "cut", "device")


def resolve_design(design: str, direction: str, run, x, weight_global, weight_local, cuts, fuse, terms) -> str:
    """``design``, or for ``"auto"`` the chooser's pick for this shape (``run(design)`` times one)."""
    if design != "auto":
        if design not in DESIGNS:
            raise ValueError(f"{OP}: design must be one of {DESIGN_CHOICES}, got {design!r}")
        return design
    key = design_key(direction, x, weight_global, weight_local, cuts, fuse, terms)
    return CHOOSER.choose(key, run, x.device)


def design_choices(used: Optional[dict] = None) -> list[dict]:
    """The choices as rows (``KEY_FIELDS`` + ``choice``, ``timings_ms``, ``how``): those in ``used``
    (from ``fastgait.ops._autotune.usage()``), else every choice made in this process."""
    choices = (used if used is not None else CHOOSER.choices()).values()
    return [dict(zip(KEY_FIELDS, c.key), x_shape=list(c.key[2]), choice=c.choice, timings_ms=c.timings_ms, how=c.how)
            for c in choices if c.key[0] == OP]


_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight_global, Tensor weight_local, Tensor? band_start, str geometry, int size, str fuse, "
    "str terms, float negative_slope, str design) -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? weight_global, Tensor weight_local, Tensor? band_start, Tensor gates, "
    "str geometry, int size, str fuse, str terms, float negative_slope, str design) -> (Tensor, Tensor)"
)


@torch.library.custom_op("fastgait::cut_conv3d", mutates_args=(), schema=_FORWARD_SCHEMA)
def _cut_conv3d_op(x, weight_global, weight_local, band_start, geometry, size, fuse, terms, negative_slope, design):
    """The fused forward: ``(y, gates)``; the uint8 gates are what the backward needs."""
    with nvtx_range("cut_conv3d.forward"):
        cuts = Cuts(geometry, size, band_start)

        def run(candidate):
            return _forward(x, weight_global, weight_local, cuts, fuse, terms, negative_slope, candidate)

        return run(resolve_design(design, "fwd", run, x, weight_global, weight_local, cuts, fuse, terms))


@_cut_conv3d_op.register_fake
def _(x, weight_global, weight_local, band_start, geometry, size, fuse, terms, negative_slope, design):
    c_out = weight_local.shape[0]
    c_pre = c_out if weight_global is None else 2 * c_out
    return _forward_outputs(x, c_out, c_pre, weight_global is not None and fuse == "concat")


@torch.library.custom_op("fastgait::cut_conv3d_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _cut_conv3d_backward_op(
    grad_y, x, weight_global, weight_local, band_start, gates, geometry, size, fuse, terms, negative_slope, design
):
    """The fused backward: ``(dx, d[W_g; W_l])`` (the stacked weight gradient)."""
    with nvtx_range("cut_conv3d.backward"):
        cuts = Cuts(geometry, size, band_start)

        def run(candidate):
            return _backward(
                grad_y, x, weight_global, weight_local, cuts, gates, fuse, terms, negative_slope, candidate
            )

        return run(resolve_design(design, "bwd", run, x, weight_global, weight_local, cuts, fuse, terms))


@_cut_conv3d_backward_op.register_fake
def _(grad_y, x, weight_global, weight_local, band_start, gates, geometry, size, fuse, terms, negative_slope, design):
    n, c_in, t, h, w = x.shape
    c_pre = weight_local.shape[0] * (1 if weight_global is None else 2)
    return _empty_activation(n, c_in, t, h, w, like=x), weight_local.new_empty(c_pre, c_in, 3, 3, 3)


def _setup_context(ctx, inputs, output):
    x, weight_global, weight_local, band_start, *config = inputs
    _, gates = output
    ctx.save_for_backward(x, weight_global, weight_local, band_start, gates)
    ctx.config = tuple(config)
    ctx.mark_non_differentiable(gates)
    # No zero gradient for the gates (a uint8 tensor, a quarter the size of [G; F]) at the peak of the backward.
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_y, _grad_gates):
    if grad_y is None:
        return (None,) * 10
    x, weight_global, weight_local, band_start, gates = ctx.saved_tensors
    dx, dweight = torch.ops.fastgait.cut_conv3d_backward(
        grad_y, x, weight_global, weight_local, band_start, gates, *ctx.config
    )
    c_out = weight_local.shape[0]
    dweight_global = None if weight_global is None else dweight[:c_out]
    return (dx, dweight_global, dweight[-c_out:]) + (None,) * 7


_cut_conv3d_op.register_autograd(_autograd_backward, setup_context=_setup_context)
