"""Triton kernels of the separate batch-all triplet loss and of part-averaged distances
(fused_ops.md §4). Launchers, autograd and the ``torch.library`` registration:
``fastgait.ops.triplet``.

Design
------
The loss is two launches forward (three above 256 samples) and one backward; nothing of size
``[p, n, K, n - K]`` exists, and nothing but the launches runs on the host (no sort, no copy):

``triplet_rows_kernel`` -- grid ``(cdiv(n, BLOCK_A), p)``: one program per (block of anchors, part).
    The batch is taken in label order without sorting it in memory: each program ranks the ``n``
    labels itself (``rank[i] = #{j: y_j < y_i} + #{j < i: y_j == y_i}``, an ``[n, 16]``-tiled
    count, O(n^2) integer compares, small next to the hinge terms), and its anchors are the
    samples of ranks ``[BLOCK_A * i, BLOCK_A * (i + 1))``, so the positives of its anchors are one
    range of ranks, whatever the order of the labels. It builds the distance rows
    ``D[a, :]`` (``[BLOCK_A, BLOCK_N]``, the Gram identity ``sqrt(|a|^2 + |b|^2 - 2 a.b)`` from one
    ``tl.dot`` per ``BLOCK_K`` channels; ``D[i, i] = 0`` exactly), then for each positive rank ``j``
    of its labels the hinge row ``D[a, j] - D[a, k] + margin`` over the negatives ``k``, and
    accumulates, in fp32: the hinge sum and active count, and per pair the signed count that
    ``dL/dD`` needs (positive pair: its active negatives; negative pair: minus its active
    positives). It writes ``R = count / D`` (``[p, n, n]`` fp32, O(p n^2), only when a gradient is
    wanted) and its block's sums (hinge, active, positive and negative distances, pair counts).
    All ``n`` columns sit in one tile: the launcher takes it up to 256 samples (at 512 it spilled).
``triplet_rank_kernel`` + ``triplet_rows_tiled_kernel`` -- above 256 samples, any ``n`` (up to the
    launcher's int32 limit): the ranking once per batch (grid ``(cdiv(n, BLOCK_T),)``, the samples
    in label order, ``order [n]`` int32), then the same outputs as ``triplet_rows_kernel`` with
    the columns in tiles: per (block of anchors, part) the distances to its positive ranks
    ``BLOCK_P`` at a time (one chunk for any P x K batch with K <= 16), and for each chunk every
    ``[BLOCK_A, BLOCK_T]`` tile of columns as negatives. Registers do not grow with ``n``.
``triplet_finish_kernel`` -- grid ``(1,)``: the sums of every block, in a fixed order
    (deterministic): the loss (mean over parts of ``hinge_sum / (active + 1e-9)``), the info
    values, and per part the factor ``1 / (p * (active + 1e-9))`` the backward takes.
``triplet_grad_kernel`` -- grid ``(cdiv(n, BLOCK_B), p)``: ``dE_b = scale * (e_b * sum_j S[b, j] -
    sum_j S[b, j] e_j)`` with ``S = R + R^T``: one ``tl.dot`` per ``[BLOCK_J, BLOCK_K]`` tile; every
    element of the gradient is written once (no atomics).
``part_distance_kernel`` -- grid ``(cdiv(n, BLOCK_M), cdiv(m, BLOCK_N))``: probe x gallery
    distances, one ``[BLOCK_M, BLOCK_N]`` fp32 accumulator summed over parts, so ``[p, n, m]``
    never exists.

Precision. fp32 inputs: ``tl.dot(..., input_precision="ieee")`` (full fp32 products, what the
reference computes with TF32 off; never TF32, whose 10-bit mantissa would move evaluation
distances and flip triplets near the margin). bf16/fp16 inputs on a GPU (``DOT_NATIVE``):
the tensor cores on the 16-bit values (their products are exact in fp32, the accumulation is
fp32); in the interpreter (no 16-bit math) the tiles are cast to fp32 first.

Non-finite values. Distances keep NaN (``relu`` as ``where(x < 0, 0, x)``, not ``maximum``).
A NaN hinge term (NaN distance) counts as not active but goes into the hinge sum, so the loss
is NaN whenever a triplet it uses has a NaN distance, even when no triplet is active; ``R``
keeps NaN (``count / NaN``), so the gradient is NaN too.

Index math: one int64 base per part, int32 offsets inside it (the launchers check that a part's
rows and channels span < 2**31 elements, and ``n^2 < 2**31`` for ``R``); no ``%`` or ``//`` in
loops. Counts are int32 per block (``<= 16 n^2 / 4``), summed per part in int64.
"""
import triton
import triton.language as tl


@triton.jit
def _relu_keep_nan(x):
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _tile_dot(a, b_t, DOT_NATIVE: tl.constexpr):
    """``a [M, K] @ b_t [N, K]^T`` in fp32: the tensor cores on 16-bit inputs (``DOT_NATIVE``),
    else full fp32 products (IEEE, not TF32)."""
    if DOT_NATIVE:
        return tl.dot(a, tl.trans(b_t))
    return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), input_precision="ieee")


@triton.jit
def _gram_block(
    a_ptr,  # scalar base (int64 part offset already applied)
    a_offs,  # [BLOCK_M] int32 row offsets from a_ptr
    a_mask,  # [BLOCK_M]
    a_stride_c,
    b_ptr,
    b_offs,  # [BLOCK_N] int32
    b_mask,  # [BLOCK_N]
    b_stride_c,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
):
    """Inner products ``[BLOCK_M, BLOCK_N]`` and squared norms ``[BLOCK_M]``, ``[BLOCK_N]`` (fp32)."""
    offs_k = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_sq = tl.zeros((BLOCK_M,), tl.float32)
    b_sq = tl.zeros((BLOCK_N,), tl.float32)
    a_rows = a_ptr + a_offs  # [BLOCK_M] row pointers, built once
    b_rows = b_ptr + b_offs  # [BLOCK_N]
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k  # [BLOCK_K]
        mask_k = (ks < C)[None, :]
        a = tl.load(a_rows[:, None] + ks[None, :] * a_stride_c, mask=a_mask[:, None] & mask_k, other=0.0)
        b = tl.load(b_rows[:, None] + ks[None, :] * b_stride_c, mask=b_mask[:, None] & mask_k, other=0.0)
        dot += _tile_dot(a, b, DOT_NATIVE)
        a32 = a.to(tl.float32)  # [BLOCK_M, BLOCK_K]
        b32 = b.to(tl.float32)  # [BLOCK_N, BLOCK_K]
        a_sq += tl.sum(a32 * a32, axis=1)
        b_sq += tl.sum(b32 * b32, axis=1)
    return dot, a_sq, b_sq


@triton.jit
def _euclidean(dot, a_sq, b_sq):
    """``sqrt(relu(|a|^2 + |b|^2 - 2 a.b))`` for a Gram block (NaN stays NaN)."""
    return tl.sqrt_rn(_relu_keep_nan(a_sq[:, None] + b_sq[None, :] - 2.0 * dot))


@triton.jit
def triplet_rows_kernel(
    emb_ptr,
    labels_ptr,
    r_ptr,
    stats_ptr,
    counts_ptr,
    N,
    C,
    P,
    stride_en,
    stride_ec,
    stride_ep,
    margin,
    SAVE_R: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Batch-all triplet terms of one part for the anchors of ranks ``[BLOCK_A * i, BLOCK_A * (i + 1))``.

    Grid: ``(cdiv(N, BLOCK_A), P)``; ``NB = cdiv(N, BLOCK_A)``.

    Args:
        emb_ptr: embeddings ``[N, C, P]``, any float dtype, strides ``stride_e{n,c,p}`` (elements).
        labels_ptr: ``[N]`` integer labels, any order, contiguous.
        r_ptr: fp32 ``[P, N, N]`` out (when ``SAVE_R``), sample order: ``R[i, j] = G[i, j] / D[i, j]``
            (0 where ``D`` is 0), ``G`` the signed active counts of anchor ``i``'s row.
        stats_ptr: fp32 ``[3, P, NB]`` out: the block's hinge sum, sum of distances of positive pairs
            ``i != j``, of negative pairs.
        counts_ptr: int32 ``[P + 2, NB]`` out: the block's active triplets per part; rows ``P`` and
            ``P + 1`` (written by the part-0 programs): its positive pairs ``i != j`` and negative pairs.
        margin: the hinge margin (fp32).
        BLOCK_A >= 16 anchors; BLOCK_N >= max(N, 16) columns; BLOCK_K >= 16 channels per Gram step;
            BLOCK_R labels per step of the ranking. Powers of two.
    """
    block = tl.program_id(0)
    part = tl.program_id(1)
    margin = tl.cast(margin, tl.float32)
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] sample index of each column
    col_ok = cols < N
    col_label = tl.load(labels_ptr + cols, mask=col_ok, other=0)  # [BLOCK_N]

    # Rank of every sample in the stable sort by label.
    offs_r = tl.arange(0, BLOCK_R)
    col_rank = tl.zeros((BLOCK_N,), tl.int32)
    for j0 in range(0, N, BLOCK_R):
        js = j0 + offs_r  # [BLOCK_R]
        j_ok = js < N
        j_label = tl.load(labels_ptr + js, mask=j_ok, other=0)
        before = (j_label[None, :] < col_label[:, None]) | (
            (j_label[None, :] == col_label[:, None]) & (js[None, :] < cols[:, None])
        )  # [BLOCK_N, BLOCK_R]
        col_rank += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
    col_rank = tl.where(col_ok, col_rank, -1)

    # This program's anchors: the samples of ranks rank0 + [0, BLOCK_A).
    ranks = block * BLOCK_A + tl.arange(0, BLOCK_A)  # [BLOCK_A]
    row_ok = ranks < N
    is_anchor = col_rank[None, :] == ranks[:, None]  # [BLOCK_A, BLOCK_N]: one True per valid row
    anchor = tl.sum(tl.where(is_anchor, cols[None, :], 0), axis=1)  # [BLOCK_A] sample index
    anchor_label = tl.sum(tl.where(is_anchor, col_label[None, :], 0), axis=1)  # [BLOCK_A]

    part_base = emb_ptr + part.to(tl.int64) * stride_ep
    dot, a_sq, b_sq = _gram_block(
        part_base, anchor * stride_en, row_ok, stride_ec,
        part_base, cols * stride_en, col_ok, stride_ec,
        C, BLOCK_A, BLOCK_N, BLOCK_K, DOT_NATIVE,
    )  # fmt: skip
    self_pair = anchor[:, None] == cols[None, :]  # [BLOCK_A, BLOCK_N]
    dist = tl.where(self_pair, 0.0, _euclidean(dot, a_sq, b_sq))  # [BLOCK_A, BLOCK_N]

    pair_ok = row_ok[:, None] & col_ok[None, :]
    same = anchor_label[:, None] == col_label[None, :]
    positive = pair_ok & same  # [BLOCK_A, BLOCK_N] (the anchor itself included)
    negative = pair_ok & ~same

    # The positive ranks of this block's labels: [first rank with the first label, last rank with the last].
    first_label = tl.sum(tl.where(ranks == block * BLOCK_A, anchor_label, 0), axis=0)
    last_rank = tl.minimum(block * BLOCK_A + BLOCK_A, N) - 1
    last_label = tl.sum(tl.where(ranks == last_rank, anchor_label, 0), axis=0)
    j_start = tl.min(tl.where(col_ok & (col_label == first_label), col_rank, BLOCK_N), axis=0)
    j_end = tl.max(tl.where(col_ok & (col_label == last_label), col_rank, -1), axis=0) + 1

    hinge_sum = tl.zeros((BLOCK_A,), tl.float32)
    active_count = tl.zeros((BLOCK_A,), tl.int32)
    weight = tl.zeros((BLOCK_A, BLOCK_N), tl.float32)  # signed active counts (dL/dD up to a factor)
    for j in range(j_start, j_end):
        slot = positive & (col_rank == j)[None, :]  # [BLOCK_A, BLOCK_N]: at most one per row
        has_j = tl.max(slot.to(tl.int32), axis=1) > 0  # [BLOCK_A]
        pos_dist = tl.sum(tl.where(slot, dist, 0.0), axis=1)  # [BLOCK_A]: D[a, j]
        hinge = pos_dist[:, None] - dist + margin  # [BLOCK_A, BLOCK_N]
        valid = negative & has_j[:, None]
        active = valid & (hinge > 0.0)
        hinge_sum += tl.sum(tl.where(valid & ~(hinge <= 0.0), hinge, 0.0), axis=1)  # NaN terms kept
        active_here = tl.sum(active.to(tl.int32), axis=1)  # [BLOCK_A]
        active_count += active_here
        weight += tl.where(slot, active_here[:, None].to(tl.float32), 0.0) - active.to(tl.float32)

    if SAVE_R:
        ratio = tl.where(dist == 0.0, 0.0, weight / dist)  # NaN distances give NaN
        r_part = r_ptr + part.to(tl.int64) * N * N  # int64 base, int32 offsets inside the part
        tl.store(r_part + (anchor[:, None] * N + cols[None, :]), ratio, mask=pair_ok)

    nb = tl.num_programs(0)
    positive_other = positive & ~self_pair
    stat = stats_ptr + part * nb + block
    tl.store(stat, tl.sum(hinge_sum, axis=0))
    tl.store(stat + P * nb, tl.sum(tl.sum(tl.where(positive_other, dist, 0.0), axis=1), axis=0))
    tl.store(stat + 2 * P * nb, tl.sum(tl.sum(tl.where(negative, dist, 0.0), axis=1), axis=0))
    tl.store(counts_ptr + part * nb + block, tl.sum(active_count, axis=0))
    if part == 0:
        tl.store(counts_ptr + P * nb + block, tl.sum(tl.sum(positive_other.to(tl.int32), axis=1), axis=0))
        tl.store(counts_ptr + (P + 1) * nb + block, tl.sum(tl.sum(negative.to(tl.int32), axis=1), axis=0))


@triton.jit
def triplet_rank_kernel(labels_ptr, order_ptr, N, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """The batch in label order, for the tiled rows kernel: ``order[rank[i]] = i`` with
    ``rank[i] = #{j: y_j < y_i} + #{j < i: y_j == y_i}`` (the stable sort by label).

    Grid: ``(cdiv(N, BLOCK_T),)``: ``BLOCK_T`` samples per program, ranked against ``BLOCK_R``
    labels per step (O(n^2) integer compares in all, once per batch, not per part). Every element
    of ``order`` (int32 ``[N]``) is written once: the ranks are a permutation of ``0 .. N - 1``.
    """
    samples = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    ok = samples < N
    label = tl.load(labels_ptr + samples, mask=ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    rank = tl.zeros((BLOCK_T,), tl.int32)
    for j0 in range(0, N, BLOCK_R):
        js = j0 + offs_r  # [BLOCK_R]
        j_ok = js < N
        j_label = tl.load(labels_ptr + js, mask=j_ok, other=0)
        before = (j_label[None, :] < label[:, None]) | (
            (j_label[None, :] == label[:, None]) & (js[None, :] < samples[:, None])
        )  # [BLOCK_T, BLOCK_R]
        rank += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, samples, mask=ok)


@triton.jit
def triplet_rows_tiled_kernel(
    emb_ptr,
    labels_ptr,
    order_ptr,
    r_ptr,
    stats_ptr,
    counts_ptr,
    N,
    C,
    P,
    stride_en,
    stride_ec,
    stride_ep,
    margin,
    SAVE_R: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``triplet_rows_kernel`` for batches of any size: the columns in tiles.

    Grid: ``(cdiv(N, BLOCK_A), P)``; ``NB = cdiv(N, BLOCK_A)``. Same outputs as
    ``triplet_rows_kernel`` (``r_ptr``, ``stats_ptr``, ``counts_ptr``); ``order_ptr``: int32
    ``[N]``, the samples in label order (``triplet_rank_kernel``). The program's anchors are the
    samples of ranks ``[BLOCK_A * i, BLOCK_A * (i + 1))``; their positives the ranks
    ``[j_start, j_end)`` (every sample with a label between the first and the last anchor's), taken
    ``BLOCK_P`` ranks at a time (one chunk unless a block's labels hold more than ``BLOCK_P``
    samples). Per chunk: the ``[BLOCK_A, BLOCK_P]`` distances to those positives, then every column
    in ``[BLOCK_A, BLOCK_T]`` tiles (sample order) as negatives, the hinge terms of each positive of
    the chunk against the tile's negatives: the hinge sums, active counts and, per pair, the signed
    active counts. A negative pair's count is complete after the last chunk: earlier chunks leave
    the raw count (an integer, exact in fp32) in ``R``, the next adds to it (the same program, a
    barrier between chunks), the last writes ``count / D``; a positive pair's after its chunk.
    Every element of the program's ``R`` rows is written (finally) by one chunk. Distances of
    negative pairs are summed by the first chunk, of positive pairs by theirs.

    BLOCK_A >= 16 anchors, BLOCK_T >= 16 columns per tile, BLOCK_P >= 16 positives per chunk,
    BLOCK_K >= 16 channels per Gram step. Powers of two.
    """
    block = tl.program_id(0)
    part = tl.program_id(1)
    margin = tl.cast(margin, tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)

    # This program's anchors: the samples of ranks rank0 + [0, BLOCK_A).
    rank0 = block * BLOCK_A
    ranks = rank0 + tl.arange(0, BLOCK_A)  # [BLOCK_A]
    row_ok = ranks < N
    anchor = tl.load(order_ptr + ranks, mask=row_ok, other=0)  # [BLOCK_A] sample index
    anchor_label = tl.load(labels_ptr + anchor, mask=row_ok, other=0)  # [BLOCK_A]
    first_label = tl.load(labels_ptr + tl.load(order_ptr + rank0))
    last_label = tl.load(labels_ptr + tl.load(order_ptr + (tl.minimum(rank0 + BLOCK_A, N) - 1)))

    # Their positive ranks [j_start, j_end): the samples with a label < first_label come before,
    # those with a label <= last_label up to j_end.
    below = tl.zeros((BLOCK_T,), tl.int32)
    upto = tl.zeros((BLOCK_T,), tl.int32)
    for t0 in range(0, N, BLOCK_T):
        cols = t0 + offs_t
        col_ok = cols < N
        y = tl.load(labels_ptr + cols, mask=col_ok, other=0)
        below += (col_ok & (y < first_label)).to(tl.int32)
        upto += (col_ok & (y <= last_label)).to(tl.int32)
    j_start = tl.sum(below, axis=0)
    j_end = tl.sum(upto, axis=0)

    part_base = emb_ptr + part.to(tl.int64) * stride_ep
    a_offs = anchor * stride_en
    r_part = r_ptr + part.to(tl.int64) * N * N  # int64 base, int32 offsets inside the part
    hinge_sum = tl.zeros((BLOCK_A,), tl.float32)
    active_count = tl.zeros((BLOCK_A,), tl.int32)
    pos_sum = tl.zeros((BLOCK_A,), tl.float32)  # distances of positive pairs i != j
    neg_sum = tl.zeros((BLOCK_A,), tl.float32)
    pos_pairs = tl.zeros((BLOCK_A,), tl.int32)
    neg_pairs = tl.zeros((BLOCK_A,), tl.int32)
    for p0 in range(j_start, j_end, BLOCK_P):
        p_ranks = p0 + offs_p  # [BLOCK_P]
        p_ok = p_ranks < j_end
        p_cols = tl.load(order_ptr + p_ranks, mask=p_ok, other=0)  # [BLOCK_P] sample index
        p_label = tl.load(labels_ptr + p_cols, mask=p_ok, other=0)
        p_dot, p_a_sq, p_sq = _gram_block(
            part_base, a_offs, row_ok, stride_ec,
            part_base, p_cols * stride_en, p_ok, stride_ec,
            C, BLOCK_A, BLOCK_P, BLOCK_K, DOT_NATIVE,
        )  # fmt: skip
        p_self = anchor[:, None] == p_cols[None, :]
        p_dist = tl.where(p_self, 0.0, _euclidean(p_dot, p_a_sq, p_sq))  # [BLOCK_A, BLOCK_P]
        positive = row_ok[:, None] & p_ok[None, :] & (anchor_label[:, None] == p_label[None, :])
        # [1, BLOCK_T] flags, not scalars: the interpreter mistypes ``tile & scalar_bool`` (int32).
        p0_t = offs_t * 0 + p0
        first_chunk = (p0_t == j_start)[None, :]
        last_chunk = (p0_t + BLOCK_P >= j_end)[None, :]
        p_count = tl.minimum(j_end - p0, BLOCK_P)
        w_pos = tl.zeros((BLOCK_A, BLOCK_P), tl.float32)  # active negatives per positive pair
        for t0 in range(0, N, BLOCK_T):
            cols = t0 + offs_t  # [BLOCK_T] sample index
            col_ok = cols < N
            col_label = tl.load(labels_ptr + cols, mask=col_ok, other=0)
            dot, a_sq, b_sq = _gram_block(
                part_base, a_offs, row_ok, stride_ec,
                part_base, cols * stride_en, col_ok, stride_ec,
                C, BLOCK_A, BLOCK_T, BLOCK_K, DOT_NATIVE,
            )  # fmt: skip
            dist = _euclidean(dot, a_sq, b_sq)  # [BLOCK_A, BLOCK_T] (no self pair is a negative)
            negative = row_ok[:, None] & col_ok[None, :] & (anchor_label[:, None] != col_label[None, :])
            w_neg = tl.zeros((BLOCK_A, BLOCK_T), tl.float32)  # minus the active positives per negative pair
            for jj in range(0, p_count):
                slot = positive & (offs_p == jj)[None, :]  # [BLOCK_A, BLOCK_P]: at most one per row
                has_j = tl.max(slot.to(tl.int32), axis=1) > 0  # [BLOCK_A]
                pos_dist = tl.sum(tl.where(slot, p_dist, 0.0), axis=1)  # [BLOCK_A]: D[a, j]
                hinge = pos_dist[:, None] - dist + margin  # [BLOCK_A, BLOCK_T]
                valid = negative & has_j[:, None]
                active = valid & (hinge > 0.0)
                hinge_sum += tl.sum(tl.where(valid & ~(hinge <= 0.0), hinge, 0.0), axis=1)  # NaN terms kept
                active_here = tl.sum(active.to(tl.int32), axis=1)  # [BLOCK_A]
                active_count += active_here
                w_pos += tl.where(slot, active_here[:, None].to(tl.float32), 0.0)
                w_neg -= active.to(tl.float32)
            if SAVE_R:
                r_tile = r_part + (anchor[:, None] * N + cols[None, :])
                w_neg += tl.load(r_tile, mask=negative & ~first_chunk, other=0.0)  # the earlier chunks' counts
                ratio = tl.where(dist == 0.0, 0.0, w_neg / dist)  # NaN distances give NaN
                tl.store(r_tile, tl.where(last_chunk, ratio, w_neg), mask=negative)
            neg_sum += tl.sum(tl.where(negative & first_chunk, dist, 0.0), axis=1)
            neg_pairs += tl.sum((negative & first_chunk).to(tl.int32), axis=1)
        if SAVE_R:
            ratio = tl.where(p_dist == 0.0, 0.0, w_pos / p_dist)
            tl.store(r_part + (anchor[:, None] * N + p_cols[None, :]), ratio, mask=positive)
            tl.debug_barrier()  # the next chunk reads the counts this one stored (other threads')
        positive_other = positive & ~p_self
        pos_sum += tl.sum(tl.where(positive_other, p_dist, 0.0), axis=1)
        pos_pairs += tl.sum(positive_other.to(tl.int32), axis=1)

    nb = tl.num_programs(0)
    stat = stats_ptr + part * nb + block
    tl.store(stat, tl.sum(hinge_sum, axis=0))
    tl.store(stat + P * nb, tl.sum(pos_sum, axis=0))
    tl.store(stat + 2 * P * nb, tl.sum(neg_sum, axis=0))
    tl.store(counts_ptr + part * nb + block, tl.sum(active_count, axis=0))
    if part == 0:
        tl.store(counts_ptr + P * nb + block, tl.sum(pos_pairs, axis=0))
        tl.store(counts_ptr + (P + 1) * nb + block, tl.sum(neg_pairs, axis=0))


@triton.jit
def triplet_finish_kernel(
    stats_ptr,
    counts_ptr,
    loss_ptr,
    info_ptr,
    part_scale_ptr,
    P,
    NB,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """The reduction after ``triplet_rows_kernel``: one program, a fixed order (deterministic).

    Grid: ``(1,)``; ``[BLOCK_P, BLOCK_B]`` tiles of (parts, anchor blocks), ``BLOCK_B >= NB``.
    Per part: ``loss_p = hinge_sum / (active + 1e-9)`` (the hinge sum itself, 0 or NaN, without an
    active triplet) and ``part_scale[p] = 1 / ((active + 1e-9) * P)`` (or 0); then the means over parts.

    Args:
        stats_ptr, counts_ptr: the rows kernel's per-block sums (``[3, P, NB]`` fp32, ``[P + 2, NB]`` int32).
        loss_ptr: fp32 scalar out. info_ptr: fp32 ``[3]`` out: mean active count, mean distance of
            positive pairs ``i != j`` and of negative pairs (each averaged over parts).
        part_scale_ptr: fp32 ``[P]`` out.
    """
    offs_p = tl.arange(0, BLOCK_P)
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < NB
    pos_pairs = tl.sum(tl.load(counts_ptr + P * NB + offs_b, mask=b_ok, other=0), axis=0)
    neg_pairs = tl.sum(tl.load(counts_ptr + (P + 1) * NB + offs_b, mask=b_ok, other=0), axis=0)
    loss = 0.0
    active_total = 0.0
    pos_total = 0.0
    neg_total = 0.0
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + offs_p
        p_ok = parts < P
        tile = parts[:, None] * NB + offs_b[None, :]  # [BLOCK_P, BLOCK_B]
        mask = p_ok[:, None] & b_ok[None, :]
        hinge = tl.sum(tl.load(stats_ptr + tile, mask=mask, other=0.0), axis=1)  # [BLOCK_P]
        pos = tl.sum(tl.load(stats_ptr + P * NB + tile, mask=mask, other=0.0), axis=1)
        neg = tl.sum(tl.load(stats_ptr + 2 * P * NB + tile, mask=mask, other=0.0), axis=1)
        counts = tl.load(counts_ptr + tile, mask=mask, other=0).to(tl.int64)  # n^3 / 4 may pass 2**31
        active = tl.sum(counts, axis=1).to(tl.float32)
        inv_active = tl.where(active > 0.0, 1.0 / (active + 1e-9), 0.0)  # [BLOCK_P]
        part_loss = tl.where(active > 0.0, hinge * inv_active, hinge)  # hinge is 0 or NaN without actives
        tl.store(part_scale_ptr + parts, inv_active / P, mask=p_ok)
        loss += tl.sum(tl.where(p_ok, part_loss, 0.0), axis=0)
        active_total += tl.sum(active, axis=0)
        pos_total += tl.sum(pos, axis=0)
        neg_total += tl.sum(neg, axis=0)
    tl.store(loss_ptr, loss / P)
    tl.store(info_ptr, active_total / P)
    tl.store(info_ptr + 1, pos_total / tl.maximum(pos_pairs, 1).to(tl.float32) / P)
    tl.store(info_ptr + 2, neg_total / tl.maximum(neg_pairs, 1).to(tl.float32) / P)


@triton.jit
def triplet_grad_kernel(
    emb_ptr,
    r_ptr,
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
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``d loss / d embeddings`` for one part and ``BLOCK_B`` samples (sample order).

    Grid: ``(cdiv(N, BLOCK_B), P)``. With ``S = R + R^T`` (``R`` from the rows kernel) and
    ``scale = grad_loss * part_scale[part]``: ``dE_b = scale * (e_b * sum_j S[b, j] - sum_j S[b, j] e_j)``,
    for ``BLOCK_K`` channels at a time, looping over ``BLOCK_J`` columns (one fp32 IEEE ``tl.dot``
    each). Every element of ``grad_emb`` (embeddings' dtype, strides ``stride_g{n,c,p}``) is
    written exactly once.
    """
    part = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < N
    offs_j = tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    scale = tl.load(part_scale_ptr + part) * tl.load(grad_loss_ptr).to(tl.float32)
    r_part = r_ptr + part.to(tl.int64) * N * N  # int64 base; int32 offsets inside the part
    e_part = emb_ptr + part.to(tl.int64) * stride_ep
    g_part = grad_emb_ptr + part.to(tl.int64) * stride_gp

    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k  # [BLOCK_K]
        mask_k = ks < C
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)  # sum_j S[b, j] e_j
        row_sum = tl.zeros((BLOCK_B,), tl.float32)  # sum_j S[b, j]
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + offs_j  # [BLOCK_J]
            col_ok = cols < N
            pair_ok = row_ok[:, None] & col_ok[None, :]
            r_bj = tl.load(r_part + rows[:, None] * N + cols[None, :], mask=pair_ok, other=0.0)
            r_jb = tl.load(r_part + cols[None, :] * N + rows[:, None], mask=pair_ok, other=0.0)
            s = r_bj + r_jb  # [BLOCK_B, BLOCK_J]
            e_cols = tl.load(
                e_part + (cols[:, None] * stride_en + ks[None, :] * stride_ec),
                mask=col_ok[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_J, BLOCK_K]
            acc += tl.dot(s, e_cols, input_precision="ieee")
            row_sum += tl.sum(s, axis=1)
        mask = row_ok[:, None] & mask_k[None, :]
        e_b = tl.load(e_part + (rows[:, None] * stride_en + ks[None, :] * stride_ec), mask=mask, other=0.0)
        grad = scale * (row_sum[:, None] * e_b.to(tl.float32) - acc)
        g_offs = rows[:, None] * stride_gn + ks[None, :] * stride_gc
        tl.store(g_part + g_offs, grad.to(grad_emb_ptr.dtype.element_ty), mask=mask)


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
    DOT_NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Distance per part, averaged over parts: ``probe [N, C, P]``, ``gallery [M, C, P]`` -> ``out [N, M]``.

    Grid: ``(cdiv(N, BLOCK_M), cdiv(M, BLOCK_N))``. One ``[BLOCK_M, BLOCK_N]`` fp32 accumulator
    summed over the parts. ``COSINE``: ``1 - a.b / (max(|a|, 1e-12) max(|b|, 1e-12))``
    (``F.normalize``'s floor); otherwise Euclidean. ``out`` is fp32, contiguous. NaN/inf in an
    input make its distances NaN/inf (as the reference).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    col_ok = cols < M
    a_offs = rows * stride_an  # int32 offsets inside one part (the launcher checks n * c < 2**31)
    b_offs = cols * stride_bn
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_part = probe_ptr  # the part's base pointer (64-bit), advanced one part per iteration
    b_part = gallery_ptr
    for _ in range(P):
        dot, a_sq, b_sq = _gram_block(
            a_part, a_offs, row_ok, stride_ac,
            b_part, b_offs, col_ok, stride_bc,
            C, BLOCK_M, BLOCK_N, BLOCK_K, DOT_NATIVE,
        )  # fmt: skip
        a_part += stride_ap
        b_part += stride_bp
        if COSINE:
            a_norm = tl.sqrt(a_sq)
            b_norm = tl.sqrt(b_sq)
            a_norm = tl.where(a_norm < 1e-12, 1e-12, a_norm)
            b_norm = tl.where(b_norm < 1e-12, 1e-12, b_norm)
            total += 1.0 - dot / (a_norm[:, None] * b_norm[None, :])
        else:
            total += _euclidean(dot, a_sq, b_sq)
    out_block = out_ptr + (tl.program_id(0) * BLOCK_M).to(tl.int64) * M  # int64 base of the row block
    out_offs = (rows - tl.program_id(0) * BLOCK_M)[:, None] * M + cols[None, :]  # int32 inside it
    tl.store(out_block + out_offs, total / P, mask=row_ok[:, None] & col_ok[None, :])
