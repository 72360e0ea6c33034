"""Triton kernels of GeM over horizontal strips fused with the temporal max (fused_ops.md §3).

Launchers, autograd and the ``torch.library`` registration: ``fastgait.ops.gem``.

Design
------
Input ``x [n, c, t, h, w]`` in any memory format (read through its strides, never copied);
the trainer's is channels-last-3d, where ``c`` is the contiguous dim. Three kernels:

``gem_rows_fwd_kernel`` -- grid ``(h, n, cdiv(c, BLOCK_C))``: one program per (sample, row,
    block of channels). It walks the row in ``[BLOCK_W, BLOCK_C]`` tiles (columns x channels;
    the channel dim is the vectorised one, 8 bf16 = 16 B per thread in channels-last) and, for each
    tile, the frames (``UNROLL_T`` independent loads in flight per step): max over frames and its
    first frame (saved for backward when training), then clamp and the row's power sum, combined
    across tiles with a running maximum (online rescale). Output: the row statistics
    ``(row_max, sum (y / row_max)^p)`` ``[2, n*h, c]`` fp32, or, when every strip is one row
    (``bins = (h,)``, the models' case, ``ROW_STRIPS``), the GeM output itself.
    ``BLOCK_W`` is chosen by the launcher so the padded columns stay under ~10% (w = 22 -> 8: 24
    columns; w = 11 -> 4: 12), not the next power of two (22 -> 32 wasted 31% of the lanes).
``gem_strips_kernel`` -- grid ``(S, n, cdiv(c, BLOCK_C))``: the small combine of row statistics
    into the ``S`` strips of all bins (two passes over the strip's rows: maximum, then the
    rescaled power sums; a fixed order, deterministic). Not launched with ``ROW_STRIPS``.
``gem_rows_bwd_kernel`` -- grid ``(h, n, cdiv(c, BLOCK_C))``, the forward's tiles: rebuilds
    ``y`` from the saved frame max, sums the contributions of the strip of every bin that holds
    the row, writes the gradient to the argmax frame and zeros to the others (every element of
    ``grad_x`` is written exactly once), and stores its share of ``d loss / d p`` in
    ``grad_p_partial[program]``; the launcher sums the partials in a fixed order (no atomics).

Index math: one int64 base per sample (``sample * stride_n``), int32 offsets inside it (the
launcher checks that one sample spans < 2**31 elements); no ``%`` or ``//`` inside loops.

Numerics. With ``y = max(x_max_over_t, eps)`` and a strip of ``count`` elements,
``out = (mean y^p)^(1/p)``, computed as ``out = y_max * (mean (y / y_max)^p)^(1/p)`` with the
maximum factored out (per row, then per strip), so ``y^p`` never under- or overflows fp32 (a dead
strip of ``eps`` values, ``eps^6.5 ~ 1e-39``, would otherwise flush to 0 on the GPU and give a
zero output and infinite gradients). The backward works with ``u = y / out``, whose range is
bounded (``u <= count^(1/p)``): ``d out / d y = u^(p-1) / count`` and
``d out / d p = out / p * sum(u^p * ln u) / count``. Powers are ``exp2(p * log2(.))`` (no
libdevice, so the interpreter runs them too).

Non-finite values and the domain of ``p``. NaN propagates as in the reference (a NaN anywhere
in a strip makes the strip NaN: the max over frames keeps the first NaN, the clamp keeps NaN,
``(y / y_max)^p`` is NaN for it); ``+inf`` gives ``+inf`` (``inf / inf`` is taken as 1). ``p`` is
valid when finite and ``> 0``; otherwise every output (and so every gradient) is NaN, checked on
the device without a host sync (see ``fastgait.ops.gem``).
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # a Triton constant: an annotated float is refused by the compiler


@triton.jit
def _valid_p(p):
    """GeM's domain: ``0 < p < inf`` (False for NaN)."""
    return (p > 0.0) & (p < float("inf"))


@triton.jit
def _frame_ok(frame, T):
    """``frame < T`` as a ``[1, 1]`` mask (the interpreter refuses a Python bool as a mask)."""
    return tl.full((1, 1), frame, tl.int32) < T


@triton.jit
def _clamp_eps(x, eps):
    """``clamp(x, min=eps)`` that keeps NaN (``tl.maximum`` would drop it)."""
    return tl.where(x < eps, eps, x)


@triton.jit
def _pow_ratio(a, log2_m, m, p):
    """``(a / m)^p`` for ``0 <= a <= m``, as ``exp2(p * (log2 a - log2 m))``; exactly 1 where
    ``a == m`` (also ``inf / inf``), NaN for NaN ``a``."""
    return tl.where(a == m, 1.0, tl.exp2(p * (tl.log2(a) - log2_m)))


@triton.jit
def _gem_value(y_max, mean_pow, p, p_ok):
    """``y_max * mean_pow^(1/p)``, NaN outside p's domain."""
    value = y_max * tl.exp2(tl.log2(mean_pow) / p)
    return tl.where(p_ok, value, float("nan"))


@triton.jit
def gem_rows_fwd_kernel(
    x_ptr,
    p_ptr,
    out_ptr,
    stats_ptr,
    frame_max_ptr,
    frame_arg_ptr,
    C,
    T,
    H,
    W,
    stride_xn,
    stride_xc,
    stride_xt,
    stride_xh,
    stride_xw,
    stride_mn,
    stride_mc,
    stride_mh,
    stride_mw,
    eps,
    ROW_STRIPS: tl.constexpr,
    SAVE_FRAME_MAX: tl.constexpr,
    UNROLL_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Max over frames, clamp and the power sum of one row for ``BLOCK_C`` channels.

    Grid: ``(H, n, cdiv(C, BLOCK_C))``; program ``(h, i, j)``: row ``h`` of sample ``i``, channels
    ``[j * BLOCK_C, (j + 1) * BLOCK_C)`` (no division to find them).

    Args:
        x_ptr: input ``[n, C, T, H, W]``, any float dtype, strides ``stride_x{n,c,t,h,w}`` in
            elements (a 4-D input is passed as ``T = 1``).
        p_ptr: the GeM exponent, one element.
        out_ptr: with ``ROW_STRIPS``: fp32 ``[n, C, H]`` contiguous, the GeM output (strip = row).
        stats_ptr: without ``ROW_STRIPS``: fp32 ``[2, n * H, C]`` contiguous: per (sample, row,
            channel) the row maximum of ``y`` and ``sum_w (y / row_max)^p``.
        frame_max_ptr, frame_arg_ptr: written when ``SAVE_FRAME_MAX``: the max over frames (input
            dtype) and its first frame (int16), ``[n, C, H, W]`` with strides ``stride_m{n,c,h,w}``.
        eps: the clamp floor (fp32).
        UNROLL_T: frames loaded per step; BLOCK_W: columns per tile; BLOCK_C: channels (powers of 2
            except UNROLL_T).
    """
    h = tl.program_id(0)
    sample = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_w = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    mask_c = offs_c < C
    p = tl.load(p_ptr).to(tl.float32)
    eps = tl.cast(eps, tl.float32)

    x_row = x_ptr + sample.to(tl.int64) * stride_xn + h * stride_xh  # int64 base, int32 offsets below
    m_row = sample.to(tl.int64) * stride_mn + h * stride_mh
    row_max = tl.full((BLOCK_C,), 0.0, tl.float32)  # [BLOCK_C] running max of y (y >= eps > 0)
    row_pow = tl.zeros((BLOCK_C,), tl.float32)  # [BLOCK_C] sum (y / row_max)^p
    for w0 in range(0, W, BLOCK_W):
        cols = w0 + offs_w  # [BLOCK_W]
        mask = (cols < W)[:, None] & mask_c[None, :]  # [BLOCK_W, BLOCK_C]
        offs = cols[:, None] * stride_xw + offs_c[None, :] * stride_xc  # [BLOCK_W, BLOCK_C] int32
        best = tl.full((BLOCK_W, BLOCK_C), float("-inf"), tl.float32)
        best_t = tl.zeros((BLOCK_W, BLOCK_C), tl.int32)
        for t0 in range(0, T, UNROLL_T):
            for i in tl.static_range(UNROLL_T):
                frame = t0 + i
                vals = tl.load(x_row + frame * stride_xt + offs, mask=mask & _frame_ok(frame, T), other=float("-inf"))
                vals = vals.to(tl.float32)  # [BLOCK_W, BLOCK_C]
                # torch.max's rules: the first maximal frame; the first NaN wins and stays.
                take = (vals > best) | ((vals != vals) & (best == best))
                best = tl.where(take, vals, best)
                best_t = tl.where(take, frame, best_t)
        if SAVE_FRAME_MAX:
            m_offs = m_row + cols[:, None] * stride_mw + offs_c[None, :] * stride_mc
            tl.store(frame_max_ptr + m_offs, best.to(frame_max_ptr.dtype.element_ty), mask=mask)
            tl.store(frame_arg_ptr + m_offs, best_t.to(tl.int16), mask=mask)
        y = tl.where(mask, _clamp_eps(best, eps), 0.0)  # [BLOCK_W, BLOCK_C]; padding 0 -> power 0
        new_max = tl.maximum(row_max, tl.max(y, axis=0))  # [BLOCK_C] (a NaN y propagates below)
        log2_new = tl.log2(new_max)
        powered = tl.where(mask, _pow_ratio(y, log2_new[None, :], new_max[None, :], p), 0.0)
        row_pow = row_pow * _pow_ratio(row_max, log2_new, new_max, p) + tl.sum(powered, axis=0)
        row_max = new_max

    # (sample, row) straight from the program ids (a row index computed with a division and kept
    # live across the loop was spilled by ptxas 12.8, Triton 3.6).
    sample64 = sample.to(tl.int64)
    if ROW_STRIPS:
        result = out_ptr + sample64 * C * H + h + offs_c * H  # out[sample, c, h]
        tl.store(result, _gem_value(row_max, row_pow / W, p, _valid_p(p)), mask=mask_c)  # (W may be the constant 1)
    else:
        result = stats_ptr + (sample64 * H + h) * C + offs_c  # stats[0, sample * H + h, c]
        tl.store(result, row_max, mask=mask_c)
        tl.store(result + tl.num_programs(1).to(tl.int64) * H * C, row_pow, mask=mask_c)


@triton.jit
def gem_strips_kernel(
    stats_ptr,
    p_ptr,
    strip_rows_ptr,
    out_ptr,
    C,
    H,
    W,
    S,
    BLOCK_C: tl.constexpr,
):
    """Row statistics -> the strips of every bin: ``out [n, C, S]`` fp32 contiguous.

    Grid: ``(S, n, cdiv(C, BLOCK_C))``; program ``(s, i, j)``: strip ``s`` (rows
    ``[strip_rows[s], strip_rows[S + s])``) of sample ``i``, channels of block ``j``. Two passes over the
    strip's rows in order (deterministic): the strip maximum, then the rescaled power sums.
    """
    s = tl.program_id(0)
    sample = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = offs_c < C
    p = tl.load(p_ptr).to(tl.float32)
    lo = tl.load(strip_rows_ptr + s)
    hi = tl.load(strip_rows_ptr + S + s)
    rows_max = stats_ptr + sample.to(tl.int64) * H * C + offs_c  # [BLOCK_C]; row r at + r * C
    rows_pow = rows_max + tl.num_programs(1).to(tl.int64) * H * C
    strip_max = tl.zeros((BLOCK_C,), tl.float32)
    for r in range(lo, hi):
        strip_max = tl.maximum(strip_max, tl.load(rows_max + r * C, mask=mask_c, other=1.0))
    log2_max = tl.log2(strip_max)
    strip_pow = tl.zeros((BLOCK_C,), tl.float32)
    for r in range(lo, hi):
        r_max = tl.load(rows_max + r * C, mask=mask_c, other=1.0)
        r_pow = tl.load(rows_pow + r * C, mask=mask_c, other=1.0)
        strip_pow += r_pow * _pow_ratio(r_max, log2_max, strip_max, p)
    value = _gem_value(strip_max, strip_pow / ((hi - lo) * W).to(tl.float32), p, _valid_p(p))
    tl.store(out_ptr + (sample.to(tl.int64) * C + offs_c) * S + s, value, mask=mask_c)


@triton.jit
def gem_rows_bwd_kernel(
    grad_out_ptr,
    out_ptr,
    p_ptr,
    frame_max_ptr,
    frame_arg_ptr,
    strip_rows_ptr,
    row_strip_ptr,
    grad_x_ptr,
    grad_p_partial_ptr,
    C,
    T,
    H,
    W,
    S,
    NUM_BINS,
    stride_gn,
    stride_gc,
    stride_gs,
    stride_mn,
    stride_mc,
    stride_mh,
    stride_mw,
    stride_an,
    stride_ac,
    stride_ah,
    stride_aw,
    stride_dn,
    stride_dc,
    stride_dt,
    stride_dh,
    stride_dw,
    eps,
    HAS_FRAMES: tl.constexpr,
    UNROLL_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """GeM-HPP backward for one (sample, row, channel block): ``grad_x`` and a ``grad_p`` partial.

    Grid: ``(H, n, cdiv(C, BLOCK_C))``, the forward's. ``grad_p_partial_ptr[(i * H + h) * cdiv(C, BLOCK_C) + j]``
    receives program ``(h, i, j)``'s share of ``d loss / d p``.

    Args:
        grad_out_ptr: ``[n, C, S]``, any float dtype, strides ``stride_g{n,c,s}``.
        out_ptr: the forward's fp32 output, ``[n, C, S]`` contiguous.
        p_ptr: the exponent, one element.
        frame_max_ptr: the max over frames ``[n, C, H, W]`` (strides ``stride_m{n,c,h,w}``), or the
            4-D input itself.
        frame_arg_ptr: int16 first argmax frame, strides ``stride_a{n,c,h,w}``; read when ``HAS_FRAMES``.
        strip_rows_ptr: int32 ``[2, S]``: first and one-past-last row of every strip.
        row_strip_ptr: int32 ``[NUM_BINS, H]``: the strip (global index) holding each row, per bin.
        grad_x_ptr: ``[n, C, T, H, W]`` in the input dtype, strides ``stride_d{n,c,t,h,w}``.
        grad_p_partial_ptr: fp32 ``[n * H * cdiv(C, BLOCK_C)]``.
        eps: the clamp floor; the clamp passes the gradient where ``x >= eps`` (as torch).
        HAS_FRAMES: False for the 4-D entry (``T = 1``, no argmax).
    """
    h = tl.program_id(0)
    sample = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_w = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    mask_c = offs_c < C
    p = tl.load(p_ptr).to(tl.float32)
    eps = tl.cast(eps, tl.float32)
    sample64 = sample.to(tl.int64)

    m_row = frame_max_ptr + sample64 * stride_mn + h * stride_mh
    a_row = frame_arg_ptr + sample64 * stride_an + h * stride_ah
    d_row = grad_x_ptr + sample64 * stride_dn + h * stride_dh
    out_row = out_ptr + (sample64 * C + offs_c) * S  # [BLOCK_C]
    grad_row = grad_out_ptr + sample64 * stride_gn + offs_c * stride_gc  # [BLOCK_C]

    grad_p_acc = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    for w0 in range(0, W, BLOCK_W):
        cols = w0 + offs_w  # [BLOCK_W]
        mask = (cols < W)[:, None] & mask_c[None, :]  # [BLOCK_W, BLOCK_C]
        x_max = tl.load(m_row + cols[:, None] * stride_mw + offs_c[None, :] * stride_mc, mask=mask, other=1.0)
        x_max = x_max.to(tl.float32)  # [BLOCK_W, BLOCK_C]
        y = _clamp_eps(x_max, eps)
        grad_y = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
        grad_p_here = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
        for b in range(NUM_BINS):
            s = tl.load(row_strip_ptr + b * H + h)
            count = (tl.load(strip_rows_ptr + S + s) - tl.load(strip_rows_ptr + s)) * W
            inv_count = 1.0 / count.to(tl.float32)
            out_s = tl.load(out_row + s, mask=mask_c, other=1.0)  # [BLOCK_C]
            grad_s = tl.load(grad_row + s * stride_gs, mask=mask_c, other=0.0).to(tl.float32) * inv_count
            u = y / out_s[None, :]  # [BLOCK_W, BLOCK_C]
            log2_u = tl.log2(u)
            u_pow_m1 = tl.exp2((p - 1.0) * log2_u)  # u^(p-1)
            grad_y += grad_s[None, :] * u_pow_m1
            grad_p_here += (grad_s * out_s)[None, :] * (u_pow_m1 * u * log2_u)
        grad_p_acc += tl.where(mask, grad_p_here, 0.0)
        grad_y = tl.where(x_max >= eps, grad_y, 0.0)  # the clamp's gradient (0 for NaN, as torch)
        offs = cols[:, None] * stride_dw + offs_c[None, :] * stride_dc  # [BLOCK_W, BLOCK_C] int32
        if HAS_FRAMES:
            arg = tl.load(a_row + cols[:, None] * stride_aw + offs_c[None, :] * stride_ac, mask=mask, other=-1)
            arg = arg.to(tl.int32)  # [BLOCK_W, BLOCK_C]
            for t0 in range(0, T, UNROLL_T):
                for i in tl.static_range(UNROLL_T):
                    frame = t0 + i
                    vals = tl.where(arg == frame, grad_y, 0.0)
                    tl.store(
                        d_row + frame * stride_dt + offs, vals.to(grad_x_ptr.dtype.element_ty), mask=mask & _frame_ok(frame, T)
                    )
        else:
            tl.store(d_row + offs, grad_y.to(grad_x_ptr.dtype.element_ty), mask=mask)
    partial = tl.sum(tl.sum(grad_p_acc, axis=1), axis=0) * (LN2 / p)
    program = (tl.program_id(1).to(tl.int64) * H + tl.program_id(0)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(grad_p_partial_ptr + program, partial)
