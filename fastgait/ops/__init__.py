"""Fused ops, each with a plain PyTorch reference (``fastgait.ops.reference``).

Every op takes ``impl=``: ``"reference"`` (the spec), ``"torch"`` (an optimised PyTorch path
where one exists), ``"triton"`` (fused Triton kernels) or ``"auto"`` (default: Triton on CUDA,
the best PyTorch path elsewhere).
"""
from ._dispatch import IMPLS, resolve_impl
from .gem import gem_hpp
from .gl import gl_conv3d
from .masks import band_height, band_masks, draw_band_starts
from .mla import mla_conv3d
from .reverse_mask import draw_mask, rmb_conv3d
from .triplet import part_distance, triplet_loss

__all__ = [
    "IMPLS",
    "resolve_impl",
    "band_height",
    "band_masks",
    "draw_band_starts",
    "mla_conv3d",
    "gl_conv3d",
    "rmb_conv3d",
    "draw_mask",
    "gem_hpp",
    "triplet_loss",
    "part_distance",
]
