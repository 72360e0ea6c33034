"""Triton kernels of the fused MLA op (fused_ops.md §1; the launchers live in ``fastgait.ops.mla``).

Notation (blocks.md): ``x [n, c_in, t, h, w]``, ``F = W_l * X``, ``G = W_g * X``,
``P0 = W_l * (X*M0)`` with ``M0`` the band ``[band_start, band_start + band_rows)`` of rows.
Output row ``r`` of a 3-row kernel reads input rows ``r-1..r+1``; it is a *boundary row* when
those rows (on the map) hold both band and non-band rows. Only the candidates
``start-1, start, end-1, end`` can be boundary rows; a sample's candidates are its four
*slots*. Everything about the band is recomputed in-kernel from ``band_start``; nothing
mask-shaped exists in memory.

Layouts. Weights are packed by the launcher as ``[3 (kh), 3 (kt), 3 (kw), c_src, n_cols]``
(the *forward pack*), so one kernel row is a contiguous ``[9*c_src, n_cols]`` B matrix whose
K index runs over ``(kt, kw, c)``; the *dgrad pack* is the same for the flipped, transposed
kernel.
Per-slot buffers (``P0`` rows, ``delta`` rows) are ``[n, 4, t, w, c]``. Activations use any
strides (contiguous or channels-last-3d): every kernel takes them explicitly.

What the backward needs of the forward is only ``a'(.)`` of each pre-activation, so the forward
saves one byte per element of ``[G; F]``, the *gates*: bit ``POSITIVE`` is ``G > 0`` on global
channels and ``F' > 0`` on local ones, where ``F' = F - P0`` (= ``P1``) on boundary rows and
``F`` elsewhere; bit ``BAND_POSITIVE`` (local channels, boundary rows) is ``P0 > 0``.

All accumulation is fp32 (``tl.dot`` with an fp32 accumulator); loads keep the storage
dtype so bf16/fp16 run on tensor cores; stores cast back to the output's dtype.
"""
import triton
import triton.language as tl

POSITIVE = tl.constexpr(1)  # gate bit: the saved pre-activation (G, or F') is > 0
BAND_POSITIVE = tl.constexpr(2)  # gate bit, local channels on boundary rows: P0 > 0

# ----------------------------------------------------------------------------------------
# Helpers: activation, band geometry, one kernel row of taps
# ----------------------------------------------------------------------------------------


@triton.jit
def _lrelu(v, negative_slope):
    return tl.where(v > 0, v, v * negative_slope)


@triton.jit
def _slope_of(gates, BIT: tl.constexpr, negative_slope):
    """``a'(v)`` from the gate bit ``v > 0``; ``a'(0) = negative_slope`` as in PyTorch's backward."""
    return tl.where((gates & BIT) != 0, 1.0, negative_slope)


@triton.jit
def _in_band(row, band_start, band_rows):
    return (row >= band_start) & (row < band_start + band_rows)


@triton.jit
def _is_boundary_row(row, band_start, band_rows, height):
    """Whether output ``row`` reads band and non-band input rows (rows off the map are padding)."""
    band_end = band_start + band_rows
    first = tl.maximum(row - 1, 0)
    last = tl.minimum(row + 1, height - 1)
    reads_band = tl.maximum(first, band_start) <= tl.minimum(last, band_end - 1)  # rows read meet the band
    reads_rest = (first < band_start) | (last >= band_end)
    return reads_band & reads_rest & (row >= 0) & (row < height)


@triton.jit
def _candidate_slot(row, band_start, band_rows):
    """Slot of a boundary ``row`` among ``(start-1, start, end-1, end)`` (the first match)."""
    band_end = band_start + band_rows
    return tl.where(row == band_start - 1, 0, tl.where(row == band_start, 1, tl.where(row == band_end - 1, 2, 3)))


@triton.jit
def _candidate_row(slot, band_start, band_rows):
    """Row of ``slot``: ``start-1, start, end-1, end`` for slots 0..3."""
    return band_start - 1 + slot + (slot // 2) * (band_rows - 2)


@triton.jit
def _slot_is_live(slot, band_start, band_rows, height):
    """Slot holds a boundary row, and not the same row as an earlier slot (``end-1 == start``)."""
    # A tensor even for a static slot index: in the interpreter, an int1 tensor `&` a Python
    # bool gives int32, which load/store masks reject.
    slot = slot + band_start * 0
    row = _candidate_row(slot, band_start, band_rows)
    repeat = (slot == 2) & (row == band_start)
    return _is_boundary_row(row, band_start, band_rows, height) & (repeat == 0)


@triton.jit
def _sample_tile(T, H, W, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of a per-sample program: ``BLOCK_M`` positions ``(t, h, w)`` of sample ``n`` by
    ``BLOCK_N`` channels out of ``C``. Grid ``(cdiv(T*H*W, BLOCK_M), cdiv(C, BLOCK_N), n)``.

    A tile never crosses a sample, so the sample is one scalar (its int64 base offset is taken
    once, ``n * stride_n``) and every in-sample coordinate is int32 (the launcher checks that a
    sample spans < 2**31 elements): no int64 division anywhere.
    Returns ``n`` (scalar), ``t, h, w, m_ok [BM]`` (int32), ``offs_c, c_ok [BN]``.
    """
    n = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    plane = H * W
    t = offs_m // plane
    rest = offs_m - t * plane
    h = rest // W
    w = rest - h * W
    offs_c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return n, t, h, w, offs_m < T * plane, offs_c, offs_c < C


@triton.jit
def _row_tile(T, W, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of a per-row program (grid axes 1, 2): ``BLOCK_M`` positions ``(t, w)`` of one
    row by ``BLOCK_N`` channels out of ``C``, all int32. Returns ``t, w, m_ok [BM], offs_c, c_ok [BN]``."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = offs_m // W
    return t, offs_m - t * W, offs_m < T * W, offs_c, offs_c < C


@triton.jit
def _offset_bits(low_ok, high_ok):
    """3-bit set of the offsets ``-1, 0, +1`` along one axis that stay inside: bit ``d + 1``."""
    return low_ok.to(tl.int32) | 2 | (high_ok.to(tl.int32) << 2)


@triton.jit
def _spread_bits(bits, GAP: tl.constexpr):
    """Move bits 0, 1, 2 to 0, GAP, 2*GAP; ``_spread_bits(a, 3) * b`` is the 9-bit set of pairs."""
    return (bits & 1) | ((bits & 2) << (GAP - 1)) | ((bits & 4) << (2 * GAP - 2))


@triton.jit
def _accumulate_row_taps(
    acc,
    src_ptr,
    w_ptr,
    pos,
    t,
    w,
    row_ok,
    cols,
    col_ok,
    T,
    W,
    C_src,
    n_cols,
    stride_c,
    stride_t,
    stride_w,
    BLOCK_K: tl.constexpr,
):
    """One kernel row ``kh`` of an implicit-GEMM convolution: K = the 9 taps ``(kt, kw)`` x ``C_src``.

    acc: ``[BLOCK_M, BLOCK_N]`` fp32 accumulator (one ``tl.dot`` per K block over all its columns).
    src_ptr: one sample's base pointer; ``pos [BLOCK_M]`` (int32) is the offset of ``(t, source
    row, w)`` for each output position, ``t``/``w [BLOCK_M]`` its frame and column, ``row_ok
    [BLOCK_M]`` whether the source row is read at all (on the map, in the band, ...).
    w_ptr: the kernel row's slice ``[3 (kt), 3 (kw), C_src, n_cols]`` of a pack; cols,
    col_ok ``[BLOCK_N]``: the pack's columns. K runs flat over ``(kt, kw, c)``, so small channel
    counts waste no padding; with ``BLOCK_K | C_src`` a K block stays within one tap.
    """
    # Bit kt*3 + kw of taps_ok: tap (kt, kw) reads inside the map, so a K block's mask is one
    # shift per element instead of bounds tests on 2-D frame and column indices.
    taps_ok = _spread_bits(_offset_bits(t > 0, t < T - 1), 3) * _offset_bits(w > 0, w < W - 1)  # [BM]
    taps_ok = tl.where(row_ok, taps_ok, 0)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, 9 * C_src, BLOCK_K):
        k = k0 + offs_k  # [BK] flat (kt, kw, c), int32
        k_ok = k < 9 * C_src
        tap = k // C_src
        a_ok = (((taps_ok[:, None] >> tap[None, :]) & 1) != 0) & k_ok[None, :]  # [BM, BK]
        k_shift = (tap // 3 - 1) * stride_t + (tap % 3 - 1) * stride_w + (k - tap * C_src) * stride_c  # [BK]
        a = tl.load(src_ptr + (pos[:, None] + k_shift[None, :]), mask=a_ok, other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + (k[:, None] * n_cols + cols[None, :]), mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _boundary_slots(t, h, w, offs_c, mask, band_start, band_rows, H, stride_0s, stride_0t, stride_0w, stride_0c):
    """For a ``[BM, BN]`` tile of one sample at positions ``(t, h, w) [BM]`` and channels ``offs_c
    [BN]``: ``boundary [BM, BN]`` (the element is on a boundary row, inside ``mask``) and its
    offsets in the sample's per-slot rows ``[4, T, W, C]`` (strides ``stride_0*``)."""
    boundary = _is_boundary_row(h, band_start, band_rows, H)[:, None] & mask
    slot = _candidate_slot(h, band_start, band_rows)  # [BM]
    slot_pos = slot * stride_0s + t * stride_0t + w * stride_0w  # [BM]
    return boundary, slot_pos[:, None] + offs_c[None, :] * stride_0c


@triton.jit
def _mla_epilogue(
    glob,
    full,
    band_part,
    boundary,
    t,
    h,
    w,
    mask,
    offs_c,
    H,
    C_out,
    negative_slope,
    y_ptr,
    stride_yc,
    stride_yt,
    stride_yh,
    stride_yw,
    gate_ptr,
    stride_gc,
    stride_gt,
    stride_gh,
    stride_gw,
    HAS_GLOBAL: tl.constexpr,
    HAS_BAND: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
):
    """lrelu, the pair sum on boundary rows and the add/concat fusion; stores Y and the gates.

    glob, full, band_part: ``[BM, BN]`` fp32 ``G``, ``F``, ``P0`` (``band_part`` is used on
    ``boundary [BM, BN]`` only); t, h, w: ``[BM]`` output position in the sample; mask ``[BM, BN]``;
    offs_c ``[BN]``. y_ptr: the sample's ``[C_out, T, H or 2H, W]``; gate_ptr: its ``[n_cols, T, H,
    W]`` uint8 gates.
    """
    local = _lrelu(full, negative_slope)
    local_gates = tl.where(full > 0, POSITIVE, 0)
    if HAS_BAND:
        rest_part = full - band_part  # P1 = F - P0
        local = tl.where(boundary, _lrelu(band_part, negative_slope) + _lrelu(rest_part, negative_slope), local)
        pair_gates = tl.where(rest_part > 0, POSITIVE, 0) | tl.where(band_part > 0, BAND_POSITIVE, 0)
        local_gates = tl.where(boundary, pair_gates, local_gates)
    local_cols = offs_c + C_out if HAS_GLOBAL else offs_c
    gate_offs = (t * stride_gt + h * stride_gh + w * stride_gw)[:, None]  # [BM, 1]
    tl.store(gate_ptr + (gate_offs + local_cols[None, :] * stride_gc), local_gates.to(tl.uint8), mask=mask)

    y_offs = (t * stride_yt + h * stride_yh + w * stride_yw)[:, None] + offs_c[None, :] * stride_yc
    if HAS_GLOBAL:
        glob_gates = tl.where(glob > 0, POSITIVE, 0).to(tl.uint8)
        tl.store(gate_ptr + (gate_offs + offs_c[None, :] * stride_gc), glob_gates, mask=mask)
        glob_act = _lrelu(glob, negative_slope)
        if FUSE_CONCAT:  # global rows [0, H), local rows [H, 2H)
            tl.store(y_ptr + y_offs, glob_act.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(y_ptr + (y_offs + H * stride_yh), local.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptr + y_offs, (glob_act + local).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + y_offs, local.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Forward, design (a): implicit-GEMM convolution with the fused epilogue
# ----------------------------------------------------------------------------------------


@triton.jit
def mla_forward_gemm_kernel(
    x_ptr,
    w_ptr,
    band_ptr,
    y_ptr,
    gate_ptr,
    T,
    H,
    W,
    C_in,
    C_out,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yt,
    stride_yh,
    stride_yw,
    stride_gn,
    stride_gc,
    stride_gt,
    stride_gh,
    stride_gw,
    band_rows,
    negative_slope,
    HAS_GLOBAL: tl.constexpr,
    HAS_BAND: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y and the gates of the MLA block in one pass over X.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``; a program owns ``BLOCK_M`` output
    positions of one sample and ``BLOCK_N`` output channels of both branches. With a global
    weight the pack's columns interleave the branches (column ``2*o + b``: ``b = 0`` global,
    ``1`` local), so one ``tl.dot`` ``2*BLOCK_N`` wide computes ``G`` and ``F`` from each loaded
    X tile, and the epilogue splits the pairs.

    x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); w_ptr: forward pack ``[3, 3, 3, C_in,
    n_cols]``, ``n_cols = 2*C_out`` (interleaved ``[W_g; W_l]``) or ``C_out``; band_ptr ``[n]``
    int band starts (unused without ``HAS_BAND``); y_ptr ``[n, C_out, T, H or 2H, W]``;
    gate_ptr ``[n, 2*C_out or C_out, T, H, W]`` uint8 (global channels first; strides
    ``stride_g*``). band_rows: rows in the band; negative_slope: the LeakyReLU's.

    ``P0`` needs no second pass: the band mask is constant over a kernel row, so the
    contribution of row ``kh`` goes to ``F`` always and to ``P0`` when input row ``h + kh - 1``
    is in the band: three masked tile adds per tile.
    """
    slope = tl.cast(negative_slope, tl.float32)
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_out, BLOCK_M, BLOCK_N)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    if HAS_GLOBAL:
        n_cols = 2 * C_out
        cols = tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        full = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    else:
        n_cols = C_out
        cols = offs_c
        full = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    col_ok = cols < n_cols
    band_part = full
    if HAS_BAND:
        band_start = tl.load(band_ptr + n).to(tl.int32)
    for kh in tl.static_range(3):
        row = h + (kh - 1)
        row_ok = m_ok & (row >= 0) & (row < H)
        pos = t * stride_xt + row * stride_xh + w * stride_xw
        w_row = w_ptr + kh * 9 * C_in * n_cols
        if HAS_BAND:
            tap = _accumulate_row_taps(
                tl.zeros_like(full), x_base, w_row, pos, t, w, row_ok, cols, col_ok,
                T, W, C_in, n_cols, stride_xc, stride_xt, stride_xw, BLOCK_K,
            )  # fmt: skip
            full += tap
            band_part += tl.where(_in_band(row, band_start, band_rows)[:, None], tap, 0.0)
        else:
            full = _accumulate_row_taps(
                full, x_base, w_row, pos, t, w, row_ok, cols, col_ok,
                T, W, C_in, n_cols, stride_xc, stride_xt, stride_xw, BLOCK_K,
            )  # fmt: skip

    glob = full
    if HAS_GLOBAL:  # de-interleave the (global, local) column pairs
        glob, full = tl.split(tl.reshape(full, (BLOCK_M, BLOCK_N, 2)))
        if HAS_BAND:
            _, band_part = tl.split(tl.reshape(band_part, (BLOCK_M, BLOCK_N, 2)))
    mask = m_ok[:, None] & c_ok[None, :]
    boundary = mask
    if HAS_BAND:
        boundary = _is_boundary_row(h, band_start, band_rows, H)[:, None] & mask
    _mla_epilogue(
        glob, full, band_part, boundary, t, h, w, mask, offs_c, H, C_out, slope,
        y_ptr + n.to(tl.int64) * stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
        gate_ptr + n.to(tl.int64) * stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
        HAS_GLOBAL, HAS_BAND, FUSE_CONCAT,
    )  # fmt: skip


@triton.jit
def conv3x3x3_kernel(
    src_ptr,
    w_ptr,
    out_ptr,
    T,
    H,
    W,
    C_src,
    C_dst,
    stride_sn,
    stride_sc,
    stride_st,
    stride_sh,
    stride_sw,
    stride_on,
    stride_oc,
    stride_ot,
    stride_oh,
    stride_ow,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Plain 3x3x3 'same' convolution (design (a)'s dgrad, with the flipped transposed pack).

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_dst, BLOCK_N), n)``. src_ptr ``[n, C_src, T, H, W]``
    (strides ``stride_s*``); w_ptr: pack ``[3, 3, 3, C_src, C_dst]``; out_ptr ``[n, C_dst, T, H, W]``
    (strides ``stride_o*``), written once.
    """
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_dst, BLOCK_M, BLOCK_N)
    src_base = src_ptr + n.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(3):
        row = h + (kh - 1)
        row_ok = m_ok & (row >= 0) & (row < H)
        pos = t * stride_st + row * stride_sh + w * stride_sw
        acc = _accumulate_row_taps(
            acc, src_base, w_ptr + kh * 9 * C_src * C_dst, pos, t, w, row_ok, offs_c, c_ok,
            T, W, C_src, C_dst, stride_sc, stride_st, stride_sw, BLOCK_K,
        )  # fmt: skip
    out_offs = (t * stride_ot + h * stride_oh + w * stride_ow)[:, None] + offs_c[None, :] * stride_oc
    out_base = out_ptr + n.to(tl.int64) * stride_on
    tl.store(out_base + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def conv3x3x3_wgrad_kernel(
    x_ptr,
    grad_ptr,
    band_ptr,
    out_ptr,
    tiles,
    tiles_per_split,
    SLOTS,
    T,
    H,
    W,
    C_in,
    C_grad,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    stride_gn,
    stride_gc,
    stride_gt,
    stride_gs,
    stride_gw,
    band_rows,
    BAND_EDGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weight gradient of a 3x3x3 'same' convolution, as per-split partial sums (no atomics).

    ``out[split, o, k] = sum over positions p of the split: grad[p, o] * src[p + tap(k), c(k)]``
    with ``k`` flat over ``(kt, kh, kw, c)`` (an implicit im2col of X as the GEMM's B operand).
    Positions are the rows ``(n, slot)`` (``n*SLOTS`` of them), each cut into
    ``cdiv(T*W, BLOCK_M)`` tiles of ``(t, w)`` positions; ``tiles`` counts them all and each split
    reduces ``tiles_per_split`` consecutive ones. A tile lies in one row of one sample: its
    sample, slot and band are scalars, its coordinates int32. Grid: ``(cdiv(C_grad, BLOCK_O) *
    cdiv(27*C_in, BLOCK_K), splits)``.

    - ``BAND_EDGES=False``: the full convolution; slot = output row (``SLOTS = H``), ``src = X``.
    - ``BAND_EDGES=True``: the delta term ``(X*M0) * delta``; slot = boundary slot
      (``SLOTS = 4``, dead slots skipped), source rows outside the band read as 0.

    x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); grad_ptr: ``[n, C_grad, T, SLOTS, W]``
    in strides ``stride_g*`` (``gpre``, or the ``[n, 4, T, W, C]`` delta rows re-strided);
    band_ptr ``[n]``; out_ptr: fp32 ``[splits, C_grad, 27*C_in]`` contiguous.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k_blocks = tl.cdiv(27 * C_in, BLOCK_K)
    o_block = pid // k_blocks
    offs_o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    o_ok = offs_o < C_grad
    k = (pid - o_block * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] flat (kt, kh, kw, c)
    k_ok = k < 27 * C_in
    tap = k // C_in
    k_shift = (tap // 9 - 1) * stride_xt + ((tap // 3) % 3 - 1) * stride_xh + (tap % 3 - 1) * stride_xw
    k_shift += (k - tap * C_in) * stride_xc  # [BK]

    row_tiles = tl.cdiv(T * W, BLOCK_M)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    q_begin = split * tiles_per_split
    q_end = tl.minimum(q_begin + tiles_per_split, tiles)
    for q in range(q_begin, q_end):
        row_id = q // row_tiles  # scalar int32: the (n, slot) row, then the tile within it
        chunk = q - row_id * row_tiles
        n = row_id // SLOTS
        slot = row_id - n * SLOTS
        offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] (t, w) positions of the row
        m_ok = offs_m < T * W
        t = offs_m // W
        w = offs_m - t * W
        if BAND_EDGES:
            band_start = tl.load(band_ptr + n).to(tl.int32)
            row = _candidate_row(slot, band_start, band_rows)
            live = _slot_is_live(slot, band_start, band_rows, H).to(tl.int32)  # scalar
            grad_ok = (m_ok.to(tl.int32) * live) != 0  # (vector & scalar bool is int32 in the interpreter)
            row_bits = _in_band(row - 1, band_start, band_rows).to(tl.int32)  # X*M0: band rows only
            row_bits |= _in_band(row, band_start, band_rows).to(tl.int32) << 1
            row_bits |= _in_band(row + 1, band_start, band_rows).to(tl.int32) << 2
            row_bits &= _offset_bits(row > 0, row < H - 1)
        else:
            row = slot
            grad_ok = m_ok
            row_bits = _offset_bits(row > 0, row < H - 1)
        # Bit kt*9 + kh*3 + kw: tap (kt, kh, kw) reads a source element inside the map (and band).
        taps_ok = _spread_bits(_offset_bits(t > 0, t < T - 1), 9) * (
            _spread_bits(row_bits, 3) * _offset_bits(w > 0, w < W - 1)
        )
        taps_ok = tl.where(grad_ok, taps_ok, 0)  # [BM]
        grad_base = grad_ptr + n.to(tl.int64) * stride_gn
        grad = tl.load(
            grad_base + ((slot * stride_gs + t * stride_gt + w * stride_gw)[:, None] + offs_o[None, :] * stride_gc),
            mask=grad_ok[:, None] & o_ok[None, :],
            other=0.0,
        )  # [BM, BO]
        src_ok = (((taps_ok[:, None] >> tap[None, :]) & 1) != 0) & k_ok[None, :]  # [BM, BK]
        x_base = x_ptr + n.to(tl.int64) * stride_xn
        x_pos = t * stride_xt + row * stride_xh + w * stride_xw  # [BM]
        src = tl.load(x_base + (x_pos[:, None] + k_shift[None, :]), mask=src_ok, other=0.0)  # [BM, BK]
        acc = tl.dot(tl.trans(grad), src, acc)  # [BO, BK]
    out_offs = (split * C_grad + offs_o).to(tl.int64)[:, None] * (27 * C_in) + k[None, :]
    tl.store(out_ptr + out_offs, acc, mask=o_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------
# Design (b): after the vendor convolution, P0 on the boundary rows, then the epilogue
# ----------------------------------------------------------------------------------------


@triton.jit
def mla_boundary_p0_kernel(
    x_ptr,
    w_ptr,
    band_ptr,
    p0_ptr,
    T,
    H,
    W,
    C_in,
    C_out,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    stride_0n,
    stride_0s,
    stride_0t,
    stride_0w,
    stride_0c,
    band_rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``P0 = W_l * (X*M0)`` on each sample's boundary rows, straight from X.

    Grid: ``(n*4, cdiv(T*W, BLOCK_M), cdiv(C_out, BLOCK_N))``: one boundary slot per program
    row; dead slots do nothing. Only the kernel rows whose input row is in the band are summed.
    x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); w_ptr: forward pack of ``W_l``,
    ``[3, 3, 3, C_in, C_out]``; band_ptr ``[n]``; p0_ptr ``[n, 4, T, W, C_out]`` fp32 (strides
    ``stride_0*``), so ``F - P0`` loses nothing to a bf16 P0.
    """
    pid_row = tl.program_id(0)
    n = pid_row // 4
    slot = pid_row - n * 4
    band_start = tl.load(band_ptr + n).to(tl.int32)
    if _slot_is_live(slot, band_start, band_rows, H):
        row = _candidate_row(slot, band_start, band_rows)
        t, w, m_ok, offs_c, c_ok = _row_tile(T, W, C_out, BLOCK_M, BLOCK_N)
        x_base = x_ptr + n.to(tl.int64) * stride_xn
        band_part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kh in tl.static_range(3):
            src_row = row + (kh - 1)
            if _in_band(src_row, band_start, band_rows):
                pos = t * stride_xt + src_row * stride_xh + w * stride_xw
                band_part = _accumulate_row_taps(
                    band_part, x_base, w_ptr + kh * 9 * C_in * C_out, pos, t, w, m_ok, offs_c, c_ok,
                    T, W, C_in, C_out, stride_xc, stride_xt, stride_xw, BLOCK_K,
                )  # fmt: skip
        p0_offs = (slot * stride_0s + t * stride_0t + w * stride_0w)[:, None] + offs_c[None, :] * stride_0c
        tl.store(
            p0_ptr + n.to(tl.int64) * stride_0n + p0_offs,
            band_part.to(p0_ptr.dtype.element_ty),
            mask=m_ok[:, None] & c_ok[None, :],
        )


@triton.jit
def mla_epilogue_kernel(
    pre_ptr,
    p0_ptr,
    band_ptr,
    y_ptr,
    gate_ptr,
    T,
    H,
    W,
    C_out,
    stride_pn,
    stride_pc,
    stride_pt,
    stride_ph,
    stride_pw,
    stride_0n,
    stride_0s,
    stride_0t,
    stride_0w,
    stride_0c,
    stride_yn,
    stride_yc,
    stride_yt,
    stride_yh,
    stride_yw,
    stride_gn,
    stride_gc,
    stride_gt,
    stride_gh,
    stride_gw,
    band_rows,
    negative_slope,
    HAS_GLOBAL: tl.constexpr,
    HAS_BAND: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The MLA epilogue over ``pre = [G; F]`` from the vendor convolution and the P0 rows.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``.
    pre_ptr ``[n, n_cols, T, H, W]`` (strides ``stride_p*``); p0_ptr ``[n, 4, T, W, C_out]``
    (live slots read); band_ptr ``[n]``; y_ptr ``[n, C_out, T, H or 2H, W]`` and gate_ptr
    ``[n, n_cols, T, H, W]`` uint8, each written once.
    """
    slope = tl.cast(negative_slope, tl.float32)
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_out, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    local_cols = offs_c + C_out if HAS_GLOBAL else offs_c
    pre_base = pre_ptr + n.to(tl.int64) * stride_pn
    pre_offs = (t * stride_pt + h * stride_ph + w * stride_pw)[:, None]
    full = tl.load(pre_base + (pre_offs + local_cols[None, :] * stride_pc), mask=mask, other=0.0).to(tl.float32)
    glob = full
    if HAS_GLOBAL:
        glob = tl.load(pre_base + (pre_offs + offs_c[None, :] * stride_pc), mask=mask, other=0.0).to(tl.float32)
    boundary = mask
    band_part = full
    if HAS_BAND:
        band_start = tl.load(band_ptr + n).to(tl.int32)
        boundary, p0_offs = _boundary_slots(
            t, h, w, offs_c, mask, band_start, band_rows, H, stride_0s, stride_0t, stride_0w, stride_0c
        )
        band_part = tl.load(p0_ptr + n.to(tl.int64) * stride_0n + p0_offs, mask=boundary, other=0.0).to(tl.float32)
    _mla_epilogue(
        glob, full, band_part, boundary, t, h, w, mask, offs_c, H, C_out, slope,
        y_ptr + n.to(tl.int64) * stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
        gate_ptr + n.to(tl.int64) * stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
        HAS_GLOBAL, HAS_BAND, FUSE_CONCAT,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Backward, shared by both designs: the gated gradient, and the delta terms
# ----------------------------------------------------------------------------------------


@triton.jit
def mla_gated_grad_kernel(
    grad_ptr,
    gate_ptr,
    band_ptr,
    gpre_ptr,
    delta_ptr,
    T,
    H,
    W,
    C_out,
    stride_yn,
    stride_yc,
    stride_yt,
    stride_yh,
    stride_yw,
    stride_gn,
    stride_gc,
    stride_gt,
    stride_gh,
    stride_gw,
    stride_qn,
    stride_qc,
    stride_qt,
    stride_qh,
    stride_qw,
    stride_dn,
    stride_ds,
    stride_dt,
    stride_dw,
    stride_dc,
    band_rows,
    negative_slope,
    HAS_GLOBAL: tl.constexpr,
    HAS_BAND: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``gpre = [g_G * a'(G); g_L * a'(F')]`` everywhere, ``delta = g_L * (a'(P0) - a'(F - P0))`` on boundary rows.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``.
    grad_ptr: upstream gradient ``[n, C_out, T, H or 2H, W]`` (strides ``stride_y*``, any; for
    MLA-B the local branch's rows are ``[H, 2H)``); gate_ptr ``[n, n_cols, T, H, W]`` uint8;
    gpre_ptr ``[n, n_cols, T, H, W]`` (strides ``stride_q*``); delta_ptr ``[n, 4, T, W, C_out]``
    (strides ``stride_d*``), written on live slots only (its readers mask the others).
    """
    slope = tl.cast(negative_slope, tl.float32)
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_out, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    local_cols = offs_c + C_out if HAS_GLOBAL else offs_c
    n64 = n.to(tl.int64)
    grad_base = grad_ptr + n64 * stride_yn
    gate_base = gate_ptr + n64 * stride_gn
    gpre_base = gpre_ptr + n64 * stride_qn

    y_offs = (t * stride_yt + h * stride_yh + w * stride_yw)[:, None] + offs_c[None, :] * stride_yc
    gate_offs = (t * stride_gt + h * stride_gh + w * stride_gw)[:, None]
    gpre_offs = (t * stride_qt + h * stride_qh + w * stride_qw)[:, None]
    local_row_shift = H * stride_yh if (HAS_GLOBAL and FUSE_CONCAT) else 0
    g_local = tl.load(grad_base + (y_offs + local_row_shift), mask=mask, other=0.0).to(tl.float32)
    local_gates = tl.load(gate_base + (gate_offs + local_cols[None, :] * stride_gc), mask=mask, other=0)
    local_slope = _slope_of(local_gates, POSITIVE, slope)
    tl.store(
        gpre_base + (gpre_offs + local_cols[None, :] * stride_qc),
        (g_local * local_slope).to(gpre_ptr.dtype.element_ty),
        mask=mask,
    )
    if HAS_GLOBAL:
        g_glob = tl.load(grad_base + y_offs, mask=mask, other=0.0).to(tl.float32)
        glob_gates = tl.load(gate_base + (gate_offs + offs_c[None, :] * stride_gc), mask=mask, other=0)
        tl.store(
            gpre_base + (gpre_offs + offs_c[None, :] * stride_qc),
            (g_glob * _slope_of(glob_gates, POSITIVE, slope)).to(gpre_ptr.dtype.element_ty),
            mask=mask,
        )
    if HAS_BAND:
        band_start = tl.load(band_ptr + n).to(tl.int32)
        boundary, delta_offs = _boundary_slots(
            t, h, w, offs_c, mask, band_start, band_rows, H, stride_ds, stride_dt, stride_dw, stride_dc
        )
        delta = g_local * (_slope_of(local_gates, BAND_POSITIVE, slope) - local_slope)
        tl.store(delta_ptr + n64 * stride_dn + delta_offs, delta.to(delta_ptr.dtype.element_ty), mask=boundary)


@triton.jit
def mla_delta_dgrad_kernel(
    delta_ptr,
    w_ptr,
    band_ptr,
    dx_ptr,
    T,
    H,
    W,
    C_out,
    C_in,
    stride_dn,
    stride_ds,
    stride_dt,
    stride_dw,
    stride_dc,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    band_rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dX += M0 * (W_l^T conv delta)``, in place, on the band rows next to a boundary row.

    The only input rows it touches are ``start, start+1, end-2, end-1`` (those of them in the
    band, each once): one per program row. Grid: ``(n*4, cdiv(T*W, BLOCK_M), cdiv(C_in, BLOCK_N))``.
    delta_ptr ``[n, 4, T, W, C_out]`` (strides ``stride_d*``, live slots read only); w_ptr: dgrad
    pack of ``W_l``, ``[3, 3, 3, C_out, C_in]`` (flipped, transposed); band_ptr ``[n]``;
    dx_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``), read and written.
    """
    pid_row = tl.program_id(0)
    n = pid_row // 4
    touched = pid_row - n * 4
    band_start = tl.load(band_ptr + n).to(tl.int32)
    # Rows start, start+1, end-2, end-1; the last three exist (and differ from the earlier ones)
    # for bands of at least 2, 4 and 3 rows.
    h = tl.where(touched < 2, band_start + touched, band_start + band_rows - 4 + touched)
    min_rows = tl.where(touched == 0, 1, tl.where(touched == 1, 2, tl.where(touched == 2, 4, 3)))
    if band_rows >= min_rows:
        t, w, m_ok, offs_c, c_ok = _row_tile(T, W, C_in, BLOCK_M, BLOCK_N)
        delta_base = delta_ptr + n.to(tl.int64) * stride_dn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for slot in tl.static_range(4):
            kh = _candidate_row(slot, band_start, band_rows) - h + 1  # row of the flipped kernel
            if _slot_is_live(slot, band_start, band_rows, H) & (kh >= 0) & (kh <= 2):
                pos = slot * stride_ds + t * stride_dt + w * stride_dw
                acc = _accumulate_row_taps(
                    acc, delta_base, w_ptr + kh * 9 * C_out * C_in, pos, t, w, m_ok, offs_c, c_ok,
                    T, W, C_out, C_in, stride_dc, stride_dt, stride_dw, BLOCK_K,
                )  # fmt: skip
        dx_offs = (t * stride_xt + h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc
        dx_base = dx_ptr + n.to(tl.int64) * stride_xn
        mask = m_ok[:, None] & c_ok[None, :]
        old = tl.load(dx_base + dx_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_base + dx_offs, (old + acc).to(dx_ptr.dtype.element_ty), mask=mask)
