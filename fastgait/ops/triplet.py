"""``triplet_loss`` (separate batch-all triplet, fused_ops.md §4) and ``part_distance``.

Implementations: ``"reference"`` (the spec, ``fastgait.ops.reference``); ``part_distance`` also
has ``"torch"``, which streams the probe set in chunks so ``[p, n_probe, n_gallery]`` is never built.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor
from ._dispatch import resolve_impl
from .reference import part_distance_reference, triplet_loss_reference

METRICS = ("euc", "cos")


def triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, impl: str = "auto"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Separate batch-all triplet loss of ``embeddings [n, c, p]`` with ``labels [n]`` (any order).

    Returns ``(loss, info)``: the scalar loss (mean over parts; 0, not NaN, when no triplet is
    active) and detached ``info`` scalars ``loss``, ``active_triplets``, ``mean_pos_dist``,
    ``mean_neg_dist``. See ``fastgait.ops.reference.triplet_loss_reference`` for the math.
    """
    op = "triplet_loss"
    check_tensor(embeddings, "embeddings", op=op, ndim=(3,))
    check_tensor(labels, "labels", op=op, ndim=(1,), device=embeddings.device, dtypes=(torch.int64, torch.int32))
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{op}: {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    if margin < 0:
        raise ValueError(f"{op}: margin must be >= 0, got {margin}")
    resolve_impl(impl, embeddings.device, op=op, has_torch=False, has_triton=False)
    return triplet_loss_reference(embeddings, labels, margin)


def part_distance(
    probe: torch.Tensor, gallery: torch.Tensor, metric: str = "euc", impl: str = "auto", chunk: int = 1024
) -> torch.Tensor:
    """Per part distance averaged over parts: ``probe [n, c, p]``, ``gallery [m, c, p]`` -> ``[n, m]`` (fp32)."""
    op = "part_distance"
    check_tensor(probe, "probe", op=op, ndim=(3,))
    check_tensor(gallery, "gallery", op=op, ndim=(3,), device=probe.device)
    if probe.shape[1:] != gallery.shape[1:]:
        raise ValueError(
            f"{op}: probe {tuple(probe.shape)} and gallery {tuple(gallery.shape)} must share [c, p]"
        )
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    path = resolve_impl(impl, probe.device, op=op, has_torch=True, has_triton=False)
    if path == "reference":
        return part_distance_reference(probe, gallery, metric)
    return torch.cat(
        [part_distance_reference(probe[i : i + chunk], gallery, metric) for i in range(0, probe.shape[0], chunk)]
    )
