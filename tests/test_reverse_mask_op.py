"""ReverseMask: the Philox unit mask (Triton vs PyTorch, bit for bit), ``rmb_conv3d`` against the
reference in value and every gradient, and the blocks' draws (seeded, the same on every path)."""
from __future__ import annotations

import math

import pytest
import torch

from fastgait.nn import RMFE, InceptionRMB, PlainRMB, ReverseMask
from fastgait.ops.masks import philox_rand, philox_randint, unit_mask, unit_threshold
from fastgait.ops.reverse_mask import MaskDraw, draw_mask, rmb_conv3d
from fastgait.testing import assert_close, poisoned_outputs

# --- the unit mask: Philox4x32-10 in PyTorch == Triton's tl.randint / tl.rand --------------


@pytest.mark.parametrize("seed", [0, 1, 987654321, 2**31 - 2])
@pytest.mark.parametrize("height, width", [(7, 5), (64, 44), (1, 3)])
def test_philox_matches_triton_bit_for_bit(seed, height, width):
    from fastgait.kernels import reverse_mask as kernels

    keep = torch.empty(height, width, dtype=torch.uint8)
    bits = torch.empty(height, width, dtype=torch.int32)
    uniform = torch.empty(height, width, dtype=torch.float32)
    block = 1024
    grid = (-(-height * width // block),)
    kernels.unit_mask_kernel[grid](torch.tensor([seed]), keep, bits, uniform, height, width, unit_threshold(0.5),
                                   BLOCK=block)
    offsets = torch.arange(height * width)
    assert torch.equal(bits.view(-1), philox_randint(seed, offsets)), "tl.randint words differ"
    assert torch.equal(uniform.view(-1), philox_rand(seed, offsets)), "tl.rand values differ"
    assert torch.equal(keep.bool(), unit_mask(seed, height, width, 0.5)), "unit mask bits differ"


def test_unit_mask_rate_and_seed_dependence():
    a = unit_mask(5, 64, 44, 0.3)
    assert abs(a.float().mean().item() - 0.3) < 0.03
    assert not torch.equal(a, unit_mask(6, 64, 44, 0.3))
    assert torch.equal(a, unit_mask(torch.tensor(5), 64, 44, 0.3))
    assert unit_mask(5, 8, 8, 0.0).sum() == 0 and unit_mask(5, 8, 8, 1.0).all()


# --- rmb_conv3d against the reference ----------------------------------------------------

REGIONS = ("unit", "band", "block")
# (weights, global, fuse): Plain RMB / RMFE, Inception RMB (stages and the last one)
LAYOUTS = {"plain": (1, False, "add"), "inception-add": (2, True, "add"), "inception-concat": (2, True, "concat")}


def make_inputs(seed, layout="contiguous", n=2, c_in=3, c_out=4, t=3, h=9, w=7, k=1, has_global=False):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(n, c_in, t, h, w, generator=gen)
    elif layout == "channels-last":
        x = torch.randn(n, c_in, t, h, w, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    else:  # strided: every other column, frames and rows swapped in memory
        x = torch.randn(n, c_in, h, t, 2 * w, generator=gen).transpose(2, 3)[..., ::2]
    scale = 1 / math.sqrt(27 * c_in)
    weights = [torch.randn(c_out, c_in, 3, 3, 3, generator=gen) * scale for _ in range(k)]
    weight_global = torch.randn(c_out, c_in, 3, 3, 3, generator=gen) * scale if has_global else None
    scales = torch.rand(k, 2, generator=gen)
    return x, weight_global, weights, scales


def check(seed, region, ratio, layout_name, memory="contiguous", scales=None, impl="torch", **sizes):
    k, has_global, fuse = LAYOUTS[layout_name]
    x, weight_global, weights, drawn_scales = make_inputs(seed, memory, k=k, has_global=has_global, **sizes)
    scales = drawn_scales if scales is None else scales
    draw = draw_mask(region, ratio, x.shape[3], x.shape[4], generator=torch.Generator().manual_seed(seed + 100))
    leaves = [t.requires_grad_() for t in [x, *weights] + ([weight_global] if has_global else [])]
    y = rmb_conv3d(x, weight_global, weights, scales, draw, fuse, impl=impl)
    if impl == "triton" and memory == "channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d), "channels-last-3d in, channels-last-3d out"
    wide = [t.double() for t in leaves]
    wide_global = wide[-1] if has_global else None
    expected = rmb_conv3d(wide[0], wide_global, wide[1 : 1 + k], scales.double(), draw, fuse, impl="reference")
    assert_close(y, expected, name=f"{region} {layout_name} y", dtype=torch.float32)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, wide, upstream.double())
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert_close(grad, expected_grad, name=f"{region} {layout_name} grad {i}")


IMPLS = ("torch", "triton")


@pytest.mark.parametrize(
    "impl, ratio", [("torch", 0.5), ("torch", 0.3), ("triton", 0.5)]  # the interpreter is slow: one ratio
)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("region", REGIONS)
def test_matches_reference(region, ratio, layout_name, impl):
    check(0, region, ratio, layout_name, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_empty_and_full_regions(region, ratio, impl):
    check(1, region, ratio, "inception-add", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("region", REGIONS)
def test_dropping_and_unperturbed_scales(region, impl):
    check(2, region, 0.5, "plain", scales=torch.tensor([[1.0, 0.0]]), impl=impl)  # dropping
    check(3, region, 0.5, "plain", scales=torch.tensor([[1.0, 1.0]]), impl=impl)  # no perturbation: c3(X)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", ["channels-last", "strided"])
@pytest.mark.parametrize("seed", [4, 5])
def test_layouts_and_seeds(memory, seed, impl):
    check(seed, "block", 0.5, "inception-concat", memory, impl=impl)
    check(seed, "unit", 0.5, "plain", memory, impl=impl)


@pytest.mark.parametrize("region", REGIONS)
def test_every_output_element_is_written(region):
    with poisoned_outputs():
        check(9, region, 0.5, "inception-concat", impl="triton")
        check(10, region, 0.4, "plain", impl="triton")


@pytest.mark.parametrize("region", REGIONS)
def test_channel_counts_in_whole_k_blocks(region):
    """Channel counts that are multiples of 16 take the kernels' aligned K loop (``k_tiling``):
    48 input channels are 3 K blocks of 16; the 2 x 16 branch channels are the dgrad's sources."""
    with poisoned_outputs():
        check(12, region, 0.5, "inception-concat", "channels-last", impl="triton", c_in=48, c_out=16, h=7, w=5)


@pytest.mark.parametrize("fuse", ["add", "concat"])
def test_triton_without_a_mask_is_plain_convolutions(fuse):
    x, weight_global, weights, scales = make_inputs(11, k=2, has_global=True)
    y = rmb_conv3d(x, weight_global, weights, scales, None, fuse, impl="triton")
    expected = rmb_conv3d(x.double(), weight_global.double(), [w.double() for w in weights], scales.double(), None,
                          fuse, impl="reference")
    assert_close(y, expected, name="eval", dtype=torch.float32)


def _op_args(region="unit", fuse="add"):
    x, weight_global, weights, scales = make_inputs(12, k=2, has_global=True)
    draw = draw_mask(region, 0.5, 9, 7, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros((), dtype=torch.int64)
    params = torch.stack([zero if p is None else p for p in (draw.seed, draw.row_start, draw.col_start)])
    weight_rm = torch.cat(weights).requires_grad_()
    return (x.requires_grad_(), weight_global.requires_grad_(), weight_rm, scales, params, region, draw.rows,
            draw.cols, 0.5, 2, fuse, 0.01)


@pytest.mark.parametrize("region, fuse", [("unit", "add"), ("block", "concat")])
def test_opcheck(region, fuse):
    args = _op_args(region, fuse)
    torch.library.opcheck(torch.ops.fastgait.rmb_conv3d.default, args)
    y, gates = torch.ops.fastgait.rmb_conv3d(*args)
    inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]]
    torch.library.opcheck(torch.ops.fastgait.rmb_conv3d_backward.default,
                          (torch.randn_like(y), *inputs, gates, *args[5:]))


def test_compile_fullgraph_forward_backward():
    x, weight_global, weights, scales = make_inputs(13, "channels-last", k=2, has_global=True)
    draw = draw_mask("unit", 0.5, 9, 7, generator=torch.Generator().manual_seed(4))
    leaves = [t.requires_grad_() for t in (x, weight_global, *weights)]

    def block(x, weight_global, w_d, w_s):
        return rmb_conv3d(x, weight_global, [w_d, w_s], scales, draw, "concat", impl="triton")

    expected = rmb_conv3d(*[t.double() for t in leaves[:2]], [t.double() for t in leaves[2:]], scales.double(), draw,
                          "concat", impl="reference")
    upstream = torch.randn_like(expected)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        y = compiled(*leaves)
        grads = torch.autograd.grad(y, leaves, upstream.float())
    assert_close(y, expected, name="compiled y", dtype=torch.float32)
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert_close(grad, expected_grad, name=f"compiled grad {i}")


def test_unperturbed_branch_is_plain_conv():
    x, _, weights, _ = make_inputs(6)
    draw = draw_mask("unit", 0.5, 9, 7)
    y = rmb_conv3d(x, None, weights, torch.ones(1, 2), draw, impl="torch")
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.conv3d(x, weights[0], padding=1), 0.01)
    assert_close(y, expected, name="scales (1, 1)")


# --- the blocks: seeded draws, the same on every path --------------------------------------


@pytest.mark.parametrize("region", REGIONS)
def test_blocks_draw_the_same_on_every_path(region):
    """For one torch seed, impl="reference", "torch" and "triton" draw the same mask and scales
    (so the outputs agree), and a second run from the same seed repeats the first exactly."""
    x = torch.randn(2, 3, 3, 10, 6)
    for make in (lambda impl: PlainRMB(3, 4, variant="scaling", region=region, impl=impl),
                 lambda impl: InceptionRMB(3, 4, fuse="concat", region=region, reg_prob=0.7, impl=impl)):
        torch.manual_seed(0)
        blocks = {impl: make(impl).train() for impl in ("reference", "torch", "triton")}
        for impl in ("torch", "triton"):
            blocks[impl].load_state_dict(blocks["reference"].state_dict())
        outputs = {}
        for impl, block in blocks.items():
            torch.manual_seed(11)
            outputs[impl] = block(x)
        assert_close(outputs["torch"], outputs["reference"], name=f"{region} torch vs reference")
        assert_close(outputs["triton"], outputs["reference"], name=f"{region} triton vs reference")
        torch.manual_seed(11)
        assert torch.equal(blocks["torch"](x), outputs["torch"]), "a seeded forward repeats"
        torch.manual_seed(12)
        assert not torch.equal(blocks["torch"](x), outputs["torch"]), "another seed draws another mask"


def test_draws_follow_the_generator_and_reg_prob():
    layer = ReverseMask("scaling", "unit", reg_prob=0.5).train()
    x = torch.zeros(1, 1, 1, 8, 8)
    draws = []
    for seed in (3, 3):
        torch.manual_seed(seed)
        draws.append(layer.draw(x))
    assert torch.equal(draws[0][0].seed, draws[1][0].seed) and torch.equal(draws[0][1], draws[1][1])
    perturbed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        _, scales = layer.draw(x)
        perturbed += int(not torch.equal(scales, torch.ones_like(scales)))
    assert 8 < perturbed < 32  # about half the passes perturb
    assert ReverseMask().eval().draw(x) == (None, None)


def test_inception_shares_one_mask_between_dropping_and_scaling():
    block = InceptionRMB(3, 4, region="block").train()
    torch.manual_seed(0)
    draw, scales = block.scaling.mask.draw(torch.zeros(1, 3, 2, 8, 6), ("dropping", "scaling"))
    assert isinstance(draw, MaskDraw) and scales.shape == (2, 2)
    assert torch.equal(scales[0], torch.tensor([1.0, 0.0]))


def test_rmfe_eval_is_plain_conv_and_params_unchanged():
    torch.manual_seed(0)
    block = RMFE(3, 4, impl="torch").eval()
    x = torch.randn(2, 3, 3, 8, 5)
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.conv3d(x, block.conv.weight, padding=1), 0.01)
    assert_close(block(x), expected, name="eval")
    assert set(InceptionRMB(3, 4).state_dict()) == {
        "global_conv.weight", "dropping.conv.weight", "scaling.conv.weight"}


def test_triton_refuses_float64():
    x, _, weights, scales = make_inputs(7)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rmb_conv3d(x.double(), None, [w.double() for w in weights], scales, None, impl="triton")


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(scales=torch.ones(2, 2)), ValueError, "scales must be \\[1, 2\\]"),
        (dict(fuse="mul"), ValueError, "fuse must be one of"),
        (dict(weights=[]), ValueError, "at least one"),
        (dict(draw=draw_mask("band", 0.5, 10, 7)), ValueError, "drawn for 10x7"),
    ],
)
def test_bad_inputs(changes, error, match):
    x, _, weights, scales = make_inputs(8)
    args = dict(x=x, weight_global=None, weights=weights, scales=scales, draw=draw_mask("unit", 0.5, 9, 7))
    args.update(changes)
    with pytest.raises(error, match=match):
        rmb_conv3d(**args, impl="torch")
