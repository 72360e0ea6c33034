"""``gem_hpp`` with ``impl="triton"`` (the interpreter on CPU) against ``gem_hpp_reference``.

Every check gives both the same input, the same ``p`` and the same upstream gradient, and
compares the output and the gradients of ``x`` and ``p``.
"""
import math

import pytest
import torch

from fastgait.ops import gem_hpp
from fastgait.ops.gem import gem_hpp_bwd, gem_hpp_fwd
from fastgait.ops.reference import gem_hpp_reference
from fastgait.testing import assert_close, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


def run(fn, x, p, bins, grad_out):
    """Output and gradients ``(out, grad_x, grad_p)`` of ``fn(x, p, bins)`` for ``grad_out``."""
    x = x.detach().requires_grad_()
    p = p.detach().requires_grad_()
    out = fn(x, p, bins)
    grad_x, grad_p = torch.autograd.grad(out, (x, p), grad_out.to(out.dtype))
    return out, grad_x, grad_p


def triton_gem(x, p, bins):
    return gem_hpp(x, p, bins, impl="triton")


def check_against_reference(x, p_value, bins, reference_dtype=torch.float32, **tolerance):
    """Triton vs the reference (run in ``reference_dtype``); returns the Triton results."""
    p = torch.tensor([p_value])
    grad_out = torch.randn(x.shape[0], x.shape[1], sum(bins), generator=torch.Generator().manual_seed(123))
    got = run(triton_gem, x, p, bins, grad_out)
    want = run(gem_hpp_reference, x.to(reference_dtype), p.to(reference_dtype), bins, grad_out)
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert torch.isfinite(actual).all(), f"{name} has non-finite values"
        assert_close(actual, expected.to(actual.dtype), name=name, **tolerance)
    return got


def positive_input(shape, seed, zeros=0.0):
    """Post-activation-like features: mostly positive, with a share of exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 2.0 + 0.05
    if zeros:
        x = x * (torch.rand(shape, generator=gen) >= zeros)
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_5d_several_bins_odd_strips(seed):
    # h = 7: bins 2 and 3 give strips of 3/4 and 2/2/3 rows (h not divisible by the bin count).
    x = positive_input((2, 5, 3, 7, 5), seed)
    check_against_reference(x, 6.5, (1, 2, 3, 7))


@pytest.mark.parametrize("seed", [0, 1])
def test_4d_entry(seed):
    x = positive_input((3, 6, 9, 4), seed)
    check_against_reference(x, 3.0, (2, 4, 9))


def test_many_frames_cross_chunks():
    # More frames than one load of BLOCK_T = 16: the argmax is carried across chunks.
    x = positive_input((1, 3, 37, 4, 3), 4)
    check_against_reference(x, 2.0, (4, 1))


@pytest.mark.parametrize("p_value", [1.05, 10.0])
def test_exponent_near_one_and_large(p_value):
    x = positive_input((2, 4, 3, 6, 3), 5)
    check_against_reference(x, p_value, (1, 3, 6))


def test_exact_zeros_have_finite_gradients():
    x = positive_input((2, 4, 3, 8, 3), 6, zeros=0.4)
    x[0, :, :, :2] = 0.0  # a whole dead strip of bin 4 (clamped to eps everywhere)
    _, grad_x, _ = check_against_reference(x, 3.0, (1, 4))
    assert (grad_x[x == 0] == 0).all(), "the clamp must stop the gradient at exact zeros"


def test_dead_strip_at_large_p_is_stable():
    # eps^6.5 ~ 1e-39 is subnormal in fp32: the kernel factors the strip max out, so its result
    # agrees with the reference evaluated in float64.
    x = positive_input((2, 3, 2, 4, 3), 7)
    x[:, :, :, :2] = -1.0  # rows 0-1 (the first strip of bin 2) clamp to eps
    out, _, _ = check_against_reference(x, 6.5, (2, 4), reference_dtype=torch.float64)
    assert_close(out[:, :, 0], torch.full_like(out[:, :, 0], 1e-6), name="dead strip")


def test_ties_over_frames_go_to_the_first_max():
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (2, 4, 6, 5, 3), generator=gen).float()  # values in {0, 1, 2}: many ties
    _, grad_x, _ = check_against_reference(x, 2.5, (1, 5))
    hit = grad_x != 0
    first = torch.nn.functional.one_hot(x.argmax(dim=2), x.shape[2]).movedim(-1, 2).bool()
    assert not (hit & ~first).any(), "gradient reached a frame that is not the first maximal one"


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided_slice", "channels_last_4d"])
def test_strided_inputs(layout):
    if layout == "channels_last_3d":
        x = positive_input((2, 5, 3, 6, 4), 9).to(memory_format=torch.channels_last_3d)
    elif layout == "strided_slice":
        x = positive_input((2, 10, 3, 6, 8), 9)[:, ::2, :, :, 1:6]
    else:
        x = positive_input((2, 5, 6, 4), 9).to(memory_format=torch.channels_last)
    _, grad_x, _ = check_against_reference(x, 4.0, (2, 3))
    if layout != "strided_slice":
        assert grad_x.stride() == x.stride(), "grad_x must keep the input's memory format"


@pytest.mark.parametrize(
    "shape, bins", [((1, 1, 1, 1, 1), (1,)), ((2, 1, 1, 3, 1), (1, 3)), ((1, 2, 1, 1), (1,)), ((1, 3, 2, 2, 40), (2,))]
)
def test_degenerate_sizes_and_scalar_p(shape, bins):
    x = positive_input(shape, 16)
    p = torch.tensor(4.0)  # a 0-d exponent: grad_p keeps its shape
    grad_out = torch.randn(shape[0], shape[1], sum(bins), generator=torch.Generator().manual_seed(16))
    got = run(triton_gem, x, p, bins, grad_out)
    want = run(gem_hpp_reference, x, p, bins, grad_out)
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert_close(actual, expected, name=name)


def test_bf16_input_under_autocast():
    # fp32 math inside, output and grad_x in the input's dtype (the interpreter only moves bf16 around).
    x = positive_input((2, 3, 4, 5, 3), 15).to(torch.bfloat16)
    p = torch.tensor([6.5])
    grad_out = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(triton_gem, x, p, (1, 5), grad_out)
    want = run(gem_hpp_reference, x.float(), p, (1, 5), grad_out.float())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert_close(actual.float(), expected, name=name, dtype=torch.bfloat16)


def test_poisoned_outputs_are_all_written():
    with poisoned_outputs():
        check_against_reference(positive_input((2, 3, 4, 5, 3), 10), 6.5, (1, 5))
        check_against_reference(positive_input((2, 3, 5, 3), 10), 6.5, (2, 5))


def test_no_grad_keeps_no_frame_max():
    x = positive_input((1, 2, 3, 4, 2), 11).requires_grad_()
    p = torch.tensor([3.0], requires_grad=True)
    with torch.no_grad():
        out = gem_hpp(x, p, (2,), impl="triton")
    assert_close(out, gem_hpp_reference(x.detach(), p.detach(), (2,)))
    _, frame_max, frame_arg = gem_hpp_fwd(x.detach(), p.detach(), [2], 1e-6, False)
    assert frame_max.numel() == 0 and frame_arg.numel() == 0


def test_opcheck():
    p = torch.tensor([3.0], requires_grad=True)
    x5 = positive_input((2, 3, 3, 5, 3), 12).requires_grad_()
    x4 = positive_input((2, 3, 5, 3), 12).requires_grad_()
    torch.library.opcheck(gem_hpp_fwd, (x5, p, [1, 5], 1e-6, True))
    torch.library.opcheck(gem_hpp_fwd, (x4, p, [2, 3], 1e-6, True))
    out, frame_max, frame_arg = gem_hpp_fwd(x5.detach(), p.detach(), [1, 5], 1e-6, True)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(gem_hpp_bwd, (grad_out, frame_max, frame_arg, out, p.detach(), [1, 5], 1e-6, 3, [0, 1, 2, 3, 4]))


def test_compile_fullgraph_forward_and_backward():
    def loss_fn(x, p):
        return gem_hpp(x, p, (1, 2, 5), impl="triton").square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = positive_input((2, 3, 4, 5, 3), 13)
    p = torch.tensor([6.5])
    got = run(lambda x, p, _: compiled(x, p), x, p, None, torch.tensor(1.0))
    want = run(lambda x, p, _: gem_hpp_reference(x, p, (1, 2, 5)).square().sum(), x, p, None, torch.tensor(1.0))
    for name, actual, expected in zip(("loss", "grad_x", "grad_p"), got, want):
        assert_close(actual, expected, name=name)


def test_auto_uses_the_reference_on_cpu():
    x = positive_input((1, 2, 3, 4, 2), 14)
    p = torch.tensor([3.0])
    assert torch.equal(gem_hpp(x, p, (2,)), gem_hpp_reference(x, p, (2,)))


@pytest.mark.parametrize(
    "x, p, bins, eps, error",
    [
        (torch.rand(2, 3, 4), torch.tensor([3.0]), (2,), 1e-6, "4-D or 5-D"),
        (torch.rand(2, 3, 4, 2), torch.tensor([3.0, 2.0]), (2,), 1e-6, "one value"),
        (torch.rand(2, 3, 4, 2), torch.tensor([3.0]), (5,), 1e-6, "bin count"),
        (torch.rand(2, 3, 4, 2), torch.tensor([3.0]), (0,), 1e-6, "bin count"),
        (torch.rand(2, 3, 4, 2), torch.tensor([3.0]), 2, 1e-6, "sequence of ints"),
        (torch.rand(2, 3, 4, 2), torch.tensor([3.0]), (2,), 0.0, "eps must be > 0"),
        (torch.ones(2, 3, 4, 2, dtype=torch.int64), torch.tensor([3.0]), (2,), 1e-6, "dtype"),
        (torch.rand(2, 3, 0, 2), torch.tensor([3.0]), (1,), 1e-6, "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, p, bins, eps, error):
    with pytest.raises((ValueError, TypeError), match=error):
        gem_hpp(x, p, bins, eps, impl="triton")


def test_bad_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        gem_hpp(torch.rand(1, 2, 4, 2), torch.tensor([3.0]), (2,), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t, h, w, bins", [(10, 64, 22, (64,)), (10, 64, 22, (1, 2, 4, 8, 16)), (30, 16, 11, (1, 2, 4, 8, 16)), (7, 16, 11, (16,))]
)
def test_bf16_at_training_shape_on_gpu(t, h, w, bins):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 128, t, h, w, device="cuda", generator=gen).relu().to(torch.bfloat16)
    x = x.to(memory_format=torch.channels_last_3d)
    p = torch.tensor([6.5], device="cuda")
    grad_out = torch.randn(128, 128, sum(bins), device="cuda", generator=gen).to(torch.bfloat16)
    got = run(lambda x, p, b: gem_hpp(x, p, b, impl="triton"), x, p, bins, grad_out)
    want = run(gem_hpp_reference, x.float(), p, bins, grad_out.float())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert_close(actual.float(), expected, name=name, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------
# The new tiling: several column tiles, frame unrolls, one-row strips, several seeds
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "shape, bins",
    [
        ((2, 5, 10, 6, 22), (6,)),  # w = 22: three column tiles of 8 (24), t = 10: frames in steps of 5
        ((2, 5, 10, 6, 22), (1, 2, 3, 6)),  # the same through the strip combine
        ((1, 3, 7, 4, 11), (4,)),  # t = 7: steps of 4 with a masked tail frame; w = 11: tiles of 4
        ((2, 130, 3, 3, 2), (1, 3)),  # c = 130: two channel blocks, the second almost empty
    ],
)
def test_channels_last_tiles_and_bins(seed, shape, bins):
    x = positive_input(shape, 100 + seed, zeros=0.2).to(memory_format=torch.channels_last_3d)
    with poisoned_outputs():
        _, grad_x, _ = check_against_reference(x, 6.5 - seed, bins)
    assert grad_x.stride() == x.stride()


def test_one_row_strips_contiguous_and_poisoned():
    # bins = (h,): the row kernel writes the output itself (no strip combine).
    x = positive_input((3, 4, 5, 7, 9), 21)
    with poisoned_outputs():
        check_against_reference(x, 4.5, (7,))
        check_against_reference(x[:, :, 0], 4.5, (7,))  # 4-D


# ----------------------------------------------------------------------------------------
# Non-finite inputs and the domain of p
# ----------------------------------------------------------------------------------------


def nonfinite_results(fn, x, p_value, bins):
    x = x.detach().requires_grad_()
    p = torch.tensor([p_value], requires_grad=True)
    out = fn(x, p, bins)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grad_x, grad_p = torch.autograd.grad(out, (x, p), grad_out)
    return out, grad_x, grad_p


def assert_same_nonfinite(actual, expected, name):
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN positions differ"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{name}: inf positions differ"
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], name=name)


@pytest.mark.parametrize("bins", [(1, 3, 6), (6,)])
def test_nan_and_inf_inputs_propagate_like_the_reference(bins):
    x = positive_input((2, 3, 4, 6, 5), 30)
    x[0, 1, 2, 3, 1] = float("nan")  # one NaN frame value: its strips are NaN, as torch.max keeps NaN
    x[1, 2, 1, 0, 4] = float("inf")  # +inf: its strips are +inf
    x[1, 0, 0, 5, 0] = float("-inf")  # -inf clamps to eps: finite
    got = nonfinite_results(triton_gem, x, 3.0, bins)
    want = nonfinite_results(gem_hpp_reference, x, 3.0, bins)
    assert torch.isnan(got[0]).any() and torch.isinf(got[0]).any()
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert_same_nonfinite(actual, expected, name)
    assert torch.isnan(got[2]).all(), "grad_p must be NaN when an output is NaN"


@pytest.mark.parametrize("p_value", [-1.0, 0.0, float("nan"), float("inf")])
def test_p_outside_the_domain(p_value):
    x = positive_input((2, 3, 4, 6, 5), 31)
    p = torch.tensor([p_value])
    # CPU tensors: a clear error from every path for p <= 0; a NaN/inf p (a diverged run) gives NaN,
    # which the trainer's non-finite guard reports.
    for impl in ("triton", "reference", "auto"):
        if math.isfinite(p_value):
            with pytest.raises(ValueError, match=r"gem_hpp: p must be finite and > 0"):
                gem_hpp(x, p, (2,), impl=impl)
        else:
            assert torch.isnan(gem_hpp(x, p, (2,), impl=impl)).all(), f"{impl}, p={p_value}"
    # Where the check would need a host sync (a GPU), the ops themselves answer NaN everywhere:
    for bins in ([2], [6]):
        out, _, _ = gem_hpp_fwd(x, p, bins, 1e-6, False)
        assert torch.isnan(out).all(), f"fused op, p={p_value}, bins={bins}"
        assert torch.isnan(gem_hpp_reference(x, p, bins)).all(), f"reference, p={p_value}"
    x = x.requires_grad_()
    out, frame_max, frame_arg = gem_hpp_fwd(x.detach(), p, [2], 1e-6, True)
    grad_x, grad_p = gem_hpp_bwd(torch.ones_like(out), frame_max, frame_arg, out, p, [2], 1e-6, 4, [0, 1, 2, 3, 4])
    assert torch.isnan(grad_p).all() and torch.isnan(grad_x).any()


def test_p_check_does_not_break_compile():
    # The CPU check reads p; under torch.compile tracing it is skipped (no graph break).
    compiled = torch.compile(lambda x, p: gem_hpp(x, p, (2,), impl="triton"), fullgraph=True)
    x = positive_input((1, 2, 3, 4, 2), 32)
    assert_close(compiled(x, torch.tensor([3.0])), gem_hpp_reference(x, torch.tensor([3.0]), (2,)))
