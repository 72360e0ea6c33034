"""``gem_hpp`` with ``impl="triton"`` (the interpreter on CPU) against ``gem_hpp_reference``.

Every check gives both the same input, the same ``p`` and the same upstream gradient, and
compares the output and the gradients of ``x`` and ``p``.
"""
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
@pytest.mark.parametrize("bins", [(64,), (1, 2, 4, 8, 16)])
def test_bf16_at_training_shape_on_gpu(bins):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 128, 10, 64, 22, device="cuda", generator=gen).relu().to(torch.bfloat16)
    x = x.to(memory_format=torch.channels_last_3d)
    p = torch.tensor([6.5], device="cuda")
    grad_out = torch.randn(128, 128, sum(bins), device="cuda", generator=gen).to(torch.bfloat16)
    got = run(lambda x, p, b: gem_hpp(x, p, b, impl="triton"), x, p, bins, grad_out)
    want = run(gem_hpp_reference, x.float(), p, bins, grad_out.float())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    for name, actual, expected in zip(("out", "grad_x", "grad_p"), got, want):
        assert_close(actual.float(), expected, name=name, dtype=torch.bfloat16)
