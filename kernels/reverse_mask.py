"""Triton side of the ReverseMask masks (fused_ops.md §2; launchers in ``fastgait.ops.reverse_mask``).

The unit mask is a pure function of ``(seed, h, w)``: ``Mm[h, w] = randint(seed, h*W + w) <
threshold`` with Triton's Philox4x32-10 (``tl.randint``, first output word, read as uint32) and
``threshold = round(p * 2**32)``. Keyed on the logical position, never on a tile or im2col
index, so every program of a forward and of a backward sees the same bits without storing
them. ``fastgait.ops.masks.philox_randint`` is the same function in PyTorch, bit for bit (the
reference and the torch path use it; ``tests/test_reverse_mask_op.py`` checks the identity).
"""
import triton
import triton.language as tl


@triton.jit
def unit_keep(seed, h, w, W, threshold):
    """``Mm[h, w]`` (int1) of the unit mask for ``seed`` (int64 scalar) and ``threshold`` (int64)."""
    bits = tl.randint(seed, h * W + w)  # int32 tensor, Philox4x32-10 of (offset, 0, 0, 0), key (seed lo, hi)
    return bits.to(tl.uint32, bitcast=True).to(tl.int64) < threshold


@triton.jit
def unit_mask_kernel(seed_ptr, keep_ptr, bits_ptr, uniform_ptr, H, W, threshold, BLOCK: tl.constexpr):
    """Writes the unit mask ``keep [H, W]`` (uint8), the raw ``tl.randint`` words ``bits [H, W]``
    (int32) and ``tl.rand`` ``uniform [H, W]`` (fp32) for the seed at ``seed_ptr``: what the
    PyTorch Philox is checked against. Grid ``(cdiv(H*W, BLOCK),)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H * W
    h = offs // W
    w = offs - h * W
    seed = tl.load(seed_ptr)
    tl.store(keep_ptr + offs, unit_keep(seed, h, w, W, threshold).to(tl.uint8), mask=ok)
    tl.store(bits_ptr + offs, tl.randint(seed, offs), mask=ok)
    tl.store(uniform_ptr + offs, tl.rand(seed, offs), mask=ok)


# ----------------------------------------------------------------------------------------
# The fused ReverseMask blocks (fastgait.ops.reverse_mask, design "hybrid"): the vendor
# convolution gives [G; F_1..F_K] = [W_g; W_1..W_K] * X; these kernels give
# A = [W_1..W_K] * (X*Mm) on the *window* of rows where it can be non-zero (all H rows for a
# unit mask; rows row_start-1 .. row_start+rows for a band or block), the epilogue, and the
# backward's masked terms. The mask is evaluated in-kernel from ``params = (seed, row_start,
# col_start)``; nothing mask-shaped, and no masked copy of X, exists in memory.
# ----------------------------------------------------------------------------------------

from .conv_engine import (  # noqa: E402
    _accumulate_row_taps, _div_small, _first_row_tile, _lrelu, _next_row_tile, _offset_bits, _sample_tile, _slope_of,
    _spread_bits, _wgrad_k_block, _wgrad_src_mask,
)

REGION_UNIT = tl.constexpr(0)
REGION_BAND = tl.constexpr(1)
REGION_BLOCK = tl.constexpr(2)
TERM1_POSITIVE = tl.constexpr(1)  # gate bit: alpha*A + beta*(F - A) > 0 (or G > 0, or F > 0 unmasked)
TERM2_POSITIVE = tl.constexpr(2)  # gate bit: (1-alpha)*A + (1-beta)*(F - A) > 0


@triton.jit
def _mask_params(params_ptr, REGION: tl.constexpr):
    """``(seed, row_start, col_start, window offset)`` of a draw (scalars)."""
    seed = tl.load(params_ptr)
    row_start = tl.load(params_ptr + 1).to(tl.int32)
    col_start = tl.load(params_ptr + 2).to(tl.int32)
    offset = row_start - 1
    if REGION == REGION_UNIT:
        offset = row_start * 0
    return seed, row_start, col_start, offset


@triton.jit
def _keep(h, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION: tl.constexpr):
    """``Mm[h, w]`` (int1), False off the map."""
    on_map = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    if REGION == REGION_UNIT:
        keep = unit_keep(seed, h, w, W, threshold)
    else:
        keep = (h >= row_start) & (h < row_start + rows)
        if REGION == REGION_BLOCK:
            keep = keep & (w >= col_start) & (w < col_start + cols)
    return keep & on_map


@triton.jit
def _kw_bits(row, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION: tl.constexpr):
    """3-bit set per position: ``Mm[row, w + kw - 1]`` for kw = 0, 1, 2."""
    bits = _keep(row, w - 1, H, W, seed, row_start, rows, col_start, cols, threshold, REGION).to(tl.int32)
    bits |= _keep(row, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION).to(tl.int32) << 1
    bits |= _keep(row, w + 1, H, W, seed, row_start, rows, col_start, cols, threshold, REGION).to(tl.int32) << 2
    return bits


@triton.jit
def rm_masked_conv_kernel(
    x_ptr, w_ptr, params_ptr, a_ptr,
    T, H, W, WR, C_in, C_all,
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_an, stride_ac, stride_at, stride_ar, stride_aw,
    rows, cols, threshold,
    REGION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):  # fmt: skip
    """``A = W * (X*Mm)`` on the window: ``a [n, C_all, T, WR, W]`` fp32, window row ``r`` is map row
    ``offset + r`` (rows off the map are written as 0). The input mask enters as a per-position
    9-bit set of readable taps. Grid ``(cdiv(T*WR*W, BLOCK_M), cdiv(C_all, BLOCK_N), n)``;
    w_ptr: forward pack ``[3, 3, 3, C_in, C_all]``."""
    n, t, r, w, m_ok, offs_c, c_ok = _sample_tile(T, WR, W, C_all, BLOCK_M, BLOCK_N)
    seed, row_start, col_start, offset = _mask_params(params_ptr, REGION)
    h = offset + r
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(3):
        row = h + (kh - 1)
        row_ok = m_ok & (h >= 0) & (h < H) & (row >= 0) & (row < H)
        bits = _kw_bits(row, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION)
        pos = t * stride_xt + row * stride_xh + w * stride_xw
        acc = _accumulate_row_taps(
            acc, x_base, w_ptr + kh * 9 * C_in * C_all, pos, t, w, row_ok, bits | (bits << 3) | (bits << 6),
            offs_c, c_ok, T, W, C_in, C_all, stride_xc, stride_xt, stride_xw, BLOCK_K, C_BLOCKS,
        )  # fmt: skip
    a_offs = (t * stride_at + r * stride_ar + w * stride_aw)[:, None] + offs_c[None, :] * stride_ac
    tl.store(a_ptr + n.to(tl.int64) * stride_an + a_offs, acc, mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def rm_epilogue_kernel(
    pre_ptr, a_ptr, params_ptr, scales_ptr, y_ptr, gate_ptr,
    T, H, W, WR, C_out,
    stride_pn, stride_pc, stride_pt, stride_ph, stride_pw,
    stride_an, stride_ac, stride_at, stride_ar, stride_aw,
    stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
    stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
    negative_slope,
    REGION: tl.constexpr, K: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FUSE_CONCAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Each RMFE branch ``lrelu(alpha*A + beta*(F-A)) + lrelu((1-alpha)*A + (1-beta)*(F-A))`` (``A = 0``
    off the window; ``lrelu(F)`` without a mask), the global branch, the fusion; Y and the gates.

    pre ``[n, (1+)K*C_out, T, H, W]`` (global first); a ``[n, K*C_out, T, WR, W]``; scales_ptr
    ``[K, 2]`` fp32 ``(alpha, beta)``; y ``[n, C_out, T, H or (branches*H), W]``; gates ``[n,
    (1+)K*C_out, T, H, W]`` uint8. Grid ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``.
    """
    slope = tl.cast(negative_slope, tl.float32)
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_out, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    n64 = n.to(tl.int64)
    pre_offs = (t * stride_pt + h * stride_ph + w * stride_pw)[:, None]
    gate_offs = (t * stride_gt + h * stride_gh + w * stride_gw)[:, None]
    y_offs = (t * stride_yt + h * stride_yh + w * stride_yw)[:, None] + offs_c[None, :] * stride_yc
    pre_base = pre_ptr + n64 * stride_pn
    gate_base = gate_ptr + n64 * stride_gn
    y_base = y_ptr + n64 * stride_yn
    if HAS_MASK:
        _, _, _, offset = _mask_params(params_ptr, REGION)
        r = h - offset
        a_ok = mask & ((r >= 0) & (r < WR))[:, None]
        a_offs = (t * stride_at + r * stride_ar + w * stride_aw)[:, None]
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_GLOBAL:
        glob = tl.load(pre_base + (pre_offs + offs_c[None, :] * stride_pc), mask=mask, other=0.0).to(tl.float32)
        tl.store(gate_base + (gate_offs + offs_c[None, :] * stride_gc), tl.where(glob > 0, TERM1_POSITIVE, 0).to(tl.uint8),
                 mask=mask)
        total = _lrelu(glob, slope)
        if FUSE_CONCAT:
            tl.store(y_base + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
    for j in tl.static_range(K):
        col = (j + HAS_GLOBAL) * C_out + offs_c
        full = tl.load(pre_base + (pre_offs + col[None, :] * stride_pc), mask=mask, other=0.0).to(tl.float32)
        if HAS_MASK:
            part = tl.load(a_ptr + n64 * stride_an + (a_offs + (j * C_out + offs_c)[None, :] * stride_ac), mask=a_ok,
                           other=0.0)
            alpha = tl.load(scales_ptr + 2 * j).to(tl.float32)
            beta = tl.load(scales_ptr + 2 * j + 1).to(tl.float32)
            rest = full - part
            term1 = alpha * part + beta * rest
            term2 = (1.0 - alpha) * part + (1.0 - beta) * rest
            value = _lrelu(term1, slope) + _lrelu(term2, slope)
            gates = tl.where(term1 > 0, TERM1_POSITIVE, 0) | tl.where(term2 > 0, TERM2_POSITIVE, 0)
        else:
            value = _lrelu(full, slope)
            gates = tl.where(full > 0, TERM1_POSITIVE, 0)
        tl.store(gate_base + (gate_offs + col[None, :] * stride_gc), gates.to(tl.uint8), mask=mask)
        if FUSE_CONCAT:
            tl.store(y_base + (y_offs + (j + HAS_GLOBAL) * H * stride_yh), value.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            total += value
    if not FUSE_CONCAT:
        tl.store(y_base + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rm_gated_grad_kernel(
    grad_ptr, gate_ptr, params_ptr, scales_ptr, gpre_ptr, ga_ptr,
    T, H, W, WR, C_out,
    stride_yn, stride_yc, stride_yt, stride_yh, stride_yw,
    stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
    stride_qn, stride_qc, stride_qt, stride_qh, stride_qw,
    stride_an, stride_ac, stride_at, stride_ar, stride_aw,
    negative_slope,
    REGION: tl.constexpr, K: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FUSE_CONCAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``gpre = [g_G a'(G); g_j (beta a'_1 + (1-beta) a'_2)]`` everywhere and, on the window,
    ``gA_j = g_j (alpha - beta)(a'_1 - a'_2)`` (``a'_i`` from the gates; ``g_j`` the branch's
    upstream rows). Grid ``(cdiv(T*H*W, BLOCK_M), cdiv(C_out, BLOCK_N), n)``; ga ``[n, K*C_out, T, WR, W]``."""
    slope = tl.cast(negative_slope, tl.float32)
    n, t, h, w, m_ok, offs_c, c_ok = _sample_tile(T, H, W, C_out, BLOCK_M, BLOCK_N)
    mask = m_ok[:, None] & c_ok[None, :]
    n64 = n.to(tl.int64)
    y_offs = (t * stride_yt + h * stride_yh + w * stride_yw)[:, None] + offs_c[None, :] * stride_yc
    gate_offs = (t * stride_gt + h * stride_gh + w * stride_gw)[:, None]
    gpre_offs = (t * stride_qt + h * stride_qh + w * stride_qw)[:, None]
    grad_base = grad_ptr + n64 * stride_yn
    gate_base = gate_ptr + n64 * stride_gn
    gpre_base = gpre_ptr + n64 * stride_qn
    if HAS_MASK:
        _, _, _, offset = _mask_params(params_ptr, REGION)
        r = h - offset
        a_ok = mask & ((r >= 0) & (r < WR))[:, None]
        a_offs = (t * stride_at + r * stride_ar + w * stride_aw)[:, None]
    if HAS_GLOBAL:
        g = tl.load(grad_base + y_offs, mask=mask, other=0.0).to(tl.float32)
        gates = tl.load(gate_base + (gate_offs + offs_c[None, :] * stride_gc), mask=mask, other=0)
        tl.store(gpre_base + (gpre_offs + offs_c[None, :] * stride_qc),
                 (g * _slope_of(gates, TERM1_POSITIVE, slope)).to(gpre_ptr.dtype.element_ty), mask=mask)
    for j in tl.static_range(K):
        col = (j + HAS_GLOBAL) * C_out + offs_c
        row_shift = (j + HAS_GLOBAL) * H * stride_yh if FUSE_CONCAT else 0
        g = tl.load(grad_base + (y_offs + row_shift), mask=mask, other=0.0).to(tl.float32)
        gates = tl.load(gate_base + (gate_offs + col[None, :] * stride_gc), mask=mask, other=0)
        slope1 = _slope_of(gates, TERM1_POSITIVE, slope)
        if HAS_MASK:
            slope2 = _slope_of(gates, TERM2_POSITIVE, slope)
            alpha = tl.load(scales_ptr + 2 * j).to(tl.float32)
            beta = tl.load(scales_ptr + 2 * j + 1).to(tl.float32)
            g_full = g * (beta * slope1 + (1.0 - beta) * slope2)
            g_part = g * (alpha - beta) * (slope1 - slope2)
            tl.store(ga_ptr + n64 * stride_an + (a_offs + (j * C_out + offs_c)[None, :] * stride_ac),
                     g_part.to(ga_ptr.dtype.element_ty), mask=a_ok)
        else:
            g_full = g * slope1
        tl.store(gpre_base + (gpre_offs + col[None, :] * stride_qc), g_full.to(gpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rm_masked_dgrad_kernel(
    ga_ptr, w_ptr, params_ptr, dx_ptr,
    T, H, W, WR, C_all, C_in,
    stride_an, stride_ac, stride_at, stride_ar, stride_aw,
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    rows, cols, threshold,
    REGION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):  # fmt: skip
    """``dX += Mm * ([W_1..W_K]^T conv gA)`` on the window rows, in place (each element by one program).
    w_ptr: dgrad pack ``[3, 3, 3, C_all, C_in]``. Grid ``(cdiv(T*WR*W, BLOCK_M), cdiv(C_in, BLOCK_N), n)``."""
    n, t, r, w, m_ok, offs_c, c_ok = _sample_tile(T, WR, W, C_in, BLOCK_M, BLOCK_N)
    seed, row_start, col_start, offset = _mask_params(params_ptr, REGION)
    h = offset + r
    keep = _keep(h, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION) & m_ok
    ga_base = ga_ptr + n.to(tl.int64) * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(3):
        src = r + (kh - 1)  # window row of gA read by the flipped kernel row kh
        row_ok = keep & (src >= 0) & (src < WR) & (offset + src >= 0) & (offset + src < H)
        pos = t * stride_at + src * stride_ar + w * stride_aw
        acc = _accumulate_row_taps(
            acc, ga_base, w_ptr + kh * 9 * C_all * C_in, pos, t, w, row_ok, 511, offs_c, c_ok,
            T, W, C_all, C_in, stride_ac, stride_at, stride_aw, BLOCK_K, C_BLOCKS,
        )  # fmt: skip
    dx_offs = (t * stride_xt + h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc
    dx_base = dx_ptr + n.to(tl.int64) * stride_xn
    dx_mask = keep[:, None] & c_ok[None, :]
    old = tl.load(dx_base + dx_offs, mask=dx_mask, other=0.0).to(tl.float32)
    tl.store(dx_base + dx_offs, (old + acc).to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def rm_masked_wgrad_kernel(
    x_ptr, ga_ptr, params_ptr, out_ptr,
    tiles, tiles_per_split, T, H, W, WR, C_in, C_all,
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_an, stride_ac, stride_at, stride_ar, stride_aw,
    rows, cols, threshold,
    REGION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    C_BLOCKS: tl.constexpr,
):  # fmt: skip
    """``d[W_1..W_K] += (X*Mm) conv gA`` as per-split fp32 partial sums ``out [splits, C_all, 27*C_in]``.

    Positions: the window rows ``(n, r)``, each cut into ``cdiv(T*W, BLOCK_M)`` tiles; the
    im2col source ``X[row + kh - 1, w + kw - 1]`` is read where ``Mm`` keeps it (9 mask bits per
    position, repeated over ``kt``). Grid ``(cdiv(C_all, BLOCK_O) * cdiv(27*C_in, BLOCK_K), splits)``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k_blocks = tl.cdiv(27 * C_in, BLOCK_K)
    o_block = pid // k_blocks
    offs_o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < C_all
    k, k_ok, tap, k_shift = _wgrad_k_block(pid - o_block * k_blocks, C_in, stride_xc, stride_xt, stride_xh,
                                           stride_xw, BLOCK_K, C_BLOCKS)
    seed, row_start, col_start, offset = _mask_params(params_ptr, REGION)

    row_tiles = tl.cdiv(T * W, BLOCK_M)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    q_begin = split * tiles_per_split
    q_end = tl.minimum(q_begin + tiles_per_split, tiles)
    chunk, r, n = _first_row_tile(q_begin, row_tiles, WR)  # tile q's (n, r) window row and chunk, stepped along
    for q in range(q_begin, q_end):
        row = offset + r
        offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T * W
        t = _div_small(offs_m, W)
        w = offs_m - t * W
        on_map = ((row >= 0) & (row < H)).to(tl.int32)  # scalar
        grad_ok = (m_ok.to(tl.int32) * on_map) != 0
        # Bit kh*3 + kw: Mm keeps the source (row + kh - 1, w + kw - 1); then repeated over kt.
        hw_bits = _kw_bits(row - 1, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION)
        hw_bits |= _kw_bits(row, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION) << 3
        hw_bits |= _kw_bits(row + 1, w, H, W, seed, row_start, rows, col_start, cols, threshold, REGION) << 6
        taps_ok = _spread_bits(_offset_bits(t > 0, t < T - 1), 9) * hw_bits
        taps_ok = tl.where(grad_ok, taps_ok, 0)
        grad = tl.load(
            ga_ptr + n.to(tl.int64) * stride_an
            + ((r * stride_ar + t * stride_at + w * stride_aw)[:, None] + offs_o[None, :] * stride_ac),
            mask=grad_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        src_ok = _wgrad_src_mask(taps_ok, tap, k_ok, C_BLOCKS)
        x_pos = t * stride_xt + row * stride_xh + w * stride_xw
        src = tl.load(x_ptr + n.to(tl.int64) * stride_xn + (x_pos[:, None] + k_shift[None, :]), mask=src_ok, other=0.0)
        acc = tl.dot(tl.trans(grad.to(src.dtype)), src, acc)
        chunk, r, n = _next_row_tile(chunk, r, n, row_tiles, WR)
    out_offs = (split * C_all + offs_o).to(tl.int64)[:, None] * (27 * C_in) + k[None, :]
    tl.store(out_ptr + out_offs, acc, mask=o_ok[:, None] & k_ok[None, :])
