"""Triton kernels of GeM over horizontal strips fused with the temporal max (fused_ops.md §3).

Launchers, autograd and the ``torch.library`` registration: ``fastgait.ops.gem``.

Both kernels run one program per (sample, block of ``BLOCK_C`` channels) and walk the rows of
the feature map one at a time; a row is a ``[BLOCK_T, BLOCK_C, BLOCK_W]`` tile (frames, channels,
columns), so any memory format of the input (``[n, c, t, h, w]`` contiguous or channels-last-3d)
is read through its strides without a copy.

Numerics. With ``y = max(x_max_over_t, eps)`` and a strip of ``count`` elements,
``out = (mean y^p)^(1/p)``. The forward factors out the strip maximum ``y_max``:
``out = y_max * (mean (y / y_max)^p)^(1/p)``, so ``y^p`` never under- or overflows fp32 (a dead
strip of ``eps`` values, ``eps^6.5 ~ 1e-39``, would otherwise flush to 0 on the GPU and give a
zero output and infinite gradients). The backward works with ``u = y / out``, whose range is
bounded (``u <= count^(1/p)``):
``d out / d y = u^(p-1) / count`` and ``d out / d p = out / p * sum(u^p * ln u) / count``.
Powers are ``exp2(p * log2(.))`` (no libdevice, so the interpreter runs them too).
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # a Triton constant: an annotated float is refused by the compiler


@triton.jit
def _program_tile(C, W, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's sample, channels ``[BLOCK_C]``, columns ``[BLOCK_W]`` and their masks
    (grid ``(n * cdiv(C, BLOCK_C),)``, the channel blocks of a sample next to each other)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    sample = (pid // c_blocks).to(tl.int64)
    offs_c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_w = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    mask_c = offs_c < C
    mask_cw = mask_c[:, None] & (offs_w < W)[None, :]  # [BLOCK_C, BLOCK_W]
    return sample, offs_c, offs_w, mask_c, mask_cw


@triton.jit
def _frame_max_row(
    x_row_ptrs,  # [BLOCK_C, BLOCK_W] pointers to frame 0 of one row
    stride_t,
    T,
    mask_cw,  # [BLOCK_C, BLOCK_W]
    BLOCK_T: tl.constexpr,
):
    """Max over frames of one row and the first frame that reaches it (torch.max's tie rule)."""
    offs_t = tl.arange(0, BLOCK_T)
    best = tl.full(mask_cw.shape, float("-inf"), tl.float32)  # [BLOCK_C, BLOCK_W]
    best_t = tl.zeros(mask_cw.shape, tl.int32)  # [BLOCK_C, BLOCK_W]
    for t0 in range(0, T, BLOCK_T):
        frames = t0 + offs_t  # [BLOCK_T]
        mask = (frames < T)[:, None, None] & mask_cw[None, :, :]  # [BLOCK_T, BLOCK_C, BLOCK_W]
        ptrs = x_row_ptrs[None, :, :] + frames[:, None, None].to(tl.int64) * stride_t
        vals = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)  # [BLOCK_T, BLOCK_C, BLOCK_W]
        chunk_max, chunk_arg = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: an equal maximum in a later chunk keeps the earlier frame.
        better = chunk_max > best
        best_t = tl.where(better, chunk_arg + t0, best_t)
        best = tl.where(better, chunk_max, best)
    return best, best_t


@triton.jit
def gem_hpp_fwd_kernel(
    x_ptr,
    p_ptr,
    strip_rows_ptr,
    out_ptr,
    frame_max_ptr,
    frame_arg_ptr,
    C,
    T,
    H,
    W,
    S,
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
    SAVE_FRAME_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """GeM-HPP forward: ``x [n, c, t, h, w]`` -> ``out [n, c, S]`` (fp32), all bins at once.

    Grid: ``(n * cdiv(C, BLOCK_C),)``; program ``pid`` takes sample ``pid // cdiv(C, BLOCK_C)``
    and channels ``[BLOCK_C * (pid % cdiv(C, BLOCK_C)), ...)``.

    Args:
        x_ptr: input, any float dtype, strides ``stride_x{n,c,t,h,w}`` (elements). A 4-D input
            is passed as ``t = 1``.
        p_ptr: the GeM exponent, one element.
        strip_rows_ptr: int32 ``[2, S]``: first row and one-past-last row of every strip, the
            strips of all bins one after another.
        out_ptr: fp32 ``[n, C, S]`` contiguous.
        frame_max_ptr, frame_arg_ptr: written when ``SAVE_FRAME_MAX``: the max over frames
            (input dtype, strides ``stride_m{n,c,h,w}``) and its first frame (int16, the same
            strides), both ``[n, C, H, W]``; what the backward needs.
        C, T, H, W: sizes; S: strips over all bins.
        eps: the clamp floor (fp32).
        BLOCK_T: frames per load (a power of two); BLOCK_C: channels per program;
        BLOCK_H >= H, BLOCK_W >= W: powers of two.
    """
    sample, offs_c, offs_w, mask_c, mask_cw = _program_tile(C, W, BLOCK_C, BLOCK_W)
    offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    p = tl.load(p_ptr).to(tl.float32)
    eps = tl.cast(eps, tl.float32)

    x_row0 = (
        x_ptr + sample * stride_xn + offs_c[:, None].to(tl.int64) * stride_xc + offs_w[None, :] * stride_xw
    )  # [BLOCK_C, BLOCK_W]
    m_row0 = sample * stride_mn + offs_c[:, None].to(tl.int64) * stride_mc + offs_w[None, :] * stride_mw

    # Per row: its maximum and sum((y / row_max)^p); rows past H keep (1, 0).
    row_max = tl.full((BLOCK_C, BLOCK_H), 1.0, tl.float32)  # [BLOCK_C, BLOCK_H]
    row_pow = tl.zeros((BLOCK_C, BLOCK_H), tl.float32)  # [BLOCK_C, BLOCK_H]
    for h in range(H):
        best, best_t = _frame_max_row(x_row0 + h * stride_xh, stride_xt, T, mask_cw, BLOCK_T)
        if SAVE_FRAME_MAX:
            tl.store(frame_max_ptr + m_row0 + h * stride_mh, best.to(frame_max_ptr.dtype.element_ty), mask=mask_cw)
            tl.store(frame_arg_ptr + m_row0 + h * stride_mh, best_t.to(tl.int16), mask=mask_cw)
        y = tl.where(mask_cw, tl.maximum(best, eps), 0.0)  # [BLOCK_C, BLOCK_W]
        y_max = tl.where(mask_c, tl.max(y, axis=1), 1.0)  # [BLOCK_C]
        ratio = tl.where(mask_cw, y / y_max[:, None], 1.0)
        powered = tl.where(mask_cw, tl.exp2(p * tl.log2(ratio)), 0.0)
        here = offs_h[None, :] == h  # [1, BLOCK_H]
        row_max = tl.where(here, y_max[:, None], row_max)
        row_pow = tl.where(here, tl.sum(powered, axis=1)[:, None], row_pow)

    log_row_max = tl.log2(row_max)  # [BLOCK_C, BLOCK_H]
    out_row = out_ptr + (sample * C + offs_c) * S  # [BLOCK_C]
    for s in range(S):
        lo = tl.load(strip_rows_ptr + s)
        hi = tl.load(strip_rows_ptr + S + s)
        in_strip = ((offs_h >= lo) & (offs_h < hi))[None, :]  # [1, BLOCK_H]
        strip_max = tl.max(tl.where(in_strip, row_max, 0.0), axis=1)  # [BLOCK_C]
        # (row_max / strip_max)^p for the strip's rows, 0 elsewhere (never an overflowing power).
        log_ratio = tl.where(in_strip, log_row_max - tl.log2(strip_max)[:, None], float("-inf"))
        strip_pow = tl.sum(row_pow * tl.exp2(p * log_ratio), axis=1)  # [BLOCK_C]
        mean_pow = tl.where(mask_c, strip_pow / ((hi - lo) * W).to(tl.float32), 1.0)
        tl.store(out_row + s, strip_max * tl.exp2(tl.log2(mean_pow) / p), mask=mask_c)


@triton.jit
def gem_hpp_bwd_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """GeM-HPP backward: ``grad_x [n, c, t, h, w]`` and one partial of ``grad_p`` per program.

    Grid: ``(n * cdiv(C, BLOCK_C),)``, the forward's. Each program rebuilds ``y`` from the saved
    frame max, sums the contributions of the strip of every bin that holds the row, writes the
    gradient to the argmax frame and zeros to the other frames (every element of ``grad_x`` is
    written), and stores its share of ``d loss / d p`` in ``grad_p_partial_ptr[pid]``; the
    launcher sums those partials in a fixed order (deterministic, no atomics).

    Args:
        grad_out_ptr: ``[n, C, S]``, any float dtype, strides ``stride_g{n,c,s}``.
        out_ptr: the forward's fp32 output, ``[n, C, S]`` contiguous.
        p_ptr: the exponent, one element.
        frame_max_ptr: the max over frames ``[n, C, H, W]`` (strides ``stride_m{n,c,h,w}``), or
            the 4-D input itself.
        frame_arg_ptr: int16 first argmax frame, strides ``stride_a{n,c,h,w}``; read only when
            ``HAS_FRAMES``.
        strip_rows_ptr: int32 ``[2, S]`` strip row bounds (see the forward).
        row_strip_ptr: int32 ``[NUM_BINS, H]``: the strip (global index) holding each row, per bin.
        grad_x_ptr: ``[n, C, T, H, W]`` in the input dtype, strides ``stride_d{n,c,t,h,w}``.
        grad_p_partial_ptr: fp32 ``[grid]``.
        eps: the clamp floor; the clamp passes the gradient where ``x >= eps`` (as torch).
        HAS_FRAMES: False for the 4-D entry (``T = 1``, no argmax).
    """
    sample, offs_c, offs_w, mask_c, mask_cw = _program_tile(C, W, BLOCK_C, BLOCK_W)
    offs_t = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    p = tl.load(p_ptr).to(tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs_c64 = offs_c[:, None].to(tl.int64)
    m_row0 = frame_max_ptr + sample * stride_mn + offs_c64 * stride_mc + offs_w[None, :] * stride_mw
    a_row0 = frame_arg_ptr + sample * stride_an + offs_c64 * stride_ac + offs_w[None, :] * stride_aw
    d_row0 = grad_x_ptr + sample * stride_dn + offs_c64 * stride_dc + offs_w[None, :] * stride_dw
    out_row = out_ptr + (sample * C + offs_c) * S  # [BLOCK_C]
    grad_row = grad_out_ptr + sample * stride_gn + offs_c.to(tl.int64) * stride_gc  # [BLOCK_C]

    grad_p_acc = tl.zeros((BLOCK_C, BLOCK_W), tl.float32)  # [BLOCK_C, BLOCK_W]
    for h in range(H):
        x_max = tl.load(m_row0 + h * stride_mh, mask=mask_cw, other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_W]
        y = tl.maximum(x_max, eps)
        grad_y = tl.zeros((BLOCK_C, BLOCK_W), tl.float32)  # [BLOCK_C, BLOCK_W]
        for b in range(NUM_BINS):
            s = tl.load(row_strip_ptr + b * H + h)
            count = (tl.load(strip_rows_ptr + S + s) - tl.load(strip_rows_ptr + s)) * W
            inv_count = 1.0 / count.to(tl.float32)
            out_s = tl.load(out_row + s, mask=mask_c, other=1.0)  # [BLOCK_C]
            grad_s = tl.load(grad_row + s * stride_gs, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
            u = y / out_s[:, None]  # [BLOCK_C, BLOCK_W]
            log2_u = tl.log2(u)
            u_pow_m1 = tl.exp2((p - 1.0) * log2_u)  # u^(p-1)
            grad_y += grad_s[:, None] * u_pow_m1 * inv_count
            grad_p_acc += (grad_s * out_s)[:, None] * (u_pow_m1 * u * log2_u) * (LN2 * inv_count / p)
        grad_y = tl.where(mask_cw & (x_max >= eps), grad_y, 0.0)
        grad_p_acc = tl.where(mask_cw, grad_p_acc, 0.0)
        if HAS_FRAMES:
            arg = tl.load(a_row0 + h * stride_ah, mask=mask_cw, other=-1).to(tl.int32)  # [BLOCK_C, BLOCK_W]
            for t0 in range(0, T, BLOCK_T):
                frames = t0 + offs_t  # [BLOCK_T]
                mask = (frames < T)[:, None, None] & mask_cw[None, :, :]  # [BLOCK_T, BLOCK_C, BLOCK_W]
                vals = tl.where(arg[None, :, :] == frames[:, None, None], grad_y[None, :, :], 0.0)
                ptrs = d_row0[None, :, :] + h * stride_dh + frames[:, None, None].to(tl.int64) * stride_dt
                tl.store(ptrs, vals.to(grad_x_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(d_row0 + h * stride_dh, grad_y.to(grad_x_ptr.dtype.element_ty), mask=mask_cw)
    tl.store(grad_p_partial_ptr + tl.program_id(0), tl.sum(tl.sum(grad_p_acc, axis=1), axis=0))
