"""Triton kernels of the row-cut convolution engine (fused_ops.md §1–2; launchers: ``fastgait.ops.conv_engine``).

One engine for "a 3x3x3 'same' convolution whose rows are cut at given borders", shared by the
MLA block (GaitMask), GaitGL's GL block and the band-region ReverseMask pair.

Notation: ``x [n, c_in, t, h, w]``; ``G = W_g * X`` and ``F = W_l * X`` are plain convolutions.
Each sample's rows fall into *segments*, given by a *geometry*:
- ``GEOM_BAND``: two segments, the band ``[start, start + size)`` (per-sample ``start``) and the
  rest (MLA's ``M0``/``M1``, the band ReverseMask region);
- ``GEOM_STRIPS``: strips of ``size`` rows, ``row // size`` (GaitGL's local conv; the last strip
  may be shorter, as ``torch.split``).
Output row ``r`` of a 3-row kernel reads input rows ``r-1..r+1``. Call a source row *across*
from ``r`` when it is on the map and in another segment; ``r`` is a *cut row* when it reads an
across row (at most 2 rows per border: the rows either side of it). On a cut row the engine
computes, besides ``F``, ``P = sum of the kernel rows that read across rows`` (the part of ``F``
that a cut removes). The *terms* say what the local branch makes of them:
- ``TERMS_PAIR`` (MLA): ``lrelu(P) + lrelu(F - P)``: the complementary pair, symmetric, so it
  does not matter which segment is "the band";
- ``TERMS_REST`` (GL): ``lrelu(F - P)``: the convolution with zero padding at the borders.
Off the cut rows both are ``lrelu(F)`` (``P = 0`` there), so the pair or the cut costs one
convolution plus a correction on the cut rows.

Cut rows are addressed by *slots*: per sample ``SLOTS`` of them (4 for a band: rows
``start-1, start, end-1, end``; 2 per border for strips: the rows above and below it). A slot
is *live* when its row is a cut row and not a repeat of an earlier slot's row. Per-slot buffers
(``P`` rows, ``delta`` rows) are ``[n, SLOTS, t, w, c]``. Everything about the geometry is
recomputed in-kernel (from the band starts or the strip size); nothing mask-shaped exists.

Backward (derivation in docs/mla_notes.md): with ``gF = dY/dF`` and ``delta = dY/dP`` (the
latter on cut rows only), ``dX = [W_g; W_l]^T * [g_G a'(G); gF] + sum over cut rows r of the
across rows s of W_l[kh]^T delta[r]``, and ``dW_l += X[across rows] * delta``. The forward
saves two bits per element of ``[G; F]``, the *gates* (packed four channels to a byte,
``_store_gates``: ``[n, B*cdiv(c_out, 4), t, h, w]`` uint8, the global branch's bytes first): bit
``POSITIVE`` is ``G > 0`` on global
channels and ``F' > 0`` on local ones (``F' = F - P`` on cut rows, ``F`` elsewhere); bit
``CUT_POSITIVE`` (local channels, cut rows, ``TERMS_PAIR``) is ``P > 0``.

Layouts. Weights are packed as ``[3 (kh), 3 (kt), 3 (kw), c_src, n_cols]`` (the *forward
pack*), so one kernel row is a contiguous ``[9*c_src, n_cols]`` B matrix whose K index runs
over ``(kt, kw, c)``; the *dgrad pack* is the same for the flipped, transposed kernel.
Activations use any strides (contiguous or channels-last-3d). Indexing: one int64 base per
sample, int32 offsets inside it (the launcher checks a sample spans < 2**31 elements).
All accumulation is fp32; loads keep the storage dtype (bf16/fp16 on tensor cores).
"""
import triton
import triton.language as tl

POSITIVE = tl.constexpr(1)  # gate bit: the saved pre-activation (G, or F') is > 0
CUT_POSITIVE = tl.constexpr(2)  # gate bit, local channels on cut rows: P > 0
GEOM_BAND = tl.constexpr(0)
GEOM_STRIPS = tl.constexpr(1)
TERMS_PAIR = tl.constexpr(0)
TERMS_REST = tl.constexpr(1)

# ----------------------------------------------------------------------------------------
# Helpers: activation, geometry, one kernel row of taps
# ----------------------------------------------------------------------------------------


@triton.jit
def _lrelu(v, negative_slope):
    return tl.where(v > 0, v, v * negative_slope)


@triton.jit
def _slope_of(gates, BIT: tl.constexpr, negative_slope):
    """``a'(v)`` from the gate bit ``v > 0``; ``a'(0) = negative_slope`` as in PyTorch's backward."""
    return tl.where((gates & BIT) != 0, 1.0, negative_slope)


@triton.jit
def _store_gates(gate_ptr, row_offs, gates, m_ok, col0, byte_base, CQ, stride_gc, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Store a ``[BM, BN]`` tile of 2-bit gates (values 0..3) for channels ``col0 + arange(BN)``
    packed 4 to a byte: channel ``c``'s field is bits ``2*(c % 4)`` of byte ``byte_base + c // 4``
    (``col0`` a multiple of 4; bytes ``>= CQ``, past the branch's channels, are not written).
    row_offs ``[BM]``: the positions' offsets in the sample's gate tensor."""
    shifts = 2 * tl.arange(0, 4)
    packed = tl.sum(tl.reshape(gates.to(tl.int32), (BLOCK_M, BLOCK_N // 4, 4)) << shifts[None, None, :], axis=2)
    byte = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    tl.store(gate_ptr + (row_offs[:, None] + (byte_base + byte)[None, :] * stride_gc), packed.to(tl.uint8),
             mask=m_ok[:, None] & (byte < CQ)[None, :])


@triton.jit
def _load_gates(gate_ptr, row_offs, m_ok, col0, byte_base, CQ, stride_gc, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The ``[BM, BN]`` tile of 2-bit gates that ``_store_gates`` packed (int32, 0..3)."""
    byte = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    packed = tl.load(gate_ptr + (row_offs[:, None] + (byte_base + byte)[None, :] * stride_gc),
                     mask=m_ok[:, None] & (byte < CQ)[None, :], other=0).to(tl.int32)
    fields = (packed[:, :, None] >> (2 * tl.arange(0, 4))[None, None, :]) & 3
    return tl.reshape(fields, (BLOCK_M, BLOCK_N))


@triton.jit
def _segment(row, start, size, GEOM: tl.constexpr):
    """Segment of ``row``: in the band (1) or not (0), or the strip index."""
    if GEOM == GEOM_BAND:
        return ((row >= start) & (row < start + size)).to(tl.int32)
    else:
        return row // size


@triton.jit
def _across(row, src, start, size, H, GEOM: tl.constexpr):
    """Whether source row ``src`` is on the map and in another segment than output row ``row``."""
    return (src >= 0) & (src < H) & (_segment(src, start, size, GEOM) != _segment(row, start, size, GEOM))


@triton.jit
def _is_cut_row(row, start, size, H, GEOM: tl.constexpr):
    """Whether output ``row`` (on the map) reads a row across a border."""
    reads_across = _across(row, row - 1, start, size, H, GEOM) | _across(row, row + 1, start, size, H, GEOM)
    return reads_across & (row >= 0) & (row < H)


@triton.jit
def _slot_of_row(row, start, size, GEOM: tl.constexpr):
    """Slot of a cut ``row`` (the first slot that holds it)."""
    if GEOM == GEOM_BAND:  # slots hold start-1, start, end-1, end
        end = start + size
        return tl.where(row == start - 1, 0, tl.where(row == start, 1, tl.where(row == end - 1, 2, 3)))
    else:  # slot 2b holds the row above border b+1, slot 2b+1 the row below it
        strip = row // size
        return tl.where((row - strip * size == 0) & (row > 0), 2 * strip - 1, 2 * strip)


@triton.jit
def _slot_row(slot, start, size, GEOM: tl.constexpr):
    """Row held by ``slot``."""
    if GEOM == GEOM_BAND:
        return start - 1 + slot + (slot // 2) * (size - 2)
    else:
        return (slot // 2 + 1) * size - 1 + slot % 2


@triton.jit
def _slot_is_live(slot, start, size, H, GEOM: tl.constexpr):
    """Slot holds a cut row that no earlier slot holds (a band of 1 row: ``end-1 == start``;
    strips of 1 row: the row above a border is the row below the previous one)."""
    # A tensor even for a static slot index: in the interpreter, an int1 tensor `&` a Python
    # bool gives int32, which load/store masks reject.
    slot = slot + start * 0
    row = _slot_row(slot, start, size, GEOM)
    if GEOM == GEOM_BAND:
        repeat = (slot == 2) & (row == start)
    else:
        repeat = (size == 1) & (slot % 2 == 0) & (slot > 0)
    return _is_cut_row(row, start, size, H, GEOM) & (repeat == 0)


@triton.jit
def _geometry_start(band_ptr, n, GEOM: tl.constexpr):
    """The sample's band start (one scalar load), or 0 for strips."""
    if GEOM == GEOM_BAND:
        return tl.load(band_ptr + n).to(tl.int32)
    else:
        return n * 0


@triton.jit
def _div_small(m, d):
    """``m // d`` for int32 ``0 <= m < 2**22`` and ``d >= 1`` by a float reciprocal: exact there
    (the quotient of ``m + 0.5`` is at least ``0.5 / d`` from an integer, more than the float
    rounding), and 3 instructions per element instead of a signed-division routine. For the
    position tiles of the loops (``T*W`` positions)."""
    return ((m.to(tl.float32) + 0.5) * (1.0 / d.to(tl.float32))).to(tl.int32)


@triton.jit
def _sample_tile(T, H, W, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of a per-sample program: ``BLOCK_M`` positions ``(t, h, w)`` of sample ``n`` by
    ``BLOCK_N`` channels out of ``C``. Grid ``(cdiv(T*H*W, BLOCK_M), cdiv(C, BLOCK_N), n)``.

    A tile never crosses a sample, so the sample is one scalar (its int64 base offset is taken
    once, ``n * stride_n``) and every in-sample coordinate is int32: no int64 division anywhere.
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
    tap_bits,
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
    C_BLOCKS: tl.constexpr,
):
    """One kernel row ``kh`` of an implicit-GEMM convolution: K = the 9 taps ``(kt, kw)`` x ``C_src``.

    acc: ``[BLOCK_M, BLOCK_N]`` fp32 accumulator (one ``tl.dot`` per K block over all its columns).
    src_ptr: one sample's base pointer; ``pos [BLOCK_M]`` (int32) is the offset of ``(t, source
    row, w)`` for each output position, ``t``/``w [BLOCK_M]`` its frame and column, ``row_ok
    [BLOCK_M]`` whether the source row is read at all, ``tap_bits``: a 9-bit set per position (or
    one for all) of the taps ``(kt, kw)`` that may be read (511: all; a mask on the input).
    w_ptr: the kernel row's slice ``[3 (kt), 3 (kw), C_src, n_cols]`` of a pack; cols,
    col_ok ``[BLOCK_N]``: the pack's columns. K runs flat over ``(kt, kw, c)``.
    """
    # Bit kt*3 + kw of taps_ok: tap (kt, kw) reads inside the map, so a K block's mask is one
    # shift per element instead of bounds tests on 2-D frame and column indices.
    taps_ok = _spread_bits(_offset_bits(t > 0, t < T - 1), 3) * _offset_bits(w > 0, w < W - 1)  # [BM]
    taps_ok = tl.where(row_ok, taps_ok & tap_bits, 0)
    offs_k = tl.arange(0, BLOCK_K)
    if C_BLOCKS > 0:
        # Aligned K (``C_src == C_BLOCKS * BLOCK_K``): a K block is BLOCK_K channels of one tap, so
        # the tap, its shift and its bounds test are scalars or per row, and the A tile is
        # BLOCK_K consecutive channels per row (one vector load per 8 channels in channels-last).
        a_rows = src_ptr + pos  # [BM] pointers
        b_cols = w_ptr + cols  # [BN] pointers
        for i in range(0, 9 * (C_src // BLOCK_K)):  # == 9 * C_BLOCKS; a run-time bound is not unrolled (registers)
            tap = i // C_BLOCKS  # (kt, kw): constexpr divisors, no division routine
            c0 = (i - tap * C_BLOCKS) * BLOCK_K
            a_ok = ((taps_ok >> tap) & 1) != 0  # [BM]
            shift = (tap // 3 - 1) * stride_t + (tap % 3 - 1) * stride_w + c0 * stride_c
            a = tl.load((a_rows + shift)[:, None] + offs_k[None, :] * stride_c, mask=a_ok[:, None], other=0.0)
            b = tl.load(b_cols[None, :] + ((tap * C_src + c0 + offs_k) * n_cols)[:, None], mask=col_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc)
        return acc
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
def _cut_slots(t, h, w, offs_c, mask, start, size, H, stride_0s, stride_0t, stride_0w, stride_0c, GEOM: tl.constexpr):
    """For a ``[BM, BN]`` tile of one sample at positions ``(t, h, w) [BM]`` and channels ``offs_c
    [BN]``: ``cut [BM, BN]`` (the element is on a cut row, inside ``mask``) and its offsets in the
    sample's per-slot rows ``[SLOTS, T, W, C]`` (strides ``stride_0*``)."""
    cut = _is_cut_row(h, start, size, H, GEOM)[:, None] & mask
    slot = _slot_of_row(h, start, size, GEOM)  # [BM]
    slot_pos = slot * stride_0s + t * stride_0t + w * stride_0w  # [BM]
    return cut, slot_pos[:, None] + offs_c[None, :] * stride_0c


@triton.jit
def _cut_part(full, t, h, w, offs_c, mask, n, band_ptr, p_ptr, size, H, stride_0n, stride_0s, stride_0t, stride_0w,
              stride_0c, GEOM: tl.constexpr, HAS_CUTS: tl.constexpr):
    """``(cut, P)`` for a tile of sample ``n``: which elements lie on cut rows, and their ``P`` read
    from the sample's fp32 slot rows (``cut_rows_p_kernel``); without cuts ``(mask, full)``."""
    if HAS_CUTS:
        start = _geometry_start(band_ptr, n, GEOM)
        cut, p_offs = _cut_slots(t, h, w, offs_c, mask, start, size, H, stride_0s, stride_0t, stride_0w, stride_0c,
                                 GEOM)
        return cut, tl.load(p_ptr + n.to(tl.int64) * stride_0n + p_offs, mask=cut, other=0.0).to(tl.float32)
    return mask, full


@triton.jit
def _local_branch(full, cut_part, cut, negative_slope, HAS_CUTS: tl.constexpr, TERMS: tl.constexpr):
    """The local branch and its gates from ``F`` and ``P`` (used on ``cut`` only), all ``[BM, BN]``."""
    local = _lrelu(full, negative_slope)
    gates = tl.where(full > 0, POSITIVE, 0)
    if HAS_CUTS:
        rest = full - cut_part  # F - P: the kernel rows within the output row's segment
        if TERMS == TERMS_PAIR:
            cut_local = _lrelu(cut_part, negative_slope) + _lrelu(rest, negative_slope)
            cut_gates = tl.where(rest > 0, POSITIVE, 0) | tl.where(cut_part > 0, CUT_POSITIVE, 0)
        else:
            cut_local = _lrelu(rest, negative_slope)
            cut_gates = tl.where(rest > 0, POSITIVE, 0)
        local = tl.where(cut, cut_local, local)
        gates = tl.where(cut, cut_gates, gates)
    return local, gates


@triton.jit
def _epilogue(
    glob,
    full,
    cut_part,
    cut,
    t,
    h,
    w,
    m_ok,
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
    HAS_CUTS: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    TERMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """lrelu, the terms on cut rows and the add/concat fusion; stores Y and the gates.

    glob, full, cut_part: ``[BM, BN]`` fp32 ``G``, ``F``, ``P`` (``P`` used on ``cut [BM, BN]``
    only); t, h, w: ``[BM]`` output position in the sample; mask ``[BM, BN]``; offs_c ``[BN]``.
    y_ptr: the sample's ``[C_out, T, H or 2H, W]``; gate_ptr: its ``[B*CQ, T, H, W]`` uint8 gates
    (``CQ = cdiv(C_out, 4)`` bytes per branch, 2-bit fields; ``_store_gates``); m_ok ``[BM]``; the
    tile's channels start at ``program_id(1) * BLOCK_N``.
    """
    local, local_gates = _local_branch(full, cut_part, cut, negative_slope, HAS_CUTS, TERMS)
    cq = (C_out + 3) // 4  # gate bytes per branch (2-bit fields, 4 channels a byte; global branch first)
    col0 = tl.program_id(1) * BLOCK_N
    gate_offs = t * stride_gt + h * stride_gh + w * stride_gw  # [BM]
    _store_gates(gate_ptr, gate_offs, local_gates, m_ok, col0, cq if HAS_GLOBAL else 0, cq, stride_gc, BLOCK_M,
                 BLOCK_N)

    y_offs = (t * stride_yt + h * stride_yh + w * stride_yw)[:, None] + offs_c[None, :] * stride_yc
    if HAS_GLOBAL:
        _store_gates(gate_ptr, gate_offs, tl.where(glob > 0, POSITIVE, 0), m_ok, col0, 0, cq, stride_gc, BLOCK_M,
                     BLOCK_N)
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
def cut_conv_forward_gemm_kernel(
    x_ptr,
    w_ptr,
    band_ptr,
    p_ptr,
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
    size,
    negative_slope,
    GEOM: tl.constexpr,
    TERMS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_CUTS: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):
    """Y and the gates of the block in one pass over X, ``P`` read from the cut-row slots.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``; a program owns ``BLOCK_M`` output
    positions of one sample and ``BLOCK_N`` output channels of both branches. With a global
    weight the pack's columns interleave the branches (column ``2*o + b``: ``b = 0`` global,
    ``1`` local), so one ``tl.dot`` ``2*BLOCK_N`` wide computes ``G`` and ``F`` from each loaded
    X tile, and the epilogue splits the pairs. One fp32 accumulator: ``P`` (the kernel rows that
    read across a cut, on the cut rows only) comes from ``cut_rows_p_kernel``, launched first,
    as in the hybrid design (keeping ``P`` here took two more accumulators: registers that
    capped the tile at 64 columns).

    x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); w_ptr: forward pack ``[3, 3, 3, C_in,
    n_cols]``, ``n_cols = 2*C_out`` (interleaved ``[W_g; W_l]``) or ``C_out``; band_ptr ``[n]``
    band starts (``GEOM_BAND``); p_ptr ``[n, SLOTS, T, W, C_out]`` fp32 ``P`` rows (live slots
    read; strides ``stride_0*``); y_ptr ``[n, C_out, T, H or 2H, W]``; gate_ptr ``[n, 2*C_out or
    C_out, T, H, W]`` uint8 (global channels first). size: band rows or strip rows.
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
    for kh in tl.static_range(3):
        row = h + (kh - 1)
        row_ok = m_ok & (row >= 0) & (row < H)
        pos = t * stride_xt + row * stride_xh + w * stride_xw
        full = _accumulate_row_taps(
            full, x_base, w_ptr + kh * 9 * C_in * n_cols, pos, t, w, row_ok, 511, cols, col_ok,
            T, W, C_in, n_cols, stride_xc, stride_xt, stride_xw, BLOCK_K, C_BLOCKS,
        )  # fmt: skip

    glob = full
    if HAS_GLOBAL:  # de-interleave the (global, local) column pairs
        glob, full = tl.split(tl.reshape(full, (BLOCK_M, BLOCK_N, 2)))
    mask = m_ok[:, None] & c_ok[None, :]
    cut, cut_part = _cut_part(full, t, h, w, offs_c, mask, n, band_ptr, p_ptr, size, H, stride_0n, stride_0s,
                              stride_0t, stride_0w, stride_0c, GEOM, HAS_CUTS)
    _epilogue(
        glob, full, cut_part, cut, t, h, w, m_ok, mask, offs_c, H, C_out, slope,
        y_ptr + n.to(tl.int64) * stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
        gate_ptr + n.to(tl.int64) * stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
        HAS_GLOBAL, HAS_CUTS, FUSE_CONCAT, TERMS, BLOCK_M, BLOCK_N,
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
    C_BLOCKS: tl.constexpr,
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
            acc, src_base, w_ptr + kh * 9 * C_src * C_dst, pos, t, w, row_ok, 511, offs_c, c_ok,
            T, W, C_src, C_dst, stride_sc, stride_st, stride_sw, BLOCK_K, C_BLOCKS,
        )  # fmt: skip
    out_offs = (t * stride_ot + h * stride_oh + w * stride_ow)[:, None] + offs_c[None, :] * stride_oc
    out_base = out_ptr + n.to(tl.int64) * stride_on
    tl.store(out_base + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _wgrad_k_block(k_block, C_in, stride_xc, stride_xt, stride_xh, stride_xw, BLOCK_K: tl.constexpr,
                   C_BLOCKS: tl.constexpr):
    """The K block ``k_block`` of a wgrad's implicit im2col (K flat over ``(kt, kh, kw, c)``):
    ``k, k_ok [BK]``, ``tap`` (a scalar for an aligned K block, ``k_tiling``; else ``[BK]``) and
    each column's offset from the output position in X, ``k_shift [BK]``."""
    k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < 27 * C_in
    if C_BLOCKS > 0:  # aligned K: the block is BLOCK_K channels of one tap (a scalar)
        tap = k_block // C_BLOCKS
        k_channel = tl.arange(0, BLOCK_K) + (k_block - tap * C_BLOCKS) * BLOCK_K
    else:
        tap = k // C_in
        k_channel = k - tap * C_in
    k_shift = (tap // 9 - 1) * stride_xt + ((tap // 3) % 3 - 1) * stride_xh + (tap % 3 - 1) * stride_xw
    return k, k_ok, tap, k_shift + k_channel * stride_xc


@triton.jit
def _wgrad_src_mask(taps_ok, tap, k_ok, C_BLOCKS: tl.constexpr):
    """Which im2col elements count: ``[BM, 1]`` for an aligned K block (one tap), else ``[BM, BK]``."""
    if C_BLOCKS > 0:  # (one return: Triton refuses returns of different shapes, even in a static if)
        ok = (((taps_ok >> tap) & 1) != 0)[:, None]
    else:
        ok = (((taps_ok[:, None] >> tap[None, :]) & 1) != 0) & k_ok[None, :]
    return ok


@triton.jit
def _first_row_tile(q, row_tiles, ROWS):
    """Tile ``q`` of a reduction over rows ``(n, row)`` (``ROWS`` per sample), each cut into
    ``row_tiles`` tiles: ``(chunk, row, n)``. ``_next_row_tile`` steps it without dividing."""
    row_id = q // row_tiles
    n = row_id // ROWS
    return q - row_id * row_tiles, row_id - n * ROWS, n


@triton.jit
def _next_row_tile(chunk, row, n, row_tiles, ROWS):
    chunk += 1
    row_end = chunk == row_tiles
    row += row_end.to(tl.int32)
    sample_end = row == ROWS
    return tl.where(row_end, 0, chunk), tl.where(sample_end, 0, row), n + sample_end.to(tl.int32)


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
    size,
    CUT_EDGES: tl.constexpr,
    GEOM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):
    """Weight gradient of a 3x3x3 'same' convolution, as per-split partial sums (no atomics).

    ``out[split, o, k] = sum over positions p of the split: grad[p, o] * src[p + tap(k), c(k)]``
    with ``k`` flat over ``(kt, kh, kw, c)`` (an implicit im2col of X as the GEMM's B operand).
    Positions are the rows ``(n, slot)`` (``n*SLOTS`` of them), each cut into
    ``cdiv(T*W, BLOCK_M)`` tiles of ``(t, w)`` positions; ``tiles`` counts them all and each split
    reduces ``tiles_per_split`` consecutive ones. A tile lies in one row of one sample: its
    sample, slot and geometry are scalars, its coordinates int32. Grid: ``(cdiv(C_grad, BLOCK_O) *
    cdiv(27*C_in, BLOCK_K), splits)``.

    - ``CUT_EDGES=False``: the full convolution; slot = output row (``SLOTS = H``), ``src = X``.
    - ``CUT_EDGES=True``: the delta term ``X[across rows] * delta``; slot = cut slot (dead slots
      skipped), source rows that are not across read as 0.

    x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); grad_ptr: ``[n, C_grad, T, SLOTS, W]``
    in strides ``stride_g*`` (``gpre``, or the ``[n, SLOTS, T, W, C]`` delta rows re-strided);
    band_ptr ``[n]``; out_ptr: fp32 ``[splits, C_grad, 27*C_in]`` contiguous.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k_blocks = tl.cdiv(27 * C_in, BLOCK_K)
    o_block = pid // k_blocks
    offs_o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    o_ok = offs_o < C_grad
    k, k_ok, tap, k_shift = _wgrad_k_block(pid - o_block * k_blocks, C_in, stride_xc, stride_xt, stride_xh,
                                           stride_xw, BLOCK_K, C_BLOCKS)  # [BK] flat (kt, kh, kw, c)

    row_tiles = tl.cdiv(T * W, BLOCK_M)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    q_begin = split * tiles_per_split
    q_end = tl.minimum(q_begin + tiles_per_split, tiles)
    chunk, slot, n = _first_row_tile(q_begin, row_tiles, SLOTS)  # stepped along: no division in the loop
    for q in range(q_begin, q_end):
        offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] (t, w) positions of the row
        m_ok = offs_m < T * W
        t = _div_small(offs_m, W)
        w = offs_m - t * W
        if CUT_EDGES:
            start = _geometry_start(band_ptr, n, GEOM)
            row = _slot_row(slot, start, size, GEOM)
            live = _slot_is_live(slot, start, size, H, GEOM).to(tl.int32)  # scalar
            grad_ok = (m_ok.to(tl.int32) * live) != 0  # (vector & scalar bool is int32 in the interpreter)
            row_bits = _across(row, row - 1, start, size, H, GEOM).to(tl.int32)  # only across rows
            row_bits |= _across(row, row + 1, start, size, H, GEOM).to(tl.int32) << 2
        else:
            row = slot
            grad_ok = m_ok
            row_bits = _offset_bits(row > 0, row < H - 1)
        # Bit kt*9 + kh*3 + kw: tap (kt, kh, kw) reads a source element that counts.
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
        src_ok = _wgrad_src_mask(taps_ok, tap, k_ok, C_BLOCKS)
        x_base = x_ptr + n.to(tl.int64) * stride_xn
        x_pos = t * stride_xt + row * stride_xh + w * stride_xw  # [BM]
        src = tl.load(x_base + (x_pos[:, None] + k_shift[None, :]), mask=src_ok, other=0.0)  # [BM, BK]
        acc = tl.dot(tl.trans(grad), src, acc)  # [BO, BK]
        chunk, slot, n = _next_row_tile(chunk, slot, n, row_tiles, SLOTS)
    out_offs = (split * C_grad + offs_o).to(tl.int64)[:, None] * (27 * C_in) + k[None, :]
    tl.store(out_ptr + out_offs, acc, mask=o_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------
# Design (b): after the vendor convolution, P on the cut rows, then the epilogue
# ----------------------------------------------------------------------------------------


@triton.jit
def cut_rows_p_kernel(
    x_ptr,
    w_ptr,
    band_ptr,
    p_ptr,
    SLOTS,
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
    size,
    GEOM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):
    """``P`` (the kernel rows that read across rows) on each sample's cut rows, straight from X.

    Grid: ``(n*SLOTS, cdiv(T*W, BLOCK_M), cdiv(C_out, BLOCK_N))``: one slot per program row;
    dead slots do nothing. x_ptr ``[n, C_in, T, H, W]`` (strides ``stride_x*``); w_ptr: forward
    pack of ``W_l``, ``[3, 3, 3, C_in, C_out]``; band_ptr ``[n]``; p_ptr ``[n, SLOTS, T, W,
    C_out]`` fp32 (strides ``stride_0*``), so ``F - P`` loses nothing to a bf16 ``P``.
    """
    pid_row = tl.program_id(0)
    n = pid_row // SLOTS
    slot = pid_row - n * SLOTS
    start = _geometry_start(band_ptr, n, GEOM)
    if _slot_is_live(slot, start, size, H, GEOM):
        row = _slot_row(slot, start, size, GEOM)
        t, w, m_ok, offs_c, c_ok = _row_tile(T, W, C_out, BLOCK_M, BLOCK_N)
        x_base = x_ptr + n.to(tl.int64) * stride_xn
        cut_part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for side in tl.static_range(2):  # kernel rows 0 and 2: the middle row is never across
            kh = 2 * side
            src_row = row + (kh - 1)
            if _across(row, src_row, start, size, H, GEOM):
                pos = t * stride_xt + src_row * stride_xh + w * stride_xw
                cut_part = _accumulate_row_taps(
                    cut_part, x_base, w_ptr + kh * 9 * C_in * C_out, pos, t, w, m_ok, 511, offs_c, c_ok,
                    T, W, C_in, C_out, stride_xc, stride_xt, stride_xw, BLOCK_K, C_BLOCKS,
                )  # fmt: skip
        p_offs = (slot * stride_0s + t * stride_0t + w * stride_0w)[:, None] + offs_c[None, :] * stride_0c
        tl.store(
            p_ptr + n.to(tl.int64) * stride_0n + p_offs,
            cut_part.to(p_ptr.dtype.element_ty),
            mask=m_ok[:, None] & c_ok[None, :],
        )


@triton.jit
def cut_conv_epilogue_kernel(
    pre_ptr,
    p_ptr,
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
    size,
    negative_slope,
    GEOM: tl.constexpr,
    TERMS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_CUTS: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The epilogue over ``pre = [G; F]`` from the vendor convolution and the ``P`` rows.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``.
    pre_ptr ``[n, n_cols, T, H, W]`` (strides ``stride_p*``); p_ptr ``[n, SLOTS, T, W, C_out]``
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
    cut, cut_part = _cut_part(full, t, h, w, offs_c, mask, n, band_ptr, p_ptr, size, H, stride_0n, stride_0s,
                              stride_0t, stride_0w, stride_0c, GEOM, HAS_CUTS)
    _epilogue(
        glob, full, cut_part, cut, t, h, w, m_ok, mask, offs_c, H, C_out, slope,
        y_ptr + n.to(tl.int64) * stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
        gate_ptr + n.to(tl.int64) * stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
        HAS_GLOBAL, HAS_CUTS, FUSE_CONCAT, TERMS, BLOCK_M, BLOCK_N,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Backward, shared by all designs: the gated gradient, and the delta terms
# ----------------------------------------------------------------------------------------


@triton.jit
def cut_conv_gated_grad_kernel(
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
    size,
    negative_slope,
    GEOM: tl.constexpr,
    TERMS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_CUTS: tl.constexpr,
    FUSE_CONCAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``gpre = [g_G a'(G); g_L a'(F')]`` everywhere; on cut rows ``delta = g_L (a'(P) - a'(F - P))``
    (``TERMS_PAIR``) or ``-g_L a'(F - P)`` (``TERMS_REST``).

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``.
    grad_ptr: upstream gradient ``[n, C_out, T, H or 2H, W]`` (strides ``stride_y*``, any; with
    concat the local branch's rows are ``[H, 2H)``); gate_ptr ``[n, B*CQ, T, H, W]`` uint8 packed gates;
    gpre_ptr ``[n, n_cols, T, H, W]`` (strides ``stride_q*``); delta_ptr ``[n, SLOTS, T, W, C_out]``
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
    gate_offs = t * stride_gt + h * stride_gh + w * stride_gw  # [BM]
    cq = (C_out + 3) // 4  # packed gate bytes per branch (_store_gates)
    col0 = tl.program_id(1) * BLOCK_N
    gpre_offs = (t * stride_qt + h * stride_qh + w * stride_qw)[:, None]
    local_row_shift = H * stride_yh if (HAS_GLOBAL and FUSE_CONCAT) else 0
    g_local = tl.load(grad_base + (y_offs + local_row_shift), mask=mask, other=0.0).to(tl.float32)
    local_gates = _load_gates(gate_base, gate_offs, m_ok, col0, cq if HAS_GLOBAL else 0, cq, stride_gc, BLOCK_M,
                              BLOCK_N)
    local_slope = _slope_of(local_gates, POSITIVE, slope)
    tl.store(
        gpre_base + (gpre_offs + local_cols[None, :] * stride_qc),
        (g_local * local_slope).to(gpre_ptr.dtype.element_ty),
        mask=mask,
    )
    if HAS_GLOBAL:
        g_glob = tl.load(grad_base + y_offs, mask=mask, other=0.0).to(tl.float32)
        glob_gates = _load_gates(gate_base, gate_offs, m_ok, col0, 0, cq, stride_gc, BLOCK_M, BLOCK_N)
        tl.store(
            gpre_base + (gpre_offs + offs_c[None, :] * stride_qc),
            (g_glob * _slope_of(glob_gates, POSITIVE, slope)).to(gpre_ptr.dtype.element_ty),
            mask=mask,
        )
    if HAS_CUTS:
        start = _geometry_start(band_ptr, n, GEOM)
        cut, delta_offs = _cut_slots(
            t, h, w, offs_c, mask, start, size, H, stride_ds, stride_dt, stride_dw, stride_dc, GEOM
        )
        if TERMS == TERMS_PAIR:
            delta = g_local * (_slope_of(local_gates, CUT_POSITIVE, slope) - local_slope)
        else:
            delta = -g_local * local_slope
        tl.store(delta_ptr + n64 * stride_dn + delta_offs, delta.to(delta_ptr.dtype.element_ty), mask=cut)


@triton.jit
def cut_conv_delta_dgrad_kernel(
    delta_ptr,
    w_ptr,
    band_ptr,
    dx_ptr,
    SLOTS,
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
    size,
    GEOM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):
    """``dX[s] += sum over cut rows r next to s and across from it: W_l[kh]^T conv delta[r]``, in place.

    A row across from a cut row is itself a cut row, so the rows this touches are the cut rows:
    one live slot per program row, each written by one program (no atomics). Grid:
    ``(n*SLOTS, cdiv(T*W, BLOCK_M), cdiv(C_in, BLOCK_N))``. delta_ptr ``[n, SLOTS, T, W, C_out]``
    (strides ``stride_d*``, live slots read only); w_ptr: dgrad pack of ``W_l``, ``[3, 3, 3,
    C_out, C_in]`` (flipped, transposed); band_ptr ``[n]``; dx_ptr ``[n, C_in, T, H, W]``
    (strides ``stride_x*``), read and written.
    """
    pid_row = tl.program_id(0)
    n = pid_row // SLOTS
    slot = pid_row - n * SLOTS
    start = _geometry_start(band_ptr, n, GEOM)
    if _slot_is_live(slot, start, size, H, GEOM):
        h = _slot_row(slot, start, size, GEOM)
        t, w, m_ok, offs_c, c_ok = _row_tile(T, W, C_in, BLOCK_M, BLOCK_N)
        delta_base = delta_ptr + n.to(tl.int64) * stride_dn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for side in tl.static_range(2):
            r = h + 2 * side - 1  # the cut row above, then below
            if _across(h, r, start, size, H, GEOM):
                kh = r - h + 1  # row of the flipped kernel
                pos = _slot_of_row(r, start, size, GEOM) * stride_ds + t * stride_dt + w * stride_dw
                acc = _accumulate_row_taps(
                    acc, delta_base, w_ptr + kh * 9 * C_out * C_in, pos, t, w, m_ok, 511, offs_c, c_ok,
                    T, W, C_out, C_in, stride_dc, stride_dt, stride_dw, BLOCK_K, C_BLOCKS,
                )  # fmt: skip
        dx_offs = (t * stride_xt + h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc
        dx_base = dx_ptr + n.to(tl.int64) * stride_xn
        mask = m_ok[:, None] & c_ok[None, :]
        old = tl.load(dx_base + dx_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_base + dx_offs, (old + acc).to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# The "hybrid2d" design: the vendor's 2-D convolution over frame-stacked channels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tile_ptrs(ptr, n, t, h, w, offs_c, stride_n, stride_c, stride_t, stride_h, stride_w):
    """``[BM, BN]`` pointers of a ``_sample_tile`` tile (positions ``t, h, w`` by channels ``offs_c``)
    of sample ``n`` in a ``[n, c, t, h, w]`` tensor: the sample's int64 base, int32 offsets within."""
    return ptr + n.to(tl.int64) * stride_n + (
        (t * stride_t + h * stride_h + w * stride_w)[:, None] + offs_c[None, :] * stride_c
    )


@triton.jit
def fold_frames_kernel(
    ds_ptr,
    dx_ptr,
    T,
    H,
    W,
    C,
    stride_sn,
    stride_sc,
    stride_st,
    stride_sh,
    stride_sw,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dX of a same-padded 3x3x3 convolution done as a 2-D one over stacked frames: frame ``t`` of
    the stacked input holds ``x[t-1], x[t], x[t+1]`` (``C`` channels each, zeros beyond the clip),
    so ``dX[t] = dS[t+1][0:C] + dS[t][C:2C] + dS[t-1][2C:3C]``, summed in fp32 and rounded once.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C, BLOCK_N), n)``. ds_ptr: the stacked frames' gradient
    ``[n, 3C, T, H, W]`` (strides ``stride_s*``); dx_ptr ``[n, C, T, H, W]`` (strides ``stride_x*``).
    """
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    src = _tile_ptrs(ds_ptr, n, t, h, w, offs_c, stride_sn, stride_sc, stride_st, stride_sh, stride_sw)
    acc = tl.load(src + C * stride_sc, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(src + stride_st, mask=mask & (t + 1 < T)[:, None], other=0.0).to(tl.float32)
    acc += tl.load(src + (2 * C * stride_sc - stride_st), mask=mask & (t > 0)[:, None], other=0.0).to(tl.float32)
    dst = _tile_ptrs(dx_ptr, n, t, h, w, offs_c, stride_xn, stride_xc, stride_xt, stride_xh, stride_xw)
    tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def stack_frames_kernel(
    x_ptr,
    s_ptr,
    T,
    H,
    W,
    C,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    stride_sn,
    stride_sc,
    stride_st,
    stride_sh,
    stride_sw,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The stacked frames of a same-padded 3x3x3 convolution done as a 2-D one: frame ``t`` of
    ``S [n, 3C, T, H, W]`` holds ``x[t-1], x[t], x[t+1]`` (``C`` channels each, zeros beyond the
    clip). One pass: each program reads its tile of x and the neighbouring frames' (mostly from
    L2: the programs of adjacent frames run close together) and writes the three slots.

    Grid: ``(cdiv(T*H*W, BLOCK_M), cdiv(C, BLOCK_N), n)``. x_ptr ``[n, C, T, H, W]`` (strides
    ``stride_x*``), s_ptr (strides ``stride_s*``).
    """
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    src = _tile_ptrs(x_ptr, n, t, h, w, offs_c, stride_xn, stride_xc, stride_xt, stride_xh, stride_xw)
    dst = _tile_ptrs(s_ptr, n, t, h, w, offs_c, stride_sn, stride_sc, stride_st, stride_sh, stride_sw)
    tl.store(dst, tl.load(src - stride_xt, mask=mask & (t > 0)[:, None], other=0.0), mask=mask)
    tl.store(dst + C * stride_sc, tl.load(src, mask=mask, other=0.0), mask=mask)
    tl.store(dst + 2 * C * stride_sc, tl.load(src + stride_xt, mask=mask & (t + 1 < T)[:, None], other=0.0), mask=mask)
