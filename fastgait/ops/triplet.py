"""``triplet_loss`` (separate batch-all triplet, fused_ops.md §4) and ``part_distance``.

Implementations:
- ``"reference"``: the spec, ``fastgait.ops.reference``.
- ``"torch"`` (``part_distance`` only): streams the probe set in chunks so
  ``[p, n_probe, n_gallery]`` is never built.
- ``"triton"`` (``fastgait.kernels.triplet``): forward = two launches: per (block of anchors,
  part) the distance rows and the hinge terms, accumulating hinge sums, active counts and the
  per-pair counts ``dL/dD`` needs (the batch is ranked by label inside the kernel: no sort, no
  copy on the host), then one small single-program reduction to the loss and the info values.
  Up to ``SINGLE_TILE_BATCH`` (256) samples the rows kernel holds a part's ``n`` distance
  columns in one tile; above, a ranking launch (once per batch) and a rows kernel that takes the
  columns in tiles (any ``n`` up to ``MAX_TRITON_BATCH``: the OU-MVLP recipe's 32 x 16 = 512).
  Backward = one launch through the saved ``R = counts / D`` (``[p, n, n]`` fp32, O(p n^2),
  saved only when a gradient is wanted).
  ``part_distance`` runs the same distance code with one accumulator over parts.

Math in fp32 whatever the input dtype (the reference casts with ``.float()``). A sample's
distance to itself is exactly 0, as in the reference.
"""
from __future__ import annotations

import math

import torch

from .._nvtx import nvtx_range
from . import _alloc
from ._checks import check_tensor
from ._dispatch import gpu_choices, resolve_impl
from .reference import part_distance_reference, triplet_loss_reference

METRICS = ("euc", "cos")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
GRAM_BLOCK = 16  # rows per program / channels per step: tl.dot's smallest tile
# Register caps (``maxnreg``) from a maxnreg sweep (compiled with the compile gate's worker; docs/KERNELS.md shows the result) (sm_90a, Triton 3.6 and 3.9):
# the kernels with IEEE fp32 dots compile without spills uncapped (a cap made ptxas spill), except
# part_distance under 3.6 (uncapped it stopped at 128 and spilled; 160 does not); the single-tile
# rows kernel on 16-bit tensor-core dots needs a cap of 192 (uncapped, one variant spilled 8 bytes
# at 128). The column-tiled rows kernel runs uncapped (see _rows_tiled_config).
MAXNREG_ROWS_NATIVE = 192
MAXNREG_DISTANCE_FP32 = 160
SINGLE_TILE_BATCH = 256  # up to here triplet_rows_kernel holds all n distance columns in one tile (512 spilled)
# Above it: triplet_rank_kernel + triplet_rows_tiled_kernel (the columns in tiles, any n). The limit
# left: R's in-part offsets (n^2) and a block's active count (<= 16 n^2 / 4) are int32.
MAX_TRITON_BATCH = 16384


def triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, impl: str = "auto"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Separate batch-all triplet loss of ``embeddings [n, c, p]`` with ``labels [n]`` (any order).

    Returns ``(loss, info)``: the scalar loss (mean over parts; 0, not NaN, when no triplet is
    active) and detached ``info`` scalars ``loss``, ``active_triplets``, ``mean_pos_dist``,
    ``mean_neg_dist``. See ``fastgait.ops.reference.triplet_loss_reference`` for the math.
    The loss is NaN when a distance that some triplet uses is NaN (a NaN or inf embedding), in
    every path, so a broken model cannot hide behind "no active triplet".
    The Triton path accepts any float dtype and strides, computes in fp32 and returns an fp32 loss;
    it takes batches of up to ``MAX_TRITON_BATCH`` (16384) samples, where its int32 counts and
    offsets end (``impl="auto"`` falls back to the reference above that).
    """
    op = "triplet_loss"
    check_tensor(embeddings, "embeddings", op=op, ndim=(3,))
    check_tensor(labels, "labels", op=op, ndim=(1,), device=embeddings.device, dtypes=LABEL_DTYPES)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{op}: {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"{op}: margin must be a finite number >= 0 (the hinge margin), got {margin!r}")
    path = resolve_impl(impl, embeddings.device, op=op, has_torch=False, has_triton=True)
    if path == "triton" and embeddings.shape[0] > MAX_TRITON_BATCH:
        if impl == "triton":
            raise ValueError(
                f"{op}: impl='triton' takes at most {MAX_TRITON_BATCH} samples per batch (MAX_TRITON_BATCH: "
                f"its per-part offsets and counts are int32), got {embeddings.shape[0]}; split the batch "
                f"or use impl='reference'"
            )
        path = "reference"
    if path == "reference":
        return triplet_loss_reference(embeddings, labels, margin)
    need_grad = torch.is_grad_enabled() and embeddings.requires_grad
    loss, info, *_ = triplet_loss_fwd(embeddings, labels.contiguous(), float(margin), need_grad)
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


def _pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _dot_native(t: torch.Tensor) -> bool:
    """Tensor-core dots on 16-bit inputs on a GPU; fp32 inputs (and the interpreter) take IEEE fp32."""
    return t.dtype in (torch.float16, torch.bfloat16) and gpu_choices(t.device)


def _rows_config(n: int, c: int) -> dict:
    """Tiles of ``triplet_rows_kernel``: all ``n`` columns in one tile (<= SINGLE_TILE_BATCH), 16
    anchors (tl.dot's smallest tile), channels per Gram step sized so the ``[BLOCK_N, BLOCK_K]``
    operand stays near 4096 elements; checked for no spills on sm_90a by the compile gate."""
    block_n = max(GRAM_BLOCK, _pow2(n))
    block_k = max(GRAM_BLOCK, min(_pow2(c), 4096 // block_n))
    return dict(BLOCK_A=GRAM_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=16, num_warps=4 if block_n <= 128 else 8)


def _rows_tiled_config(n: int, c: int) -> dict:
    """Tiles of ``triplet_rows_tiled_kernel`` (n > SINGLE_TILE_BATCH): 16 anchors, 128 columns per
    tile, 32 positive ranks per chunk (one chunk whenever a block's labels hold <= 32 samples: any
    P x K batch with K <= 16), 16 channels per Gram step, 8 warps, loads not pipelined
    (``num_stages=1``). A sweep on sm_90a (ptxas -v, Triton 3.9 and 3.6, n = 512, fp32): with
    4 warps every variant tried (64 or 128 columns, 16 or 32 channels, 1 to 3 stages) spilled or
    took 226-255 registers; 8 warps with 32 channels or 2-3 stages reached 255 registers or
    spilled under one of the two; this config takes 198-232 registers, no spills (also at
    n = 300, 1000, 4099 and in bf16). Checked by the compile gate."""
    return dict(BLOCK_A=GRAM_BLOCK, BLOCK_T=128, BLOCK_P=32, BLOCK_K=GRAM_BLOCK, num_warps=8, num_stages=1)


def _check_part_extent(op: str, **tensors: torch.Tensor) -> None:
    """The kernels index one part with int32 offsets (the part base is int64): check that it fits."""
    for name, t in tensors.items():
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[:2], t.stride()[:2]))
        if extent >= 2**31:
            raise ValueError(f"{op}: one part of {name} spans {extent} elements; impl='triton' needs < 2**31")


def _channels_contiguous(embeddings: torch.Tensor) -> torch.Tensor:
    """``embeddings`` with the channel dim contiguous (``[p, n, c]`` memory: SeparateFCs' own
    layout, then no copy), so the kernels load 16-byte vectors along the channels; any other
    layout is copied once (``n c p`` elements, small next to the ``p n^2`` work)."""
    if embeddings.stride(1) == 1 or embeddings.shape[1] == 1:
        return embeddings
    return embeddings.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def _triplet_outputs(embeddings: torch.Tensor, need_grad: bool):
    n, _, parts = embeddings.shape
    device = embeddings.device
    loss = _alloc.empty((), dtype=torch.float32, device=device)
    info = _alloc.empty(3, dtype=torch.float32, device=device)
    ratio = _alloc.empty(*((parts, n, n) if need_grad else (0,)), dtype=torch.float32, device=device)
    part_scale = _alloc.empty(parts, dtype=torch.float32, device=device)
    return loss, info, ratio, part_scale


def _grad_output(embeddings: torch.Tensor) -> torch.Tensor:
    return _alloc.empty_in_layout(embeddings.shape, _alloc.stride_order(embeddings), embeddings.dtype, embeddings.device)


@torch.library.custom_op("fastgait::triplet_loss_fwd", mutates_args=())
def triplet_loss_fwd(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(loss, info [active_triplets, mean_pos_dist, mean_neg_dist], ratio [p, n, n],
    part_scale [p])``. ``ratio`` (the active counts over the distances, sample order) is what the
    backward needs; it is empty without ``need_grad``. Two launches (three above
    ``SINGLE_TILE_BATCH`` samples: the ranking by label first), nothing else on the host."""
    import triton

    from fastgait.kernels.triplet import (
        triplet_finish_kernel,
        triplet_rank_kernel,
        triplet_rows_kernel,
        triplet_rows_tiled_kernel,
    )

    n = embeddings.shape[0]
    if n > MAX_TRITON_BATCH:
        raise ValueError(f"triplet_loss: the Triton kernels take at most MAX_TRITON_BATCH = {MAX_TRITON_BATCH} "
                         f"samples (int32 offsets and counts), got {n}; split the batch or use impl='reference'")
    with nvtx_range("triplet_loss.forward"):
        loss, info, ratio, part_scale = _triplet_outputs(embeddings, need_grad)
        embeddings = _channels_contiguous(embeddings)
        _check_part_extent("triplet_loss", embeddings=embeddings)
        n, c, parts = embeddings.shape
        native = _dot_native(embeddings)
        tiled = n > SINGLE_TILE_BATCH
        config = _rows_tiled_config(n, c) if tiled else _rows_config(n, c)
        if native and not tiled:
            config["maxnreg"] = MAXNREG_ROWS_NATIVE
        blocks = triton.cdiv(n, config["BLOCK_A"])
        stats = _alloc.empty(3, parts, blocks, dtype=torch.float32, device=embeddings.device)
        counts = _alloc.empty(parts + 2, blocks, dtype=torch.int32, device=embeddings.device)
        if tiled:
            order = _alloc.empty(n, dtype=torch.int32, device=embeddings.device)
            triplet_rank_kernel[(triton.cdiv(n, 128),)](labels, order, n, BLOCK_T=128, BLOCK_R=32)
            triplet_rows_tiled_kernel[(blocks, parts)](
                embeddings, labels, order, ratio if need_grad else stats, stats, counts,
                n, c, parts, *embeddings.stride(), margin,
                SAVE_R=need_grad, DOT_NATIVE=native, **config,
            )  # fmt: skip
        else:
            triplet_rows_kernel[(blocks, parts)](
                embeddings, labels, ratio if need_grad else stats, stats, counts,
                n, c, parts, *embeddings.stride(), margin,
                SAVE_R=need_grad, DOT_NATIVE=native, **config,
            )  # fmt: skip
        block_b = max(_pow2(blocks), 2)
        triplet_finish_kernel[(1,)](
            stats, counts, loss, info, part_scale, parts, blocks,
            BLOCK_P=max(1, min(_pow2(parts), 64, 4096 // block_b)), BLOCK_B=block_b,
        )  # fmt: skip
    return loss, info, ratio, part_scale


@triplet_loss_fwd.register_fake
def _(embeddings, labels, margin, need_grad):
    return _triplet_outputs(embeddings, need_grad)


@torch.library.custom_op("fastgait::triplet_loss_bwd", mutates_args=())
def triplet_loss_bwd(
    grad_loss: torch.Tensor, embeddings: torch.Tensor, ratio: torch.Tensor, part_scale: torch.Tensor
) -> torch.Tensor:
    """Fused backward: ``d loss / d embeddings`` (the embeddings' dtype and layout); one launch."""
    import triton

    from fastgait.kernels.triplet import triplet_grad_kernel

    with nvtx_range("triplet_loss.backward"):
        grad = _grad_output(embeddings)  # in the embeddings' own layout
        embeddings = _channels_contiguous(embeddings)
        n, c, parts = embeddings.shape
        block_k = max(GRAM_BLOCK, min(_pow2(c), 64))
        grid = (triton.cdiv(n, GRAM_BLOCK), parts)
        triplet_grad_kernel[grid](
            embeddings, ratio, part_scale, grad_loss, grad,
            n, c, *embeddings.stride(), *grad.stride(),
            BLOCK_B=GRAM_BLOCK, BLOCK_J=32 if n > 16 else 16, BLOCK_K=block_k,
        )  # fmt: skip
    return grad


@triplet_loss_bwd.register_fake
def _(grad_loss, embeddings, ratio, part_scale):
    return _grad_output(embeddings)


def _triplet_setup_context(ctx, inputs, output):
    embeddings, _, _, need_grad = inputs
    _, info, ratio, part_scale = output
    ctx.need_grad = need_grad
    ctx.mark_non_differentiable(info, ratio, part_scale)
    ctx.set_materialize_grads(False)  # no zero gradients for info, ratio ([p, n, n]) and part_scale
    ctx.save_for_backward(embeddings, ratio, part_scale)


def _triplet_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return None, None, None, None
    embeddings, ratio, part_scale = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("triplet_loss: the forward ran with need_grad=False; it cannot be differentiated")
    return triplet_loss_bwd(grad_loss, embeddings, ratio, part_scale), None, None, None


triplet_loss_fwd.register_autograd(_triplet_backward, setup_context=_triplet_setup_context)


def _distance_config(n: int, m: int, native: bool) -> dict:
    """Tiles of ``part_distance_kernel`` (checked for no spills on sm_90a by the compile gate):
    fp32 (IEEE dots on the CUDA cores): 64 x 64 outputs, 32 channels per step, 8 warps (128
    registers); 16-bit inputs on the tensor cores (wgmma): 128 x 64, 8 warps (~122 registers)."""
    block_m = max(GRAM_BLOCK, min(_pow2(n), 128 if native else 64))
    block_n = max(GRAM_BLOCK, min(_pow2(m), 64))
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, num_warps=8, num_stages=3)
    if not native:
        config["maxnreg"] = MAXNREG_DISTANCE_FP32
    return config


@torch.library.custom_op("fastgait::part_distance", mutates_args=())
def part_distance_fwd(probe: torch.Tensor, gallery: torch.Tensor, cosine: bool) -> torch.Tensor:
    """``[n, m]`` fp32 distances averaged over parts (Euclidean, or ``1 - cosine``); forward only."""
    import triton

    from fastgait.kernels.triplet import part_distance_kernel

    with nvtx_range("part_distance"):
        out = _distance_output(probe, gallery)
        n, c, parts = probe.shape
        m = gallery.shape[0]
        native = _dot_native(probe)
        config = _distance_config(n, m, native)
        grid = (triton.cdiv(n, config["BLOCK_M"]), triton.cdiv(m, config["BLOCK_N"]))
        # Channels contiguous (``[p, n, c]`` memory, SeparateFCs' own layout: then no copy), so the
        # Gram tiles load 16 bytes per thread instead of one element per address.
        probe_pnc = probe.permute(2, 0, 1).contiguous()
        gallery_pnc = gallery.permute(2, 0, 1).contiguous()
        _check_part_extent("part_distance", probe=probe_pnc.permute(1, 2, 0), gallery=gallery_pnc.permute(1, 2, 0))
        if config["BLOCK_M"] * m >= 2**31:
            raise ValueError(f"part_distance: a gallery of {m} samples is too large for impl='triton'; use impl='torch'")
        part_distance_kernel[grid](
            probe_pnc, gallery_pnc, out, n, m, c, parts,
            probe_pnc.stride(1), probe_pnc.stride(2), probe_pnc.stride(0),
            gallery_pnc.stride(1), gallery_pnc.stride(2), gallery_pnc.stride(0),
            COSINE=cosine, DOT_NATIVE=native, **config,
        )  # fmt: skip
    return out


@part_distance_fwd.register_fake
def _(probe, gallery, cosine):
    return _distance_output(probe, gallery)


def _distance_output(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return _alloc.empty(probe.shape[0], gallery.shape[0], dtype=torch.float32, device=probe.device)
