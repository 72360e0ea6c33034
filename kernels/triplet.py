"""Triton kernels of the separate batch-all triplet loss and of part-averaged distances
(fused_ops.md §4). Launchers, autograd and the ``torch.library`` registration:
``fastgait.ops.triplet``.

Distances come from the Gram identity ``D = sqrt(relu(|a|^2 + |b|^2 - 2 a.b))`` with an
fp32 (IEEE, not TF32) matrix product, as the reference computes them.

The triplet kernels see the batch *sorted by label* (the launcher passes the permutation
``order``, rows are gathered through it, nothing is copied): the positives of any anchor are
then one contiguous range of columns, so a block of anchors only visits the positive columns
of its own labels, whatever the order of the labels in the batch.
"""
import triton
import triton.language as tl


@triton.jit
def _gram_block(
    a_ptr,
    a_rows,  # [BLOCK_M] element offsets of the rows of a
    a_mask,  # [BLOCK_M]
    a_stride_c,
    b_ptr,
    b_rows,  # [BLOCK_N]
    b_mask,  # [BLOCK_N]
    b_stride_c,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Inner products ``[BLOCK_M, BLOCK_N]`` and squared norms ``[BLOCK_M]``, ``[BLOCK_N]`` of two row blocks (fp32)."""
    offs_k = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_sq = tl.zeros((BLOCK_M,), tl.float32)
    b_sq = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k  # [BLOCK_K]
        mask_k = (ks < C)[None, :]
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :] * a_stride_c, mask=a_mask[:, None] & mask_k, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] + ks[None, :] * b_stride_c, mask=b_mask[:, None] & mask_k, other=0.0)
        a = a.to(tl.float32)  # [BLOCK_M, BLOCK_K]
        b = b.to(tl.float32)  # [BLOCK_N, BLOCK_K]
        dot += tl.dot(a, tl.trans(b), input_precision="ieee")
        a_sq += tl.sum(a * a, axis=1)
        b_sq += tl.sum(b * b, axis=1)
    return dot, a_sq, b_sq


@triton.jit
def _euclidean(dot, a_sq, b_sq):
    """``sqrt(relu(|a|^2 + |b|^2 - 2 a.b))`` for a Gram block."""
    return tl.sqrt_rn(tl.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * dot, 0.0))


@triton.jit
def triplet_fwd_kernel(
    emb_ptr,
    order_ptr,
    labels_ptr,
    dist_ptr,
    weight_ptr,
    row_stats_ptr,
    row_active_ptr,
    row_pairs_ptr,
    N,
    C,
    P,
    stride_en,
    stride_ec,
    stride_ep,
    margin,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Batch-all triplet forward for one part and one block of anchors (sorted positions).

    Grid: ``(cdiv(N, BLOCK_A), P)``. The program builds the distance rows ``D[a, :]`` of its
    ``BLOCK_A`` anchors (``[BLOCK_A, BLOCK_N]`` in registers, ``D[i, i] = 0`` exactly), then for
    every positive column ``j`` of its labels forms the hinge row
    ``relu(D[a, j] - D[a, k] + margin)`` over the negatives ``k`` and accumulates, in fp32:
    the hinge sum and active count per anchor, and per pair the count ``dL/dD`` needs
    (positive pair: its active negatives; negative pair: minus its active positives).
    Nothing of size ``[n, K, n - K]`` exists, in memory or in registers.

    Args:
        emb_ptr: embeddings ``[N, C, P]``, any float dtype, strides ``stride_e{n,c,p}``.
        order_ptr: int64 ``[N]``: sorted position -> sample index (a stable sort by label).
        labels_ptr: int64 ``[N]``: labels in sorted order.
        dist_ptr: fp32 ``[P, N, N]`` out: distances (sorted order), contiguous.
        weight_ptr: fp32 ``[P, N, N]`` out: the signed active counts above, contiguous.
        row_stats_ptr: fp32 ``[3, P, N]`` out: per anchor, the hinge sum, the sum of distances to
            positives other than itself, the sum of distances to negatives.
        row_active_ptr: int32 ``[P, N]`` out: per anchor, the active triplet count.
        row_pairs_ptr: int32 ``[2, N]`` out (written by the part-0 programs): per anchor, the
            number of positives other than itself and the number of negatives.
        margin: the hinge margin (fp32).
        BLOCK_A >= 16: anchors per program; BLOCK_N >= max(N, 16); BLOCK_K >= 16: channels per
            step of the Gram product. All powers of two.
    """
    part = tl.program_id(1)
    anchor0 = tl.program_id(0) * BLOCK_A
    rows = anchor0 + tl.arange(0, BLOCK_A)  # [BLOCK_A]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    col_ok = cols < N
    margin = tl.cast(margin, tl.float32)

    part_ptr = emb_ptr + part.to(tl.int64) * stride_ep
    row_offs = tl.load(order_ptr + rows, mask=row_ok, other=0) * stride_en  # [BLOCK_A]
    col_offs = tl.load(order_ptr + cols, mask=col_ok, other=0) * stride_en  # [BLOCK_N]
    dot, a_sq, b_sq = _gram_block(
        part_ptr, row_offs, row_ok, stride_ec, part_ptr, col_offs, col_ok, stride_ec, C, BLOCK_A, BLOCK_N, BLOCK_K
    )
    diagonal = rows[:, None] == cols[None, :]  # [BLOCK_A, BLOCK_N]
    dist = tl.where(diagonal, 0.0, _euclidean(dot, a_sq, b_sq))  # [BLOCK_A, BLOCK_N]

    row_label = tl.load(labels_ptr + rows, mask=row_ok, other=0)  # [BLOCK_A]
    col_label = tl.load(labels_ptr + cols, mask=col_ok, other=0)  # [BLOCK_N]
    pair_ok = row_ok[:, None] & col_ok[None, :]
    same = row_label[:, None] == col_label[None, :]
    negative = pair_ok & ~same  # [BLOCK_A, BLOCK_N]

    hinge_sum = tl.zeros((BLOCK_A,), tl.float32)
    active_count = tl.zeros((BLOCK_A,), tl.int32)
    weight = tl.zeros((BLOCK_A, BLOCK_N), tl.float32)  # [BLOCK_A, BLOCK_N]
    # The positive columns of this block's anchors: from the first column with the first
    # anchor's label to the last column with the last anchor's label (labels are sorted).
    first_label = tl.load(labels_ptr + anchor0)
    last_label = tl.load(labels_ptr + tl.minimum(anchor0 + BLOCK_A, N) - 1)
    j_start = tl.min(tl.where(col_ok & (col_label == first_label), cols, BLOCK_N), axis=0)
    j_end = tl.max(tl.where(col_ok & (col_label == last_label), cols, -1), axis=0) + 1
    for j in range(j_start, j_end):
        is_j = cols[None, :] == j  # [1, BLOCK_N]
        anchor_has_j = row_ok & (row_label == tl.load(labels_ptr + j))  # [BLOCK_A]
        pos_dist = tl.sum(tl.where(is_j, dist, 0.0), axis=1)  # [BLOCK_A]: D[a, j]
        hinge = pos_dist[:, None] - dist + margin  # [BLOCK_A, BLOCK_N]
        active = negative & anchor_has_j[:, None] & (hinge > 0.0)  # [BLOCK_A, BLOCK_N]
        hinge_sum += tl.sum(tl.where(active, hinge, 0.0), axis=1)
        active_here = tl.sum(active.to(tl.int32), axis=1)  # [BLOCK_A]
        active_count += active_here
        positive_slot = is_j & anchor_has_j[:, None]
        weight += tl.where(positive_slot, active_here[:, None].to(tl.float32), 0.0) - active.to(tl.float32)

    pair_offs = part.to(tl.int64) * N * N + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(dist_ptr + pair_offs, dist, mask=pair_ok)
    tl.store(weight_ptr + pair_offs, weight, mask=pair_ok)
    stats_offs = part * N + rows  # [BLOCK_A]
    positive_other = pair_ok & same & ~diagonal
    tl.store(row_stats_ptr + stats_offs, hinge_sum, mask=row_ok)
    tl.store(row_stats_ptr + P * N + stats_offs, tl.sum(tl.where(positive_other, dist, 0.0), axis=1), mask=row_ok)
    tl.store(row_stats_ptr + 2 * P * N + stats_offs, tl.sum(tl.where(negative, dist, 0.0), axis=1), mask=row_ok)
    tl.store(row_active_ptr + stats_offs, active_count, mask=row_ok)
    if part == 0:
        tl.store(row_pairs_ptr + rows, tl.sum(positive_other.to(tl.int32), axis=1), mask=row_ok)
        tl.store(row_pairs_ptr + N + rows, tl.sum(negative.to(tl.int32), axis=1), mask=row_ok)


@triton.jit
def triplet_finish_kernel(
    row_stats_ptr,
    row_active_ptr,
    row_pairs_ptr,
    loss_ptr,
    info_ptr,
    part_scale_ptr,
    N,
    P,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The small reduction after ``triplet_fwd_kernel``: one program, a fixed order (deterministic).

    Grid: ``(1,)``; ``[BLOCK_P, BLOCK_N]`` tiles of (parts, anchors), ``BLOCK_P >= P``. Per part:
    ``loss_p = hinge_sum / (active + 1e-9)`` (0 without an active triplet) and
    ``part_scale[p] = 1 / ((active + 1e-9) * P)`` (or 0), the factor ``dL/dD`` takes; then the
    means over parts.

    Args:
        row_stats_ptr, row_active_ptr, row_pairs_ptr: the forward kernel's per-anchor outputs.
        loss_ptr: fp32 scalar out. info_ptr: fp32 ``[3]`` out: mean active count, mean distance
            of positive pairs ``i != j`` and of negative pairs (each averaged over parts).
        part_scale_ptr: fp32 ``[P]`` out.
    """
    offs_p = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    part_ok = offs_p < P
    hinge_sum = tl.zeros((BLOCK_P,), tl.float32)
    pos_sum = tl.zeros((BLOCK_P,), tl.float32)
    neg_sum = tl.zeros((BLOCK_P,), tl.float32)
    active = tl.zeros((BLOCK_P,), tl.int32)
    pos_pairs = tl.zeros((BLOCK_N,), tl.int32)
    neg_pairs = tl.zeros((BLOCK_N,), tl.int32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n  # [BLOCK_N]
        col_ok = cols < N
        mask = part_ok[:, None] & col_ok[None, :]  # [BLOCK_P, BLOCK_N]
        stats = row_stats_ptr + offs_p[:, None] * N + cols[None, :]
        hinge_sum += tl.sum(tl.load(stats, mask=mask, other=0.0), axis=1)
        pos_sum += tl.sum(tl.load(stats + P * N, mask=mask, other=0.0), axis=1)
        neg_sum += tl.sum(tl.load(stats + 2 * P * N, mask=mask, other=0.0), axis=1)
        active += tl.sum(tl.load(row_active_ptr + offs_p[:, None] * N + cols[None, :], mask=mask, other=0), axis=1)
        pos_pairs += tl.load(row_pairs_ptr + cols, mask=col_ok, other=0)
        neg_pairs += tl.load(row_pairs_ptr + N + cols, mask=col_ok, other=0)
    pos_count = tl.maximum(tl.sum(pos_pairs, axis=0), 1).to(tl.float32)
    neg_count = tl.maximum(tl.sum(neg_pairs, axis=0), 1).to(tl.float32)

    active_f = active.to(tl.float32)
    inv_active = tl.where(active > 0, 1.0 / (active_f + 1e-9), 0.0)  # [BLOCK_P]
    tl.store(part_scale_ptr + offs_p, inv_active / P, mask=part_ok)
    tl.store(loss_ptr, tl.sum(tl.where(part_ok, hinge_sum * inv_active, 0.0), axis=0) / P)
    tl.store(info_ptr, tl.sum(active_f, axis=0) / P)
    tl.store(info_ptr + 1, tl.sum(pos_sum, axis=0) / pos_count / P)
    tl.store(info_ptr + 2, tl.sum(neg_sum, axis=0) / neg_count / P)


@triton.jit
def triplet_bwd_kernel(
    emb_ptr,
    order_ptr,
    dist_ptr,
    weight_ptr,
    part_scale_ptr,
    grad_loss_ptr,
    grad_emb_ptr,
    N,
    C,
    stride_en,
    stride_ec,
    stride_ep,
    stride_gn,
    stride_gc,
    stride_gp,
    BLOCK_A: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Batch-all triplet backward through the distances, for one part and one block of anchors.

    Grid: ``(cdiv(N, BLOCK_A), P)``. With ``G = grad_loss * part_scale[part] * weight`` (``dL/dD``) and
    ``S[i, j] = G[i, j] / D[i, j] + G[j, i] / D[j, i]`` (each term 0 where its ``D`` is 0, the
    reference's convention), ``dE_i = e_i * sum_j S[i, j] - sum_j S[i, j] e_j``: one GEMM per
    block of ``BLOCK_K`` channels, looping over column blocks of ``BLOCK_J``. Every element of
    ``grad_emb`` is written exactly once (no atomics).

    Args:
        emb_ptr: embeddings ``[N, C, P]``, strides ``stride_e{n,c,p}``.
        order_ptr: int64 ``[N]`` sorted position -> sample index (the forward's).
        dist_ptr, weight_ptr: fp32 ``[P, N, N]`` from the forward (sorted order).
        part_scale_ptr: fp32 ``[P]``: 1 / (parts * active count of the part), or 0.
        grad_loss_ptr: the upstream gradient of the loss, one element.
        grad_emb_ptr: ``[N, C, P]`` out, the embeddings' dtype, strides ``stride_g{n,c,p}``.
        BLOCK_A, BLOCK_J, BLOCK_K >= 16, powers of two.
    """
    part = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)  # [BLOCK_A]
    row_ok = rows < N
    offs_j = tl.arange(0, BLOCK_J)  # [BLOCK_J]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    scale = tl.load(part_scale_ptr + part) * tl.load(grad_loss_ptr).to(tl.float32)
    part64 = part.to(tl.int64)
    row_src = tl.load(order_ptr + rows, mask=row_ok, other=0)  # [BLOCK_A]
    pair_base = part64 * N * N  # offset of this part's [N, N] block

    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k  # [BLOCK_K]
        mask_k = ks < C
        acc = tl.zeros((BLOCK_A, BLOCK_K), tl.float32)  # [BLOCK_A, BLOCK_K]: sum_j S[i, j] e_j
        row_sum = tl.zeros((BLOCK_A,), tl.float32)  # [BLOCK_A]: sum_j S[i, j]
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + offs_j  # [BLOCK_J]
            col_ok = cols < N
            pair_ok = row_ok[:, None] & col_ok[None, :]
            ij = pair_base + rows[:, None].to(tl.int64) * N + cols[None, :]  # [BLOCK_A, BLOCK_J]
            ji = pair_base + cols[None, :].to(tl.int64) * N + rows[:, None]
            d_ij = tl.load(dist_ptr + ij, mask=pair_ok, other=0.0)
            d_ji = tl.load(dist_ptr + ji, mask=pair_ok, other=0.0)
            w_ij = tl.load(weight_ptr + ij, mask=pair_ok, other=0.0)
            w_ji = tl.load(weight_ptr + ji, mask=pair_ok, other=0.0)
            s = tl.where(d_ij > 0.0, w_ij / tl.where(d_ij > 0.0, d_ij, 1.0), 0.0) + tl.where(
                d_ji > 0.0, w_ji / tl.where(d_ji > 0.0, d_ji, 1.0), 0.0
            )  # [BLOCK_A, BLOCK_J]
            col_src = tl.load(order_ptr + cols, mask=col_ok, other=0)  # [BLOCK_J]
            e_cols = tl.load(
                emb_ptr + part64 * stride_ep + col_src[:, None] * stride_en + ks[None, :] * stride_ec,
                mask=col_ok[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_J, BLOCK_K]
            acc += tl.dot(s, e_cols, input_precision="ieee")
            row_sum += tl.sum(s, axis=1)
        e_rows = tl.load(
            emb_ptr + part64 * stride_ep + row_src[:, None] * stride_en + ks[None, :] * stride_ec,
            mask=row_ok[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_A, BLOCK_K]
        grad = scale * (row_sum[:, None] * e_rows - acc)
        tl.store(
            grad_emb_ptr + part64 * stride_gp + row_src[:, None] * stride_gn + ks[None, :] * stride_gc,
            grad.to(grad_emb_ptr.dtype.element_ty),
            mask=row_ok[:, None] & mask_k[None, :],
        )


@triton.jit
def part_distance_kernel(
    probe_ptr,
    gallery_ptr,
    out_ptr,
    N,
    M,
    C,
    P,
    stride_an,
    stride_ac,
    stride_ap,
    stride_bn,
    stride_bc,
    stride_bp,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Distance per part, averaged over parts: ``probe [N, C, P]``, ``gallery [M, C, P]`` -> ``out [N, M]``.

    Grid: ``(cdiv(N, BLOCK_M), cdiv(M, BLOCK_N))``. Each program keeps one ``[BLOCK_M, BLOCK_N]``
    fp32 accumulator and loops over the parts, so ``[P, N, M]`` is never formed.
    ``COSINE``: ``1 - a.b / (max(|a|, 1e-12) max(|b|, 1e-12))`` (``F.normalize``'s floor);
    otherwise Euclidean. ``out`` is fp32, contiguous. Strides in elements.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    col_ok = cols < M
    row_offs = rows.to(tl.int64) * stride_an
    col_offs = cols.to(tl.int64) * stride_bn
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # [BLOCK_M, BLOCK_N]
    for part in range(P):
        dot, a_sq, b_sq = _gram_block(
            probe_ptr + part * stride_ap,
            row_offs,
            row_ok,
            stride_ac,
            gallery_ptr + part * stride_bp,
            col_offs,
            col_ok,
            stride_bc,
            C,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        if COSINE:
            a_norm = tl.maximum(tl.sqrt(a_sq), 1e-12)
            b_norm = tl.maximum(tl.sqrt(b_sq), 1e-12)
            total += 1.0 - dot / (a_norm[:, None] * b_norm[None, :])
        else:
            total += _euclidean(dot, a_sq, b_sq)
    out_offs = rows[:, None].to(tl.int64) * M + cols[None, :]
    tl.store(out_ptr + out_offs, total / P, mask=row_ok[:, None] & col_ok[None, :])
