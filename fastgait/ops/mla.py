"""``mla_conv3d``: the MLA block's convolutions with complementary band masks (fused_ops.md §1).

With a 3-row kernel, ``c3(X*M0) + c3(X*M1)`` equals ``lrelu(W*X)`` on every output row except
the <= 4 *boundary rows* per sample whose receptive rows straddle a band edge. So the pair
costs one convolution plus a correction on those rows, and the global branch rides in the
same convolution with stacked weights ``[W_g; W_l]``.

Implementations:
- ``"reference"``: three convolutions on materialised masked copies (the spec).
- ``"torch"``: the row-cut engine in plain PyTorch (the CPU path).
- ``"triton"``: the fused row-cut engine (``fastgait.ops.conv_engine``, ``kernels/conv_engine.py``),
  registered with ``torch.library`` as ``fastgait::cut_conv3d`` with its backward. Three designs,
  ``"hybrid"``, ``"hybrid2d"`` and ``"gemm"``; the default ``"auto"`` runs the fastest per shape on the GPU
  (forward and backward chosen apart, by timing; ``FASTGAIT_CONV_DESIGN`` overrides it), and
  :func:`mla_conv3d_triton`'s ``design`` picks one; see ``docs/mla_notes.md``.

The block is the engine with ``geometry="band"`` (per-sample band starts) and ``terms="pair"``.
"""
from __future__ import annotations

import numbers
from contextlib import nullcontext
from typing import Optional

import torch

from .._nvtx import nvtx_range
from ._checks import check_same_dtype, check_tensor
from ._dispatch import host_readable, resolve_impl
from .conv_engine import (  # noqa: F401 - DESIGN_CHOICES, DESIGNS, FALLBACK_DESIGN: re-exported
    DEFAULT_DESIGN, DESIGN_CHOICES, DESIGNS, FALLBACK_DESIGN, FUSES, Cuts, compute_dtype, cut_conv3d_torch,
    cut_conv3d_triton, cut_rows,
)
from .reference import mla_conv3d_reference

OP = "mla_conv3d"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# DEFAULT_DESIGN ("auto"), DESIGNS (the designs), DESIGN_CHOICES (what ``design`` accepts) and
# FALLBACK_DESIGN (what "auto" runs where it cannot time): the engine's (fastgait.ops.conv_engine).
# The compile gate sets this module's DEFAULT_DESIGN to capture each design's launches.


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
            runs the default design (``DEFAULT_DESIGN``, ``"auto"``: the faster one per shape).

    Under autocast the op behaves like autocast's convolutions: ``x`` and the weights are cast
    to the autocast dtype and the output has that dtype.
    """
    _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse)
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=True)
    if path == "triton" and impl == "auto" and compute_dtype(x) not in TRITON_DTYPES:
        path = "torch"  # float64 on CUDA: the kernels compute in fp32 at most
    if path == "triton":
        return _mla_conv3d_triton(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope)
    with nullcontext() if torch.compiler.is_compiling() else nvtx_range(OP):
        if path == "reference":
            return mla_conv3d_reference(
                x, weight_global, weight_local, band_start, band_height, fuse, negative_slope
            )
        cuts = Cuts("band", band_height, band_start)
        return cut_conv3d_torch(x, weight_global, weight_local, cuts, fuse, "pair", negative_slope)


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
    - ``"auto"`` (default): per shape, the fastest of the three below on this GPU, the forward and
      the backward chosen apart (each timed once per process on its first call; logged by
      ``fastgait.ops._autotune``); ``FALLBACK_DESIGN`` off CUDA and during CUDA-graph capture.
      ``FASTGAIT_CONV_DESIGN=hybrid|hybrid2d|gemm`` forces one.
    - ``"hybrid"``: the vendor convolution computes ``[G, F]`` with stacked weights; a Triton
      kernel computes ``P0`` on the boundary rows straight from X and applies the epilogue.
      Backward: vendor dgrad/wgrad on the gated gradient, Triton kernels for the delta terms.
    - ``"hybrid2d"``: the hybrid with the vendor's 3x3x3 convolution, its dgrad and its wgrad
      done as 2-D ones over frame-stacked channels (``[n*t, 3*c_in, h, w]``: cuDNN's NHWC 2-D
      kernels; Triton kernels stack X per chunk and fold the stacked dgrad back into dX in
      fp32).
    - ``"gemm"``: a Triton implicit-GEMM convolution reads each X tile once for ``G``, ``F``
      and ``P0`` and applies the epilogue; backward dgrad and wgrad are Triton kernels too.
    """
    _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse)
    resolve_impl("triton", x.device, op=OP, has_torch=True, has_triton=True)
    return _mla_conv3d_triton(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design)


def _mla_conv3d_triton(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope, design=None):
    cuts = Cuts("band", int(band_height), band_start)
    return cut_conv3d_triton(
        x, weight_global, weight_local, cuts, fuse, "pair", negative_slope, design or DEFAULT_DESIGN, op=OP
    )


def boundary_rows(band_start: torch.Tensor, band_rows: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output rows whose 3-row receptive field straddles a band edge: ``(rows [n, 4], live [n, 4])``
    (candidates ``start-1, start, end-1, end`` clamped into the map, and which are real, distinct ones)."""
    return cut_rows(Cuts("band", band_rows, band_start), band_start.shape[0], height, band_start.device)


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
    if host_readable(band_start):
        if not bool(inside.all()):
            raise ValueError(
                f"{OP}: every band must lie inside the map: need 0 <= band_start <= h - band_height = "
                f"{height - band_height}, got band_start={band_start.tolist()}"
            )
    else:  # no host sync on the GPU: the check fails asynchronously
        torch._assert_async(inside.all(), f"{OP}: band_start outside [0, h - band_height]")


