"""``triplet_loss`` (separate batch-all triplet, fused_ops.md §4) and ``part_distance``.

Implementations:
- ``"reference"``: the spec, ``fastgait.ops.reference``.
- ``"torch"`` (``part_distance`` only): streams the probe set in chunks so
  ``[p, n_probe, n_gallery]`` is never built.
- ``"triton"`` (``fastgait.kernels.triplet``): per part, the distance block and the hinge terms
  in one kernel that accumulates hinge sums, active counts and the per-pair counts ``dL/dD``
  needs, without building ``[p, n, K, n - K]``; one small single-program kernel reduces those
  to the loss and the info values; the backward goes through the distances. Saved for
  backward: distances and pair counts, ``[p, n, n]`` fp32 each (O(p n^2)), and the batch's
  order by label.
  ``part_distance`` runs the same distance code with one accumulator over parts.

Math in fp32 whatever the input dtype (the reference casts with ``.float()``). A sample's
distance to itself is exactly 0, as in the reference.
"""
from __future__ import annotations

import torch

from .._nvtx import nvtx_range
from . import _alloc
from ._checks import check_tensor
from ._dispatch import resolve_impl
from .reference import part_distance_reference, triplet_loss_reference

METRICS = ("euc", "cos")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
GRAM_BLOCK = 16  # rows per program / channels per step: tl.dot's smallest tile


def triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, impl: str = "auto"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Separate batch-all triplet loss of ``embeddings [n, c, p]`` with ``labels [n]`` (any order).

    Returns ``(loss, info)``: the scalar loss (mean over parts; 0, not NaN, when no triplet is
    active) and detached ``info`` scalars ``loss``, ``active_triplets``, ``mean_pos_dist``,
    ``mean_neg_dist``. See ``fastgait.ops.reference.triplet_loss_reference`` for the math.
    The Triton path accepts any float dtype and strides, computes in fp32 and returns an fp32 loss.
    """
    op = "triplet_loss"
    check_tensor(embeddings, "embeddings", op=op, ndim=(3,))
    check_tensor(labels, "labels", op=op, ndim=(1,), device=embeddings.device, dtypes=LABEL_DTYPES)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{op}: {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    if not margin >= 0:
        raise ValueError(f"{op}: margin must be >= 0, got {margin}")
    path = resolve_impl(impl, embeddings.device, op=op, has_torch=False, has_triton=True)
    if path == "reference":
        return triplet_loss_reference(embeddings, labels, margin)
    loss, info, *_ = triplet_loss_fwd(embeddings, labels, float(margin))
    info = info.detach()
    return loss, {
        "loss": loss.detach(),
        "active_triplets": info[0],
        "mean_pos_dist": info[1],
        "mean_neg_dist": info[2],
    }


def part_distance(
    probe: torch.Tensor, gallery: torch.Tensor, metric: str = "euc", impl: str = "auto", chunk: int = 1024
) -> torch.Tensor:
    """Per part distance averaged over parts: ``probe [n, c, p]``, ``gallery [m, c, p]`` -> ``[n, m]`` (fp32).

    ``metric``: ``"euc"`` (Euclidean per part) or ``"cos"`` (``1 - cosine`` per part).
    ``chunk``: probes per step of the ``"torch"`` path. Forward only (evaluation).
    """
    op = "part_distance"
    check_tensor(probe, "probe", op=op, ndim=(3,))
    check_tensor(gallery, "gallery", op=op, ndim=(3,), device=probe.device)
    if probe.shape[1:] != gallery.shape[1:]:
        raise ValueError(
            f"{op}: probe {tuple(probe.shape)} and gallery {tuple(gallery.shape)} must share [c, p]"
        )
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if chunk < 1:
        raise ValueError(f"{op}: chunk must be >= 1, got {chunk}")
    path = resolve_impl(impl, probe.device, op=op, has_torch=True, has_triton=True)
    if path == "reference":
        return part_distance_reference(probe, gallery, metric)
    if path == "triton":
        return part_distance_fwd(probe, gallery, metric == "cos")
    return torch.cat(
        [part_distance_reference(probe[i : i + chunk], gallery, metric) for i in range(0, probe.shape[0], chunk)]
    )


# ----------------------------------------------------------------------------------------
# Launchers and registration
# ----------------------------------------------------------------------------------------


def _gram_blocks(n: int, c: int) -> dict:
    import triton

    block_n = max(GRAM_BLOCK, triton.next_power_of_2(n))
    # Keep the [BLOCK_N, BLOCK_K] column tile of the Gram product near 4096 elements.
    block_k = max(GRAM_BLOCK, min(triton.next_power_of_2(c), 4096 // block_n))
    return dict(BLOCK_A=GRAM_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if block_n <= 128 else 8)


def _triplet_outputs(embeddings: torch.Tensor):
    n, _, parts = embeddings.shape
    device = embeddings.device
    loss = _alloc.empty((), dtype=torch.float32, device=device)
    info = _alloc.empty(3, dtype=torch.float32, device=device)
    dist = _alloc.empty(parts, n, n, dtype=torch.float32, device=device)
    weight = _alloc.empty(parts, n, n, dtype=torch.float32, device=device)
    part_scale = _alloc.empty(parts, dtype=torch.float32, device=device)
    order = _alloc.empty(n, dtype=torch.int64, device=device)
    return loss, info, dist, weight, part_scale, order


def _grad_output(embeddings: torch.Tensor) -> torch.Tensor:
    return _alloc.empty_in_layout(embeddings.shape, _alloc.stride_order(embeddings), embeddings.dtype, embeddings.device)


@torch.library.custom_op("fastgait::triplet_loss_fwd", mutates_args=())
def triplet_loss_fwd(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(loss, info [active_triplets, mean_pos_dist, mean_neg_dist], dist [p, n, n],
    pair_weight [p, n, n], part_scale [p], order [n])``; the last four feed the backward (the pair
    tensors are indexed by position in ``order``, the stable sort of the batch by label)."""
    import triton

    from fastgait.kernels.triplet import triplet_finish_kernel, triplet_fwd_kernel

    with nvtx_range("triplet_loss.forward"):
        loss, info, dist, weight, part_scale, order = _triplet_outputs(embeddings)
        n, c, parts = embeddings.shape
        sorted_labels, sort_order = torch.sort(labels.to(torch.int64), stable=True)
        order.copy_(sort_order)
        row_stats = _alloc.empty(3, parts, n, dtype=torch.float32, device=embeddings.device)
        row_active = _alloc.empty(parts, n, dtype=torch.int32, device=embeddings.device)
        row_pairs = _alloc.empty(2, n, dtype=torch.int32, device=embeddings.device)
        blocks = _gram_blocks(n, c)
        grid = (triton.cdiv(n, blocks["BLOCK_A"]), parts)
        triplet_fwd_kernel[grid](
            embeddings, order, sorted_labels,
            dist, weight, row_stats, row_active, row_pairs,
            n, c, parts, *embeddings.stride(), margin,
            **blocks,
        )  # fmt: skip
        block_p = triton.next_power_of_2(parts)
        triplet_finish_kernel[(1,)](
            row_stats, row_active, row_pairs, loss, info, part_scale, n, parts,
            BLOCK_P=block_p, BLOCK_N=max(1, min(blocks["BLOCK_N"], 4096 // block_p)),
        )  # fmt: skip
    return loss, info, dist, weight, part_scale, order


@triplet_loss_fwd.register_fake
def _(embeddings, labels, margin):
    return _triplet_outputs(embeddings)


@torch.library.custom_op("fastgait::triplet_loss_bwd", mutates_args=())
def triplet_loss_bwd(
    grad_loss: torch.Tensor,
    embeddings: torch.Tensor,
    order: torch.Tensor,
    dist: torch.Tensor,
    weight: torch.Tensor,
    part_scale: torch.Tensor,
) -> torch.Tensor:
    """Fused backward: ``d loss / d embeddings`` (the embeddings' dtype and layout)."""
    import triton

    from fastgait.kernels.triplet import triplet_bwd_kernel

    with nvtx_range("triplet_loss.backward"):
        grad = _grad_output(embeddings)
        n, c, parts = embeddings.shape
        block_k = max(GRAM_BLOCK, min(triton.next_power_of_2(c), 64))
        block_j = max(GRAM_BLOCK, min(triton.next_power_of_2(n), 64))
        grid = (triton.cdiv(n, GRAM_BLOCK), parts)
        triplet_bwd_kernel[grid](
            embeddings, order, dist, weight, part_scale, grad_loss, grad,
            n, c, *embeddings.stride(), *grad.stride(),
            BLOCK_A=GRAM_BLOCK, BLOCK_J=block_j, BLOCK_K=block_k,
        )  # fmt: skip
    return grad


@triplet_loss_bwd.register_fake
def _(grad_loss, embeddings, order, dist, weight, part_scale):
    return _grad_output(embeddings)


def _triplet_setup_context(ctx, inputs, output):
    embeddings, _, _ = inputs
    _, info, dist, weight, part_scale, order = output
    ctx.mark_non_differentiable(info, dist, weight, part_scale, order)
    ctx.save_for_backward(embeddings, order, dist, weight, part_scale)


def _triplet_backward(ctx, grad_loss, *_unused):
    embeddings, order, dist, weight, part_scale = ctx.saved_tensors
    return triplet_loss_bwd(grad_loss, embeddings, order, dist, weight, part_scale), None, None


triplet_loss_fwd.register_autograd(_triplet_backward, setup_context=_triplet_setup_context)


@torch.library.custom_op("fastgait::part_distance", mutates_args=())
def part_distance_fwd(probe: torch.Tensor, gallery: torch.Tensor, cosine: bool) -> torch.Tensor:
    """``[n, m]`` fp32 distances averaged over parts (Euclidean, or ``1 - cosine``); forward only."""
    import triton

    from fastgait.kernels.triplet import part_distance_kernel

    with nvtx_range("part_distance"):
        out = _distance_output(probe, gallery)
        n, c, parts = probe.shape
        m = gallery.shape[0]
        block_m = max(GRAM_BLOCK, min(triton.next_power_of_2(n), 64))
        block_n = max(GRAM_BLOCK, min(triton.next_power_of_2(m), 64))
        block_k = max(GRAM_BLOCK, min(triton.next_power_of_2(c), 32))
        grid = (triton.cdiv(n, block_m), triton.cdiv(m, block_n))
        part_distance_kernel[grid](
            probe, gallery, out, n, m, c, parts, *probe.stride(), *gallery.stride(),
            COSINE=cosine, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip
    return out


@part_distance_fwd.register_fake
def _(probe, gallery, cosine):
    return _distance_output(probe, gallery)


def _distance_output(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return _alloc.empty(probe.shape[0], gallery.shape[0], dtype=torch.float32, device=probe.device)
