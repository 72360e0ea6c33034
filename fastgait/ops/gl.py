"""``gl_conv3d``: GaitGL's GL block (blocks.md §4) on the row-cut engine.

The local conv runs on each of ``2**halving`` horizontal strips with zero padding at every
strip border. Cutting the rows at the strip borders is the engine's ``geometry="strips"``: one
convolution with the stacked weights ``[W_g; W_l]`` (``2*c_out`` output channels) gives ``G``
and ``F = W_l * X``; on the rows either side of a border the local branch is ``lrelu(F - P)``,
``P`` the kernel row that reads across the border (``terms="rest"``); elsewhere ``lrelu(F)``.

Implementations: ``"reference"`` (OpenGait's split-and-concatenate, the spec),
``"torch"`` (the engine in plain PyTorch, the CPU path), ``"triton"`` (the fused engine,
``fastgait::cut_conv3d``; ``design`` in :func:`gl_conv3d_triton`: ``"auto"``, the default, times
the engine's designs per shape on the GPU, see ``fastgait.ops.conv_engine``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .._nvtx import nvtx_range
from ._checks import check_same_dtype, check_tensor
from ._dispatch import resolve_impl
from .conv_engine import DEFAULT_DESIGN, TRITON_DTYPES, Cuts, compute_dtype, cut_conv3d_torch, cut_conv3d_triton
from .reference import gl_conv3d_reference, gl_strip_rows

OP = "gl_conv3d"


def gl_conv3d(
    x: torch.Tensor,
    weight_global: torch.Tensor,
    weight_local: torch.Tensor,
    halving: int,
    fm_sign: bool = False,
    negative_slope: float = 0.01,
    impl: str = "auto",
) -> torch.Tensor:
    """The GL block.

    Args:
        x: ``[n, c_in, t, h, w]`` float tensor (any memory format).
        weight_global, weight_local: ``[c_out, c_in, 3, 3, 3]`` (bias-free, stride 1, padding 1).
        halving: the local conv runs on ``2**halving`` strips of ``h // 2**halving`` rows (the last
            one shorter when that does not divide ``h``, as OpenGait's ``torch.split``).
        fm_sign: False: ``lrelu(G) + lrelu(L)`` (``[n, c_out, t, h, w]``); True:
            ``lrelu(concat_H(G, L))`` (``[n, c_out, t, 2h, w]``).
        impl: ``"auto" | "reference" | "torch" | "triton"``.
    """
    _check_inputs(x, weight_global, weight_local, halving, fm_sign)
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=True)
    if path == "triton" and impl == "auto" and compute_dtype(x) not in TRITON_DTYPES:
        path = "torch"
    fuse = "concat" if fm_sign else "add"
    cuts = Cuts("strips", gl_strip_rows(x.shape[3], halving))
    if path == "triton":
        return cut_conv3d_triton(x, weight_global, weight_local, cuts, fuse, "rest", negative_slope, DEFAULT_DESIGN, op=OP)
    with nullcontext() if torch.compiler.is_compiling() else nvtx_range(OP):
        if path == "reference":
            return gl_conv3d_reference(x, weight_global, weight_local, halving, fm_sign, negative_slope)
        return cut_conv3d_torch(x, weight_global, weight_local, cuts, fuse, "rest", negative_slope)


def gl_conv3d_triton(x, weight_global, weight_local, halving, fm_sign=False, negative_slope=0.01,
                     design: str = DEFAULT_DESIGN) -> torch.Tensor:
    """:func:`gl_conv3d` with ``impl="triton"`` and a choice of the engine's design (``"auto"``, the
    default: the fastest per shape; ``"hybrid"``, ``"hybrid2d"`` or ``"gemm"``)."""
    _check_inputs(x, weight_global, weight_local, halving, fm_sign)
    resolve_impl("triton", x.device, op=OP, has_torch=True, has_triton=True)
    cuts = Cuts("strips", gl_strip_rows(x.shape[3], halving))
    return cut_conv3d_triton(x, weight_global, weight_local, cuts, "concat" if fm_sign else "add", "rest",
                             negative_slope, design, op=OP)


def _check_inputs(x, weight_global, weight_local, halving, fm_sign) -> None:
    check_tensor(x, "x", op=OP, ndim=(5,))
    c_in = x.shape[1]
    for name, weight in (("weight_global", weight_global), ("weight_local", weight_local)):
        check_tensor(weight, name, op=OP, ndim=(5,), device=x.device)
        if tuple(weight.shape[1:]) != (c_in, 3, 3, 3):
            raise ValueError(
                f"{OP}: {name} must be [c_out, c_in={c_in}, 3, 3, 3] for x of shape {tuple(x.shape)}, "
                f"got {tuple(weight.shape)}"
            )
    if weight_global.shape != weight_local.shape:
        raise ValueError(
            f"{OP}: weight_global {tuple(weight_global.shape)} and weight_local {tuple(weight_local.shape)} "
            "must have the same shape"
        )
    if not torch.is_autocast_enabled(x.device.type):
        check_same_dtype(OP, x=x, weight_global=weight_global, weight_local=weight_local)
    if isinstance(halving, bool) or not isinstance(halving, int) or halving < 0:
        raise ValueError(f"{OP}: halving must be an int >= 0 (2**halving strips), got {halving!r}")
    if not isinstance(fm_sign, bool):
        raise TypeError(f"{OP}: fm_sign must be a bool, got {fm_sign!r}")
    gl_strip_rows(x.shape[3], halving)  # raises when the rows cannot be cut
