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
