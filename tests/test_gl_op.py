"""``fastgait.ops.gl_conv3d`` (GaitGL's GL block on the row-cut engine) against OpenGait's
split-and-concatenate reference, in value and in every gradient.

Triton runs in the interpreter here (CPU tensors, fp32); each case gets fresh random inputs.
Heights are odd or not multiples of the strip count, so unequal last strips and strips of one
row (every row a cut row, cut on both sides) are covered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from fastgait.nn import GLConv
from fastgait.ops.conv_engine import DESIGNS
from fastgait.ops.gl import gl_conv3d, gl_conv3d_triton
from fastgait.ops.reference import gl_conv3d_reference
from fastgait.testing import assert_close, poisoned_outputs

IMPLS = ("torch",) + tuple(f"triton-{design}" for design in DESIGNS)


@dataclass(frozen=True)
class Case:
    n: int = 2
    c_in: int = 3
    c_out: int = 4
    t: int = 3
    h: int = 13
    w: int = 5
    halving: int = 2
    fm_sign: bool = False
    seed: int = 0


CASES = {
    "unequal-add": Case(),  # strips of 3 rows and a last one of 1
    "equal-concat": Case(h=16, halving=2, fm_sign=True, seed=1),
    "strips-of-1": Case(h=8, halving=3, t=2, seed=2),  # every row is cut on both sides
    "strips-of-2-T1": Case(h=9, halving=2, t=1, w=3, fm_sign=True, seed=3),
    "no-cut": Case(h=7, halving=0, seed=4),
    "wide": Case(n=1, c_in=8, c_out=17, t=4, h=11, w=7, halving=1, seed=5),
}


def make_inputs(case: Case, layout: str = "contiguous"):
    torch.manual_seed(case.seed)
    shape = (case.n, case.c_in, case.t, case.h, case.w)
    if layout == "contiguous":
        x = torch.randn(shape)
    elif layout == "channels-last":
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(case.n, case.c_in, case.h, case.t, 2 * case.w).transpose(2, 3)[..., ::2]
    else:
        raise ValueError(layout)
    scale = 1.0 / math.sqrt(27 * case.c_in)
    weights = [torch.randn(case.c_out, case.c_in, 3, 3, 3) * scale for _ in range(2)]
    return [t.detach().requires_grad_() for t in (x, *weights)]


def run(impl, x, weight_global, weight_local, case):
    if impl.startswith("triton-"):
        return gl_conv3d_triton(x, weight_global, weight_local, case.halving, case.fm_sign,
                                design=impl.split("-", 1)[1])
    return gl_conv3d(x, weight_global, weight_local, case.halving, case.fm_sign, impl=impl)


def check_against_reference(impl, case, layout="contiguous"):
    leaves = make_inputs(case, layout)
    y = run(impl, *leaves, case)
    wide = [t.double() for t in leaves]
    expected = gl_conv3d_reference(*wide, case.halving, case.fm_sign)
    assert_close(y, expected, name=f"{impl} y", dtype=torch.float32)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    for name, grad, expected_grad in zip(("x", "weight_global", "weight_local"), grads, expected_grads):
        assert_close(grad, expected_grad, name=f"{impl} d{name}")
    return y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_reference(impl, case_name):
    check_against_reference(impl, CASES[case_name])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["channels-last", "strided"])
def test_memory_layouts(impl, layout):
    y = check_against_reference(impl, replace(CASES["unequal-add"], seed=21), layout)
    if impl.startswith("triton") and layout == "channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("seed", [31, 32])
def test_more_seeds_triton_default(seed):
    check_against_reference("triton-hybrid", replace(CASES["equal-concat"], seed=seed, h=12, halving=1))


@pytest.mark.parametrize("forward, backward", [("gemm", "hybrid"), ("hybrid", "gemm"), ("hybrid2d", "hybrid"),
                                               ("hybrid", "hybrid2d")])
def test_auto_may_mix_designs_forward_and_backward(monkeypatch, forward, backward):
    """design="auto" resolves the forward and the backward apart (strips, terms "rest"): either
    backward after any forward gives the reference's gradients."""
    from fastgait.ops import conv_engine

    picked = {"fwd": forward, "bwd": backward}
    seen = []

    def choose(key, run, device):
        seen.append(key[1])
        return picked[key[1]]

    monkeypatch.setattr(conv_engine.CHOOSER, "choose", choose)
    check_against_reference("triton-auto", replace(CASES["unequal-add"], seed=44))
    assert seen == ["fwd", "bwd"]


@pytest.mark.parametrize("design", DESIGNS)
def test_every_output_element_is_written(design):
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", replace(CASES["wide"], c_in=3, c_out=5, seed=41))


# hybrid2d runs the hybrid's Triton kernels on these paths (its own, stack and fold, are covered above)
@pytest.mark.parametrize("design", ["hybrid", "gemm"])
@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
def test_channel_counts_in_whole_k_blocks(design, layout):
    """Multiples of 16 channels take the kernels' aligned K loop (``k_tiling``): 48 = 3 x 16."""
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", replace(CASES["unequal-add"], c_in=48, c_out=16, seed=43), layout)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
@pytest.mark.parametrize("n, samples", [(5, 2), (5, 3)])
def test_chunked_batch_matches_reference(monkeypatch, design, layout, n, samples):
    """Strips geometry with the batch in uneven chunks of samples: values and every gradient
    match the reference; outputs poisoned."""
    from test_mla_op import force_chunks

    calls = force_chunks(monkeypatch, samples)
    with poisoned_outputs():
        check_against_reference(f"triton-{design}", replace(CASES["unequal-add"], n=n, seed=70 + n), layout)
    assert {2: [(0, 2), (2, 4), (4, 5)], 3: [(0, 3), (3, 5)]}[samples] in calls, calls


@pytest.mark.parametrize("design", ["hybrid", "gemm"])  # one schema: hybrid2d adds nothing to check here
def test_opcheck(design):
    case = CASES["unequal-add"]
    x, weight_global, weight_local = make_inputs(case)
    args = (x, weight_global, weight_local, None, "strips", 3, "add", "rest", 0.01, design)
    torch.library.opcheck(torch.ops.fastgait.cut_conv3d.default, args)
    y, gates = torch.ops.fastgait.cut_conv3d(*args)
    inputs = [a.detach() for a in args[:3]]
    torch.library.opcheck(
        torch.ops.fastgait.cut_conv3d_backward.default, (torch.randn_like(y), *inputs, None, gates, *args[4:])
    )


def test_compile_fullgraph_forward_backward():
    case = CASES["equal-concat"]
    leaves = make_inputs(case, "channels-last")

    def block(x, weight_global, weight_local):
        return gl_conv3d(x, weight_global, weight_local, case.halving, case.fm_sign, impl="triton")

    expected = gl_conv3d_reference(*leaves, case.halving, case.fm_sign)
    upstream = torch.randn_like(expected)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        y = compiled(*leaves)
        grads = torch.autograd.grad(y, leaves, upstream)
    assert_close(y, expected, name="compiled y")
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    for name, grad, expected_grad in zip(("x", "weight_global", "weight_local"), grads, expected_grads):
        assert_close(grad, expected_grad, name=f"compiled d{name}")


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("fm_sign", [False, True])
def test_glconv_module_runs_the_op_and_keeps_opengait_keys(impl, fm_sign):
    torch.manual_seed(0)
    block = GLConv(3, 4, halving=2, fm_sign=fm_sign, impl=impl)
    assert set(block.state_dict()) == {"global_conv3d.conv3d.weight", "local_conv3d.conv3d.weight"}
    x = torch.randn(2, 3, 3, 13, 5)
    g = block.global_conv3d(x)
    local = torch.cat([block.local_conv3d(part) for part in x.split(13 // 4, 3)], 3)
    lrelu = torch.nn.functional.leaky_relu
    expected = lrelu(torch.cat([g, local], 3)) if fm_sign else lrelu(g) + lrelu(local)
    assert_close(block(x), expected, name=f"GLConv {impl}")


def test_glconv_other_kernels_take_opengait_loop():
    torch.manual_seed(0)
    block = GLConv(3, 4, halving=1, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 3, 3, 8, 5)
    local = torch.cat([block.local_conv3d(part) for part in x.split(4, 3)], 3)
    expected = torch.nn.functional.leaky_relu(block.global_conv3d(x)) + torch.nn.functional.leaky_relu(local)
    assert_close(block(x), expected, name="GLConv (3,1,1)")


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(halving=4), ValueError, "cannot be cut into 2\\*\\*4 strips"),
        (dict(halving=-1), ValueError, "halving must be an int"),
        (dict(halving=1.0), ValueError, "halving must be an int"),
        (dict(fm_sign=1), TypeError, "fm_sign must be a bool"),
        (dict(weight_local=torch.randn(4, 3, 3, 3, 1)), ValueError, "weight_local must be"),
        (dict(weight_global=torch.randn(5, 3, 3, 3, 3)), ValueError, "same shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, match):
    x, weight_global, weight_local = make_inputs(CASES["strips-of-2-T1"])
    args = dict(x=x, weight_global=weight_global, weight_local=weight_local, halving=2, fm_sign=False)
    args.update(changes)
    with pytest.raises(error, match=match):
        gl_conv3d(**args, impl="torch")
