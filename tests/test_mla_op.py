"""``fastgait.ops.mla_conv3d`` against the reference MLA block, in value and in every gradient.

Triton runs in the interpreter here (CPU tensors, fp32; the root conftest.py sets
TRITON_INTERPRET), so shapes are tiny; tests/test_gpu_parity.py checks bf16 and fp32 at the CASIA-B shapes on a GPU.
Each case gets fresh random inputs from its own seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from fastgait.ops import mla_conv3d
from fastgait.ops.mla import DEFAULT_DESIGN, DESIGNS, mla_conv3d_triton
from fastgait.ops.reference import mla_conv3d_reference
from fastgait.testing import assert_close, poisoned_outputs, relative_error

# "torch" is the band-aware PyTorch path; the others are the two Triton designs.
IMPLS = ("torch",) + tuple(f"triton-{design}" for design in DESIGNS)
OUTPUT_AND_GRADS = ("y", "dx", "dweight_global", "dweight_local")


@dataclass(frozen=True)
class Case:
    n: int = 2
    c_in: int = 3
    c_out: int = 4
    t: int = 2
    h: int = 7
    w: int = 5
    band_rows: int = 2
    band_starts: Optional[tuple[int, ...]] = (1, 4)  # None: evaluation
    fuse: str = "add"
    has_global: bool = True
    seed: int = 0


# H is never a multiple of a block size, W is odd; bands of 1..4 rows exercise every way the
# boundary rows and the rows next to them can coincide.
CASES = {
    "per-sample": Case(),
    "top-concat": Case(t=3, h=6, w=3, band_rows=3, band_starts=(0, 0), fuse="concat", seed=1),
    "bottom-T1": Case(t=1, band_rows=3, band_starts=(4, 4), seed=2),
    "rows1-edges": Case(t=4, h=5, band_rows=1, band_starts=(0, 4), seed=3),
    "rows4-T5": Case(n=2, c_in=8, c_out=17, t=5, h=9, w=7, band_rows=4, band_starts=(2, 5), seed=4),
    "height0": Case(band_rows=0, band_starts=(0, 3), seed=5),
    "heightH": Case(band_rows=7, band_starts=(0, 0), fuse="concat", seed=6),
    "eval": Case(band_starts=None, seed=7),
    "local-only": Case(n=1, t=3, band_rows=5, band_starts=(1,), has_global=False, fuse="concat", seed=8),
}


def make_inputs(case: Case, layout: str = "contiguous", device: str = "cpu"):
    """Fresh inputs for ``case``: (x, weight_global, weight_local, band_start), leaves with grad."""
    torch.manual_seed(case.seed)
    shape = (case.n, case.c_in, case.t, case.h, case.w)
    if layout == "contiguous":
        x = torch.randn(shape, device=device)
    elif layout == "channels-last":
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # every other column of a wider map, frames and rows swapped in memory
        wide = torch.randn(case.n, case.c_in, case.h, case.t, 2 * case.w, device=device)
        x = wide.transpose(2, 3)[..., ::2]
    else:
        raise ValueError(layout)
    scale = 1.0 / math.sqrt(27 * case.c_in)
    weight_local = torch.randn(case.c_out, case.c_in, 3, 3, 3, device=device) * scale
    weight_global = torch.randn(case.c_out, case.c_in, 3, 3, 3, device=device) * scale if case.has_global else None
    band_start = None if case.band_starts is None else torch.tensor(case.band_starts, device=device)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight_global, weight_local)]
    return (*leaves, band_start)


def run(impl: str, x, weight_global, weight_local, band_start, case: Case):
    args = (x, weight_global, weight_local, band_start, case.band_rows, case.fuse)
    if impl.startswith("triton-"):
        return mla_conv3d_triton(*args, design=impl.split("-", 1)[1])
    return mla_conv3d(*args, impl=impl)


def check_against_reference(impl: str, case: Case, layout: str = "contiguous"):
    """Output and the gradients of x and both weights match the reference block's autograd."""
    x, weight_global, weight_local, band_start = make_inputs(case, layout)
    named = {"x": x, "weight_global": weight_global, "weight_local": weight_local}
    names = [name for name, leaf in named.items() if leaf is not None]
    leaves = [named[name] for name in names]

    y = run(impl, x, weight_global, weight_local, band_start, case)
    # The reference runs in float64 (on upcast leaves), so its own rounding does not count.
    wide = [t.double() if t is not None else None for t in (x, weight_global, weight_local)]
    expected = mla_conv3d_reference(*wide, band_start, case.band_rows, case.fuse)
    assert_close(y, expected, name=f"{impl} y", dtype=torch.float32)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, name=f"{impl} d{name}")
    return y


def assert_relative_errors_below(tolerance, names, actuals, references):
    for name, actual, reference in zip(names, actuals, references):
        error = relative_error(actual.float(), reference.float())
        assert error < tolerance, f"{name}: relative error {error:.2e} vs the reference (tolerance {tolerance})"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_reference(impl, case_name):
    check_against_reference(impl, CASES[case_name])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [11, 12])
def test_matches_reference_more_seeds(impl, seed):
    check_against_reference(impl, replace(CASES["per-sample"], seed=seed, band_starts=(seed % 5, 5 - seed % 5)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["channels-last", "strided"])
def test_memory_layouts(impl, layout):
    y = check_against_reference(impl, replace(CASES["per-sample"], seed=21), layout)
    if impl.startswith("triton") and layout == "channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d), "channels-last-3d in, channels-last-3d out"


def test_triton_impl_runs_the_default_design_and_takes_int32_bands():
    case = CASES["per-sample"]
    x, weight_global, weight_local, band_start = make_inputs(case)
    via_impl = mla_conv3d(x, weight_global, weight_local, band_start.int(), case.band_rows, impl="triton")
    direct = mla_conv3d_triton(x, weight_global, weight_local, band_start, case.band_rows, design=DEFAULT_DESIGN)
    assert torch.equal(via_impl, direct)


@pytest.mark.parametrize("forward, backward, case_name", [("gemm", "hybrid", "per-sample"),
                                                       ("hybrid", "gemm", "top-concat"),
                                                       ("hybrid2d", "gemm", "per-sample"),
                                                       ("gemm", "hybrid2d", "top-concat")])
def test_auto_may_mix_designs_forward_and_backward(monkeypatch, forward, backward, case_name):
    """design="auto" resolves the forward and the backward apart; every forward saves the same
    (y, gates), so any backward gives the reference's gradients after any forward."""
    from fastgait.ops import conv_engine

    picked = {"fwd": forward, "bwd": backward}
    seen = []

    def choose(key, run, device):
        seen.append((key[1], picked[key[1]]))
        return picked[key[1]]

    monkeypatch.setattr(conv_engine.CHOOSER, "choose", choose)
    check_against_reference("triton-auto", replace(CASES[case_name], seed=43))
    assert seen == [("fwd", forward), ("bwd", backward)]


def test_auto_on_cpu_runs_the_fallback_design(monkeypatch):
    """Off CUDA "auto" is FALLBACK_DESIGN, untimed: the same values and gradients, bit for bit."""
    from fastgait.ops import conv_engine

    monkeypatch.delenv(conv_engine.DESIGN_ENV, raising=False)
    case = CASES["per-sample"]
    results = []
    for design in ("auto", conv_engine.FALLBACK_DESIGN):
        x, weight_global, weight_local, band_start = make_inputs(case)
        y = mla_conv3d_triton(x, weight_global, weight_local, band_start, case.band_rows, design=design)
        results.append([y, *torch.autograd.grad(y, (x, weight_global, weight_local), torch.ones_like(y))])
    for auto, fallback in zip(*results):
        assert torch.equal(auto, fallback)


@pytest.mark.parametrize("design", DESIGNS)
def test_autocast_casts_like_a_convolution(design):
    """Under autocast the op casts x and the weights first (custom ops are not auto-cast).

    CPU autocast to fp16 here (the interpreter computes fp16, not bf16), against the reference
    block under the same autocast: at these tiny sizes one pre-activation near 0 whose sign
    fp16 flips moves a gradient by ~1% from an fp32 reference, for the reference block too.
    """
    case = CASES["per-sample"]
    x, weight_global, weight_local, band_start = make_inputs(case)
    leaves = (x, weight_global, weight_local)
    with torch.autocast("cpu", dtype=torch.float16):
        y = mla_conv3d_triton(x, weight_global, weight_local, band_start, case.band_rows, design=design)
        expected = mla_conv3d_reference(x, weight_global, weight_local, band_start, case.band_rows)
    assert y.dtype == expected.dtype == torch.float16
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(y, leaves, upstream)
    assert [g.dtype for g in grads] == [torch.float32] * 3, "gradients flow back through the casts"
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    assert_relative_errors_below(5e-3, OUTPUT_AND_GRADS, (y, *grads), (expected, *expected_grads))


@pytest.mark.parametrize("design", DESIGNS)
def test_every_output_element_is_written(design):
    """Outputs start as NaN (``poisoned_outputs``): an element a kernel forgets fails the match."""
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", replace(CASES["rows4-T5"], c_in=3, c_out=5, seed=31))


# hybrid2d runs the hybrid's Triton kernels on these paths (its own, stack and fold, are covered above)
@pytest.mark.parametrize("design", ["hybrid", "gemm"])
@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
def test_channel_counts_in_whole_k_blocks(design, layout):
    """Channel counts that are multiples of 16 take the kernels' aligned K loop (one tap per K
    block, ``C_BLOCKS`` blocks per tap; ``k_tiling``): 48 input channels are 3 blocks of 16, the
    32 stacked output channels (dgrad's sources) 2 blocks of 16 or 1 of 32; outputs poisoned."""
    case = Case(n=2, c_in=48, c_out=16, t=3, h=7, w=5, band_rows=2, band_starts=(1, 4), seed=9)
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", case, layout)


def force_chunks(monkeypatch, samples: int):
    """Make the engine's launchers run the batch in chunks of at most ``samples`` samples, through
    the engine's own rule: no floor, and a byte budget of ``samples`` times the pass's biggest
    temporary per sample (set at each call: the passes' temporaries differ). Returns the list of
    chunkings made, ``[(start, stop), ...]`` per call."""
    from fastgait.ops import conv_engine

    monkeypatch.setattr(conv_engine, "MIN_CHUNK_SAMPLES", 0)
    calls = []
    real = conv_engine.sample_chunks

    def sample_chunks(n, per_sample_bytes):
        monkeypatch.setattr(conv_engine, "CHUNK_BYTES", samples * per_sample_bytes)
        chunks = real(n, per_sample_bytes)
        calls.append([(c.start, c.stop) for c in chunks])
        return chunks

    monkeypatch.setattr(conv_engine, "sample_chunks", sample_chunks)
    return calls


def test_chunk_rule():
    """Samples per chunk: one chunk when the batch fits the budget; else even chunks of at most
    what fits, never fewer than MIN_CHUNK_SAMPLES samples."""
    from fastgait.ops.conv_engine import CHUNK_BYTES, MIN_CHUNK_SAMPLES, chunk_samples, sample_chunks

    per_sample = CHUNK_BYTES // 37  # 37 samples fit
    assert chunk_samples(37, per_sample) == 37 and chunk_samples(20, per_sample) == 20
    assert chunk_samples(128, per_sample) == 32  # 4 chunks of 32, not 37 + 37 + 37 + 17
    assert chunk_samples(128, CHUNK_BYTES) == MIN_CHUNK_SAMPLES  # the floor
    assert chunk_samples(3, 10 * CHUNK_BYTES) == 3  # a small batch is one chunk
    assert [(c.start, c.stop) for c in sample_chunks(128, per_sample)] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert sample_chunks(100, 0) == [slice(0, 100)]


def test_chunk_budget_from_the_environment(monkeypatch):
    """FASTGAIT_CHUNK_MIB overrides the budget (0: no chunks); a bad value is one clear error."""
    from fastgait.ops.conv_engine import CHUNK_ENV, chunk_samples

    monkeypatch.setenv(CHUNK_ENV, "0")
    assert chunk_samples(128, 1 << 30) == 128
    monkeypatch.setenv(CHUNK_ENV, "64")
    assert chunk_samples(128, (64 << 20) // 40) == 32  # 40 fit: 4 chunks of 32
    monkeypatch.setenv(CHUNK_ENV, "lots")
    with pytest.raises(ValueError, match="FASTGAIT_CHUNK_MIB='lots': must be a number of MiB"):
        chunk_samples(128, 1)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
@pytest.mark.parametrize("n, samples", [(5, 2), (3, 2), (5, 3)])
def test_chunked_batch_matches_reference(monkeypatch, design, layout, n, samples):
    """The batch in uneven chunks of samples (forward and backward): values and every gradient
    match the reference, every output element is written (poisoned outputs), per-sample bands
    slice with the chunks."""
    calls = force_chunks(monkeypatch, samples)
    starts = (1, 4, 0, 6, 3)[:n]  # h = 8, 2 rows: the top and bottom bands at n >= 4
    case = replace(CASES["rows4-T5"], n=n, c_in=3, c_out=5, h=8, band_rows=2, band_starts=starts, seed=50 + n)
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", case, layout)
    expected = {5: {2: [(0, 2), (2, 4), (4, 5)], 3: [(0, 3), (3, 5)]}, 3: {2: [(0, 2), (2, 3)]}}[n][samples]
    assert expected in calls, calls  # the backward's chunks (the forward's too, in the hybrid design)
    assert all(len(chunks) > 1 for chunks in calls)


@pytest.mark.parametrize("design", DESIGNS)
def test_chunked_batch_concat_and_eval(monkeypatch, design):
    """Chunks with concat fusion (y has 2H rows) and without bands (evaluation)."""
    force_chunks(monkeypatch, 2)
    check_against_reference(f"triton-{design}", replace(CASES["top-concat"], n=3, band_starts=(0, 2, 3), seed=61))
    check_against_reference(f"triton-{design}", replace(CASES["eval"], n=3, seed=62), "channels-last")


@pytest.mark.parametrize(
    "design, case_name", [("hybrid", "per-sample"), ("gemm", "local-only"), (DEFAULT_DESIGN, "eval")]
)
def test_opcheck(design, case_name):
    case = CASES[case_name]
    x, weight_global, weight_local, band_start = make_inputs(case)
    args = (x, weight_global, weight_local, band_start, "band", case.band_rows, case.fuse, "pair", 0.01, design)
    torch.library.opcheck(torch.ops.fastgait.cut_conv3d.default, args)
    y, gates = torch.ops.fastgait.cut_conv3d(*args)
    inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:4]]
    torch.library.opcheck(
        torch.ops.fastgait.cut_conv3d_backward.default, (torch.randn_like(y), *inputs, gates, *args[4:])
    )


def test_compile_fullgraph_forward_backward():
    case = CASES["per-sample"]
    x, weight_global, weight_local, band_start = make_inputs(case, "channels-last")

    def block(x, weight_global, weight_local, band_start):
        return mla_conv3d(x, weight_global, weight_local, band_start, case.band_rows, case.fuse, impl="triton")

    expected = mla_conv3d_reference(x, weight_global, weight_local, band_start, case.band_rows, case.fuse)
    upstream = torch.randn_like(expected)
    leaves = (x, weight_global, weight_local)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph may predate an op change
        y = compiled(x, weight_global, weight_local, band_start)
        grads = torch.autograd.grad(y, leaves, upstream)
    assert_close(y, expected, name="compiled y")
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    for name, grad, expected_grad in zip(("x", "weight_global", "weight_local"), grads, expected_grads):
        assert_close(grad, expected_grad, name=f"compiled d{name}")


# ----------------------------------------------------------------------------------------
# Clear errors at the op boundary
# ----------------------------------------------------------------------------------------


def bad_call(impl="triton", **changes):
    case = CASES["per-sample"]
    x, weight_global, weight_local, band_start = make_inputs(case)
    args = dict(
        x=x, weight_global=weight_global, weight_local=weight_local, band_start=band_start,
        band_height=case.band_rows,
    )  # fmt: skip
    args.update(changes)
    return mla_conv3d(**args, impl=impl)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(x=torch.randn(2, 3, 7, 5)), ValueError, "x must be 5-D"),
        (dict(x=torch.zeros(2, 3, 2, 7, 5, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
        (dict(weight_local=torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(weight_local=torch.randn(4, 2, 3, 3, 3)), ValueError, "c_in=3"),
        (dict(weight_global=torch.randn(5, 3, 3, 3, 3)), ValueError, "same shape"),
        (dict(band_start=torch.tensor([0, 6])), ValueError, "inside the map"),
        (dict(band_start=torch.tensor([-1, 0])), ValueError, "inside the map"),
        (dict(band_start=torch.tensor([1])), ValueError, "1 entries for a batch of 2"),
        (dict(band_start=torch.tensor([0.0, 1.0])), TypeError, "band_start has dtype"),
        (dict(band_height=8), ValueError, "band_height=8"),
        (dict(band_height=-1), ValueError, "band_height=-1"),
        (dict(weight_local=torch.randn(4, 3, 3, 3, 3, device="meta")), ValueError, "is on meta"),
        (dict(band_start=torch.tensor([0, 1], device="meta")), ValueError, "is on meta"),
        (dict(fuse="mul"), ValueError, "fuse must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        bad_call(**changes)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("band_height", [2.5, True, 2.0, "2"])
def test_band_height_must_be_an_int_on_every_path(impl, band_height):
    """A float, bool or string band height is refused the same way on every path (a float used
    to give three different results on three paths, and True was taken as one row)."""
    with pytest.raises(TypeError, match="band_height must be an int"):
        bad_call(impl=impl, band_height=band_height)


def test_bad_design_and_dtype_for_triton():
    case = CASES["per-sample"]
    x, weight_global, weight_local, band_start = make_inputs(case)
    with pytest.raises(ValueError, match="design must be one of"):
        mla_conv3d_triton(x, weight_global, weight_local, band_start, case.band_rows, design="cudnn")
    doubles = [t.double() for t in (x, weight_global, weight_local)]
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mla_conv3d(*doubles, band_start, case.band_rows, impl="triton")
