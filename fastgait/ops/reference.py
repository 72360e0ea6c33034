"""The plain PyTorch spec of every fused op, written for reading, not for speed.

Every fast path in ``fastgait.ops`` (the ``"torch"`` and ``"triton"`` implementations) is
tested against these functions, in value and in every gradient. The math is that of
``shared/design/blocks.md``; section numbers below refer to it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Complementary band masks (blocks.md §2.1)
# ----------------------------------------------------------------------------------------


def band_height(height: int, drop_ratio: float) -> int:
    """Rows in the band: ``floor(drop_ratio * height)`` (guarded against 0.3*10 = 2.9999...)."""
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must lie in [0, 1], got {drop_ratio}")
    return int(math.floor(drop_ratio * height + 1e-9))


def band_masks(band_start: torch.Tensor, band_rows: int, height: int, dtype=torch.float32) -> torch.Tensor:
    """The pair's first mask ``M0`` as ``[n, 1, 1, height, 1]``: 1 on ``band_start <= h < band_start + band_rows``.

    ``M1 = 1 - M0``. Masks are constant over channels, frames and columns.
    """
    rows = torch.arange(height, device=band_start.device)
    start = band_start.view(-1, 1)
    inside = (rows >= start) & (rows < start + band_rows)  # [n, H]
    return inside.to(dtype).view(-1, 1, 1, height, 1)


# ----------------------------------------------------------------------------------------
# The MLA block (blocks.md §2.2)
# ----------------------------------------------------------------------------------------


def conv3x3x3_lrelu(x: torch.Tensor, weight: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """``c3(X) = lrelu(conv3d_3x3x3(X))``: bias-free, stride 1, 'same' padding."""
    return F.leaky_relu(F.conv3d(x, weight, padding=1), negative_slope)


def mla_conv3d_reference(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weight_local: torch.Tensor,
    band_start: Optional[torch.Tensor],
    band_rows: int,
    fuse: str = "add",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """The MLA block, as three convolutions on materialised masked copies of ``x``.

    x: ``[n, c_in, t, h, w]``; weights ``[c_out, c_in, 3, 3, 3]``; band_start ``[n]`` ints, or
    None for evaluation (then the local branch is ``c3_l(x)``). ``weight_global=None`` gives the
    local branch alone (the paper's LFR-only ablation). Returns ``[n, c_out, t, h, w]`` for
    ``fuse="add"`` and ``[n, c_out, t, 2h, w]`` for ``fuse="concat"`` (global rows first).
    """
    if band_start is None:
        local = conv3x3x3_lrelu(x, weight_local, negative_slope)
    else:
        keep_band = band_masks(band_start, band_rows, x.shape[3], x.dtype)  # M0
        drop_band = 1.0 - keep_band  # M1
        local = conv3x3x3_lrelu(x * keep_band, weight_local, negative_slope) + conv3x3x3_lrelu(
            x * drop_band, weight_local, negative_slope
        )
    if weight_global is None:
        return local
    glob = conv3x3x3_lrelu(x, weight_global, negative_slope)
    if fuse == "add":
        return glob + local
    if fuse == "concat":
        return torch.cat([glob, local], dim=3)
    raise ValueError(f"fuse must be 'add' or 'concat', got {fuse!r}")


# ----------------------------------------------------------------------------------------
# ReverseMask blocks (blocks.md §3)
# ----------------------------------------------------------------------------------------


def rmb_conv3d_reference(
    x: torch.Tensor,
    weight_global: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    scales: torch.Tensor,
    keep: Optional[torch.Tensor],
    fuse: str = "add",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """ReverseMask blocks on materialised masked copies of ``x`` (the spec).

    x ``[n, c_in, t, h, w]``; weight_global: ``[c_out, c_in, 3, 3, 3]`` or None; weights: one
    ``[c_out, c_in, 3, 3, 3]`` per RMFE branch; scales ``[len(weights), 2]``: each branch's
    ``(alpha, beta)``; keep: the mask ``Mm [h, w]`` (shared by the batch, channels, frames and
    branches), or None for no perturbation. Each RMFE branch is
    ``c3(Xa) + c3(Xb)`` with ``Xa = alpha*X*Mm + beta*X*Mr``, ``Xb = (1-alpha)*X*Mm + (1-beta)*X*Mr``,
    ``Mr = 1 - Mm`` (``c3(X)`` without a mask). The branches (global first) are summed
    (``fuse="add"``) or stacked along H (``"concat"``).
    """
    branches = [] if weight_global is None else [conv3x3x3_lrelu(x, weight_global, negative_slope)]
    for weight, (alpha, beta) in zip(weights, scales):
        if keep is None:
            branches.append(conv3x3x3_lrelu(x, weight, negative_slope))
            continue
        kept = keep.to(x.dtype)
        x_a = x * (alpha * kept + beta * (1 - kept))
        x_b = x * ((1 - alpha) * kept + (1 - beta) * (1 - kept))
        branches.append(conv3x3x3_lrelu(x_a, weight, negative_slope) + conv3x3x3_lrelu(x_b, weight, negative_slope))
    if fuse == "add":
        return sum(branches[1:], branches[0])
    if fuse == "concat":
        return torch.cat(branches, dim=3)
    raise ValueError(f"fuse must be 'add' or 'concat', got {fuse!r}")


# ----------------------------------------------------------------------------------------
# GaitGL's GL block (blocks.md §4, OpenGait semantics)
# ----------------------------------------------------------------------------------------


def gl_strip_rows(height: int, halving: int) -> int:
    """Rows per strip of GaitGL's local conv: ``height // 2**halving`` (OpenGait's ``torch.split``
    size; the last strip is shorter when it does not divide ``height``)."""
    strip = height // 2**halving
    if strip < 1:
        raise ValueError(f"GL block: {height} rows cannot be cut into 2**{halving} strips; lower halving")
    return strip


def gl_conv3d_reference(
    x: torch.Tensor,
    weight_global: torch.Tensor,
    weight_local: torch.Tensor,
    halving: int,
    fm_sign: bool = False,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """The GL block as OpenGait computes it: the local conv on each strip separately (zero
    padding at every strip border), the strips put back together; ``fm_sign=False``:
    ``lrelu(global) + lrelu(local)``, ``fm_sign=True``: ``lrelu(concat_H(global, local))``."""
    glob = F.conv3d(x, weight_global, padding=1)
    if halving == 0:
        local = F.conv3d(x, weight_local, padding=1)
    else:
        strip = gl_strip_rows(x.shape[3], halving)
        local = torch.cat([F.conv3d(part, weight_local, padding=1) for part in x.split(strip, 3)], 3)
    if fm_sign:
        return F.leaky_relu(torch.cat([glob, local], dim=3), negative_slope)
    return F.leaky_relu(glob, negative_slope) + F.leaky_relu(local, negative_slope)


# ----------------------------------------------------------------------------------------
# GeM over horizontal strips, with the temporal max (blocks.md §5)
# ----------------------------------------------------------------------------------------


def strip_bounds(height: int, strips: int) -> list[tuple[int, int]]:
    """Row ranges of ``strips`` horizontal strips: strip i is ``[i*h//s, (i+1)*h//s)``.

    Equal strips when ``strips`` divides ``height`` (OpenGait's case); otherwise the
    strips differ by at most one row and still tile the map exactly.
    """
    if not 1 <= strips <= height:
        raise ValueError(f"cannot split {height} rows into {strips} strips (need 1 <= strips <= rows)")
    return [((i * height) // strips, ((i + 1) * height) // strips) for i in range(strips)]


def temporal_max(x: torch.Tensor) -> torch.Tensor:
    """Max over frames, ``[n, c, t, h, w] -> [n, c, h, w]``; the gradient goes to the first max."""
    return torch.max(x, dim=2).values


def gem_hpp_reference(x: torch.Tensor, p: torch.Tensor, bins: Sequence[int] = (64,), eps: float = 1e-6) -> torch.Tensor:
    """GeM-HPP: ``x`` ``[n, c, h, w]`` (or ``[n, c, t, h, w]``: temporal max first) -> ``[n, c, sum(bins)]``.

    For each strip: ``(mean over its rows and columns of clamp(x, eps)^p)^(1/p)``; ``p`` is a
    learnable tensor (one element). GeM's domain is ``0 < p < inf``: outside it (``p <= 0``, NaN or
    inf, where the formula is no longer a generalised mean) every output is NaN, decided on the
    device (no host sync), so a diverged exponent shows up as a non-finite loss.
    """
    if x.dim() == 5:
        x = temporal_max(x)
    powered = x.clamp(min=eps).pow(p)
    strips = [
        powered[:, :, lo:hi, :].mean(dim=(2, 3))
        for strip_count in bins
        for lo, hi in strip_bounds(x.shape[2], strip_count)
    ]
    out = torch.stack(strips, dim=-1).pow(1.0 / p)
    p_valid = (p > 0) & torch.isfinite(p)
    return torch.where(p_valid.reshape(()), out, torch.full_like(out, float("nan")))


# ----------------------------------------------------------------------------------------
# Separate batch-all triplet loss (blocks.md §6)
# ----------------------------------------------------------------------------------------


def part_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per part Euclidean distances: ``a [p, n, c]``, ``b [p, m, c]`` -> ``[p, n, m]``.

    ``sqrt(relu(|a|^2 + |b|^2 - 2 a.b))``; the relu makes the gradient 0 where the distance is 0.
    """
    a2 = a.pow(2).sum(-1, keepdim=True)  # [p, n, 1]
    b2 = b.pow(2).sum(-1).unsqueeze(1)  # [p, 1, m]
    inner = a @ b.transpose(1, 2)  # [p, n, m]
    return F.relu(a2 + b2 - 2 * inner).sqrt()


def _padded_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a boolean ``[n, m]`` mask, the True columns in order, padded to the longest row.

    Returns ``(index [n, kmax], valid [n, kmax])``; padded slots point at column 0 and are invalid.
    """
    counts = mask.sum(dim=1)
    kmax = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # True columns first
    index = order[:, :kmax]
    valid = torch.arange(kmax, device=mask.device) < counts.unsqueeze(1)
    return index, valid


def triplet_loss_reference(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Separate batch-all triplet loss: ``embeddings [n, c, p]``, ``labels [n]`` (any order).

    For each part: ``L[i, j, k] = relu(D[i, j] - D[i, k] + margin)`` over anchors i, positives j
    (same label, i itself included) and negatives k; the part loss is
    ``sum(L) / (count(L > 0) + 1e-9)`` (0 with no active triplet); the loss is the mean over
    parts. A NaN distance in any triplet makes its part's loss NaN (it is not "inactive"). The hinge terms are built as ``[p, n, K, n - K]`` (padded where the number of
    positives differs between anchors), which is what the fused op avoids.

    Returns ``(loss, info)``; ``info`` holds detached scalars: ``loss``, ``active_triplets``
    (mean over parts of the active count), ``mean_pos_dist`` and ``mean_neg_dist`` (over pairs
    i != j, mean over parts). ``D[i, i]`` is exactly 0 and passes no gradient.
    """
    emb = embeddings.permute(2, 0, 1).float()  # [p, n, c]
    parts = emb.shape[0]
    # D[i, i] is 0 exactly: the expanded formula leaves rounding noise there (about 1e-2 at
    # c = 128), whose 1/D gradient would be noise too.
    self_pairs = torch.eye(emb.shape[1], dtype=torch.bool, device=emb.device)
    dist = part_euclidean(emb, emb).masked_fill(self_pairs, 0.0)  # [p, n, n]

    same = labels.view(-1, 1) == labels.view(1, -1)  # [n, n]
    pos_index, pos_valid = _padded_columns(same)  # [n, K]
    neg_index, neg_valid = _padded_columns(~same)  # [n, N]
    anchor_pos = dist.gather(2, pos_index.expand(parts, -1, -1))  # [p, n, K]
    anchor_neg = dist.gather(2, neg_index.expand(parts, -1, -1))  # [p, n, N]

    hinge = F.relu(anchor_pos.unsqueeze(3) - anchor_neg.unsqueeze(2) + margin)  # [p, n, K, N]
    valid = pos_valid.unsqueeze(2) & neg_valid.unsqueeze(1)  # padded slots are no triplets
    hinge = torch.where(valid, hinge, torch.zeros_like(hinge))  # (where, not *: a padded NaN must not count)
    hinge_sum = hinge.sum(dim=(1, 2, 3))  # [p]
    active = (hinge > 0).sum(dim=(1, 2, 3)).float()  # [p]
    # Without an active triplet the hinge sum is 0, or NaN when a triplet's distance is NaN: the
    # part loss is that sum (0 or NaN), never a 0 that hides a broken model.
    part_loss = torch.where(active > 0, hinge_sum / (active + 1e-9), hinge_sum)
    loss = part_loss.mean()

    info = {
        "loss": loss.detach(),
        "active_triplets": active.mean().detach(),
        "mean_pos_dist": _masked_mean(dist.detach(), same & ~self_pairs),
        "mean_neg_dist": _masked_mean(dist.detach(), ~same),
    }
    return loss, info


def _masked_mean(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the pairs in ``mask [n, n]`` and over parts of ``dist [p, n, n]``; 0 when empty."""
    count = mask.sum().clamp(min=1)
    return (dist * mask).sum(dim=(1, 2)).div(count).mean()


# ----------------------------------------------------------------------------------------
# Probe x gallery distances for evaluation (blocks.md §7)
# ----------------------------------------------------------------------------------------


def part_distance_reference(probe: torch.Tensor, gallery: torch.Tensor, metric: str = "euc") -> torch.Tensor:
    """Distance per part, averaged over parts: ``probe [n, c, p]``, ``gallery [m, c, p]`` -> ``[n, m]``.

    ``metric="euc"``: Euclidean per part. ``metric="cos"``: ``1 - cosine similarity`` per part.
    """
    a = probe.permute(2, 0, 1).float()  # [p, n, c]
    b = gallery.permute(2, 0, 1).float()  # [p, m, c]
    if metric == "euc":
        return part_euclidean(a, b).mean(0)
    if metric == "cos":
        return (1.0 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)).mean(0)
    raise ValueError(f"metric must be 'euc' or 'cos', got {metric!r}")
