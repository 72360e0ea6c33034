"""GPU parity of the fused ops at the papers' shapes, bf16 under autocast and fp32.

The bound (``fastgait.testing.assert_within_reference_error``): for the output and every gradient,
the fused op's relative error against a float64 computation is at most 1.5x the plain reference's
own error at the same precision (the reference run in bf16 under autocast, or in fp32 with TF32
allowed, as the trainer allows it), plus a small floor. It passes for rounding as good as the
reference's and fails for a wrong kernel (errors of order 1). fp32 on the GPU: the MLA kernels'
``tl.dot`` runs fp32 inputs as TF32, as cuDNN does for the reference when the trainer enables TF32
(``torch.backends.cudnn.allow_tf32``), so fp32 is held to a TF32 reference's error.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastgait.ops import draw_band_starts, draw_mask, gem_hpp, part_distance, rmb_conv3d, triplet_loss
from fastgait.ops.gl import gl_conv3d_triton
from fastgait.ops.mla import DESIGNS, mla_conv3d_triton
from fastgait.ops.reference import (
    band_height as band_rows_for,
    gem_hpp_reference,
    gl_conv3d_reference,
    mla_conv3d_reference,
    part_distance_reference,
    triplet_loss_reference,
)
from fastgait.testing import assert_within_reference_error

pytestmark = pytest.mark.gpu

MLA_SHAPES = [(32, 64, 64, 44, "add"), (64, 128, 32, 22, "add"), (128, 128, 32, 22, "concat")]


@contextlib.contextmanager
def tf32(allowed: bool):
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def _precision(dtype: torch.dtype):
    """How the low-precision runs execute: bf16 under autocast; fp32 with TF32 allowed."""
    if dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return tf32(True)


def _forward_backward(fn, leaves, upstream):
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("c_in, c_out, h, w, fuse", MLA_SHAPES)
def test_mla_parity(design, c_in, c_out, h, w, fuse, dtype):
    gen = torch.Generator(device="cuda").manual_seed(41)
    n, t = 8, 10
    band_rows = band_rows_for(h, 0.4)
    x = torch.randn(n, c_in, t, h, w, device="cuda", generator=gen).to(memory_format=torch.channels_last_3d)
    weights = [torch.randn(c_out, c_in, 3, 3, 3, device="cuda", generator=gen) * (c_in * 27) ** -0.5
               for _ in range(2)]
    band_start = draw_band_starts(n, h, band_rows, device=torch.device("cuda"))
    leaves = [x.requires_grad_(), *(wt.requires_grad_() for wt in weights)]
    out_shape = (n, c_out, t, 2 * h if fuse == "concat" else h, w)
    upstream = torch.randn(out_shape, device="cuda", generator=gen)

    def fused(x, wg, wl):
        return mla_conv3d_triton(x, wg, wl, band_start, band_rows, fuse, design=design)

    def reference(x, wg, wl):
        return mla_conv3d_reference(x, wg, wl, band_start, band_rows, fuse)

    with _precision(dtype):
        got = _forward_backward(fused, leaves, upstream)
        low = _forward_backward(reference, leaves, upstream)
    assert got[0].dtype == dtype
    with tf32(False):
        exact = _forward_backward(reference, [leaf.double() for leaf in leaves], upstream.double())
    assert_within_reference_error(("y", "dx", "dw_global", "dw_local"), got, low, exact)


@pytest.mark.parametrize("design", ["auto", "gemm>hybrid", "hybrid>gemm", "hybrid2d>hybrid"])
def test_mla_parity_auto_and_mixed_designs(design, monkeypatch):
    """``design="auto"`` times every design on the GPU (forward and backward apart) and runs the
    fastest; a forward of one design with the backward of another is as exact as either."""
    from fastgait.ops import _autotune, conv_engine

    monkeypatch.delenv(conv_engine.DESIGN_ENV, raising=False)
    if ">" in design:
        picked = dict(zip(("fwd", "bwd"), design.split(">")))
        monkeypatch.setattr(conv_engine.CHOOSER, "choose", lambda key, run, device: picked[key[1]])
    with _autotune.usage() as used:
        test_mla_parity("auto", *MLA_SHAPES[1], torch.bfloat16)
    if design == "auto":
        assert sorted(c.key[1] for c in used.values()) == ["bwd", "fwd"]
        assert all(c.how in ("timed", "cached") and set(c.timings_ms) == set(conv_engine.DESIGNS)
                   for c in used.values())


@pytest.mark.parametrize("design", DESIGNS)
def test_mla_parity_in_chunks(design, monkeypatch):
    """The batch in uneven chunks of samples (3 + 3 + 2 of 8; the real budget chunks only batches
    over 16 samples) is as exact as the whole batch at once, forward and every gradient."""
    from fastgait.ops import conv_engine

    monkeypatch.setattr(conv_engine, "MIN_CHUNK_SAMPLES", 1)
    monkeypatch.setattr(conv_engine, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_engine, "chunk_samples", lambda n, per_sample_bytes: 3)
    test_mla_parity(design, *MLA_SHAPES[0], torch.bfloat16)


def _conv_inputs(gen, n, c_in, c_out, t, h, w, weights):
    x = torch.randn(n, c_in, t, h, w, device="cuda", generator=gen).to(memory_format=torch.channels_last_3d)
    ws = [torch.randn(c_out, c_in, 3, 3, 3, device="cuda", generator=gen) * (c_in * 27) ** -0.5 for _ in range(weights)]
    return [x.requires_grad_(), *(wt.requires_grad_() for wt in ws)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("c_in, c_out, h, w, fm_sign", [(32, 64, 64, 44, False), (64, 128, 32, 22, False),
                                                        (128, 128, 32, 22, True)])
def test_gl_parity(design, c_in, c_out, h, w, fm_sign, dtype):
    """GaitGL's GL blocks (halving 3: 8 strips) at the CASIA-B shapes."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    leaves = _conv_inputs(gen, 8, c_in, c_out, 10, h, w, 2)
    upstream = torch.randn(8, c_out, 10, 2 * h if fm_sign else h, w, device="cuda", generator=gen)

    def fused(x, wg, wl):
        return gl_conv3d_triton(x, wg, wl, 3, fm_sign, design=design)

    def reference(x, wg, wl):
        return gl_conv3d_reference(x, wg, wl, 3, fm_sign)

    with _precision(dtype):
        got = _forward_backward(fused, leaves, upstream)
        low = _forward_backward(reference, leaves, upstream)
    with tf32(False):
        exact = _forward_backward(reference, [leaf.detach().double().requires_grad_() for leaf in leaves],
                                  upstream.double())
    assert_within_reference_error(("y", "dx", "dw_global", "dw_local"), got, low, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("region", ["unit", "band", "block"])
@pytest.mark.parametrize("fuse", ["add", "concat"])
def test_reverse_mask_parity(region, fuse, dtype):
    """The Inception RMB (global, dropping and scaling branches) at ReverseMaskNet's 64->128 at 32x22."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    c_in, c_out, h, w = 64, 128, 32, 22
    leaves = _conv_inputs(gen, 8, c_in, c_out, 10, h, w, 3)
    torch.manual_seed(3)
    draw = draw_mask(region, 0.5, h, w, device=torch.device("cuda"))
    scales = torch.tensor([[1.0, 0.0], [0.3, 0.8]], device="cuda")
    rows = 3 * h if fuse == "concat" else h  # concat: the global, dropping and scaling branches along H
    upstream = torch.randn(8, c_out, 10, rows, w, device="cuda", generator=gen)

    def run(impl):
        return lambda x, wg, wd, ws: rmb_conv3d(x, wg, [wd, ws], scales, draw, fuse, impl=impl)

    with _precision(dtype):
        got = _forward_backward(run("triton"), leaves, upstream)
        low = _forward_backward(run("reference"), leaves, upstream)
    with tf32(False):
        exact = _forward_backward(run("reference"), [leaf.detach().double().requires_grad_() for leaf in leaves],
                                  upstream.double())
    assert_within_reference_error(("y", "dx", "dw_global", "dw_dropping", "dw_scaling"), got, low, exact)


@pytest.mark.parametrize("bins", [(64,), (1, 2, 4, 8, 16)])
def test_gem_parity(bins):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 128, 10, 64, 22, device="cuda", generator=gen).relu()
    x = x.to(torch.bfloat16).float().to(memory_format=torch.channels_last_3d)  # exact in bf16
    p = torch.tensor([6.5], device="cuda")
    upstream = torch.randn(128, 128, sum(bins), device="cuda", generator=gen)
    leaves = [x.requires_grad_(), p.requires_grad_()]
    got = _forward_backward(lambda x, p: gem_hpp(x.to(torch.bfloat16), p, bins, impl="triton"), leaves, upstream)
    low = _forward_backward(lambda x, p: gem_hpp_reference(x.to(torch.bfloat16), p.to(torch.bfloat16), bins),
                            leaves, upstream)
    exact = _forward_backward(lambda x, p: gem_hpp_reference(x, p, bins),
                              [leaf.detach().double().requires_grad_() for leaf in leaves], upstream.double())
    assert got[0].dtype == torch.bfloat16
    assert_within_reference_error(("out", "grad_x", "grad_p"), got, low, exact)


@pytest.mark.parametrize("identities, per_identity", [(8, 16), (32, 8)])
def test_triplet_parity(identities, per_identity):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = identities * per_identity
    embeddings = torch.randn(n, 128, 64, device="cuda", generator=gen).to(torch.bfloat16).float()
    labels = torch.arange(identities, device="cuda").repeat_interleave(per_identity)
    labels = labels[torch.randperm(n, device="cuda", generator=gen)]
    leaves = [embeddings.requires_grad_()]
    upstream = torch.ones((), device="cuda")

    def run(fn, x):
        return fn(x, labels)[0]

    got = _forward_backward(lambda x: run(lambda e, l: triplet_loss(e.to(torch.bfloat16), l, 0.2, impl="triton"), x),
                            leaves, upstream)
    low = _forward_backward(lambda x: run(lambda e, l: triplet_loss_reference(e.to(torch.bfloat16), l, 0.2), x),
                            leaves, upstream)
    exact = _forward_backward(lambda x: run(lambda e, l: triplet_loss_reference(e, l, 0.2), x),
                              [embeddings.detach().double().requires_grad_()], upstream.double())
    assert_within_reference_error(("loss", "grad"), got, low, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("metric", ["euc", "cos"])
def test_part_distance_parity(metric, dtype):
    """Evaluation distances: the fused op against float64, bounded by the reference's error in the
    same dtype with full-fp32 matmuls (evaluation promises fp32 accuracy, not TF32)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    probe = torch.randn(1000, 128, 64, device="cuda", generator=gen).to(dtype)
    gallery = torch.randn(64, 1200, 128, device="cuda", generator=gen).to(dtype).permute(1, 2, 0)
    with tf32(False):
        got = part_distance(probe, gallery, metric, impl="triton")
        low = part_distance_reference(probe, gallery, metric)
        exact = part_distance_reference(probe.double(), gallery.double(), metric)
    assert_within_reference_error(("distance",), (got,), (low,), (exact,))
