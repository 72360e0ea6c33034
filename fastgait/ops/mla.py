"""``mla_conv3d``: the MLA block's convolutions with complementary band masks (fused_ops.md §1).

With a 3-row kernel, ``c3(X*M0) + c3(X*M1)`` equals ``lrelu(W*X)`` on every output row except
the <= 4 *boundary rows* per sample whose receptive rows straddle a band edge. So the pair
costs one convolution plus a correction on those rows, and the global branch rides in the
same convolution with stacked weights ``[W_g; W_l]``.

Implementations:
- ``"reference"``: three convolutions on materialised masked copies (the spec).
- ``"torch"``: the band-aware algorithm in plain PyTorch (the CPU path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_same_dtype, check_tensor
from ._dispatch import resolve_impl
from .reference import mla_conv3d_reference

OP = "mla_conv3d"
FUSES = ("add", "concat")


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
        impl: ``"auto" | "reference" | "torch" | "triton"`` (see ``fastgait.ops``).
    """
    _check_inputs(x, weight_global, weight_local, band_start, band_height, fuse)
    path = resolve_impl(impl, x.device, op=OP, has_torch=True, has_triton=False)
    if path == "reference":
        return mla_conv3d_reference(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope)
    return _mla_conv3d_torch(x, weight_global, weight_local, band_start, band_height, fuse, negative_slope)


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
    if not 0 <= int(band_height) <= height:
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
    pre = F.conv3d(x, weight, padding=1)  # [n, (2)c_out, t, h, w]: [G, F] in one convolution
    pre_local = pre[:, -c_out:]
    local = F.leaky_relu(pre_local, negative_slope)
    if band_start is not None and band_rows > 0:
        local = local + _boundary_correction(x, weight_local, pre_local, band_start, band_rows, negative_slope)
    if weight_global is None:
        return local
    glob = F.leaky_relu(pre[:, :c_out], negative_slope)
    return glob + local if fuse == "add" else torch.cat([glob, local], dim=3)


def _boundary_correction(x, weight_local, pre_local, band_start, band_rows, negative_slope):
    """``lrelu(P0) + lrelu(F - P0) - lrelu(F)`` on the boundary rows, zero elsewhere."""
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
    band_part = F.conv3d(gathered, weight_local, padding=(1, 0, 1))  # [4n, c_out, t, 1, w]
    band_part = band_part.view(n, 4, *band_part.shape[1:3], band_part.shape[-1])  # [n, 4, c_out, t, w]

    full = pre_local.permute(0, 3, 1, 2, 4)[batch, rows]  # [n, 4, c_out, t, w]
    lrelu = lambda v: F.leaky_relu(v, negative_slope)  # noqa: E731
    correction = (lrelu(band_part) + lrelu(full - band_part) - lrelu(full)) * live.view(n, 4, 1, 1, 1)
    out = torch.zeros_like(pre_local.permute(0, 3, 1, 2, 4))  # [n, h, c_out, t, w]
    out = out.index_put((batch.expand(n, 4), rows), correction, accumulate=True)
    return out.permute(0, 2, 3, 1, 4)
