"""The 3x3x3 convolution of the MLA blocks in the forms the vendor library offers, forward and backward.

cuDNN's conv3d reaches only 200-500 TFLOP/s at the MLA shapes on an H200 (the first GPU run),
against ~730 TFLOP/s of bf16 matrix rate; the MLA backward is most of the GaitMask step. Before
building more kernels, this measures, on the same inputs, what the vendor already does in other
forms (the fastest one is the baseline a fused MLA must beat):

- ``conv3d``: ``F.conv3d`` on channels-last-3d (cuDNN's NDHWC kernels): the reference's form;
- ``frame-stacked-conv2d``: one 2-D convolution over the three neighbouring frames stacked along
  channels (``fastgait.ops.conv.frame_stacked_conv3d``: cuDNN's NHWC 2-D kernels, its most tuned;
  costs a copy of X three channels wide);
- ``three-conv2d``: three accumulating 2-D convolutions, one per frame tap, on the frames as a
  batch (no stacked copy; three launches).

Configs: the GaitMask CASIA-B MLA blocks with the global and local weights stacked
(``[W_g; W_l]``, 2*c_out columns), as the fused MLA computes them: MLA-A 32->64 at 64x44,
MLA-A 64->128 at 32x22, MLA-B 128->128 at 32x22; batch 128 clips of 10 frames (after the
stride-3 temporal convolution). All forms equal ``conv3d`` up to summation order (checked first).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from bench import _harness as h
from fastgait.ops.conv import frame_stacked_conv3d

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

OP = "conv3x3x3"
PROVIDERS = ("reference-eager", "frame-stacked-conv2d", "three-conv2d")  # reference-eager: F.conv3d


@dataclass(frozen=True)
class ConvConfig:
    name: str
    n: int
    c_in: int
    c_out: int  # columns of the stacked [W_g; W_l]
    t: int
    h: int
    w: int
    # after GeM and triplet (their targets come first); the MLA rows' triton-hybrid2d already
    # measures the frame-stacked form inside the block
    priority: int = h.PRIORITY["triplet"] + 5

    def shape(self) -> dict:
        shape = asdict(self)
        del shape["name"], shape["priority"]
        return shape


PAPER = [
    ConvConfig("MLA-A 32->64 stacked at 64x44", 128, 32, 128, 10, 64, 44),
    ConvConfig("MLA-A 64->128 stacked at 32x22", 128, 64, 256, 10, 32, 22),
    ConvConfig("MLA-B 128->128 stacked at 32x22", 128, 128, 256, 10, 32, 22),
]
SMOKE = [ConvConfig("tiny 4->6 at 5x4", 2, 4, 6, 3, 5, 4)]


def shrink(config: ConvConfig) -> ConvConfig:
    return replace(config, n=2, c_in=4, c_out=6, t=3, h=5, w=4)


def cases(mode: h.Mode) -> list[h.Case]:
    return h.op_cases(mode.pick(PAPER, SMOKE, shrink), PROVIDERS)


def three_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 3x3x3 convolution (padding 1) as three 2-D convolutions over the frame taps, summed."""
    n, c_in, t, height, width = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c_in, height, width)  # a view for channels-last-3d
    out = None
    for kt in range(3):
        tap = F.conv2d(frames, weight[:, :, kt], padding=1).view(n, t, -1, height, width)
        shift = kt - 1  # output frame f reads input frame f + shift
        part = F.pad(tap, (0, 0, 0, 0, 0, 0, max(-shift, 0), max(shift, 0)))[:, max(shift, 0): max(shift, 0) + t]
        out = part if out is None else out + part
    return out.permute(0, 2, 1, 3, 4)


FORMS = {
    "reference-eager": lambda x, w: F.conv3d(x, w, padding=1),
    "frame-stacked-conv2d": lambda x, w: frame_stacked_conv3d(x, w, padding=1),
    "three-conv2d": three_conv2d,
}


class ConvBench(h.OpBench):
    op = OP

    def inputs(self, bench, config, seed):
        device = bench.device
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(config.n, config.c_in, config.t, config.h, config.w, generator=gen, device=device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = torch.randn(config.c_out, config.c_in, 3, 3, 3, generator=gen, device=device) * (27 * config.c_in) ** -0.5
        grad_out = torch.randn(config.n, config.c_out, config.t, config.h, config.w, generator=gen, device=device)
        grad_out = grad_out.to(bench.mode.dtype).contiguous(memory_format=torch.channels_last_3d)
        return {"x": x.requires_grad_(), "weight": weight.requires_grad_(), "grad_out": grad_out}

    def forward(self, bench, provider, config):
        form = FORMS[provider]
        return lambda i: form(i["x"], i["weight"])

    def work(self, bench, config, provider, pass_):
        flops = h.conv3d_flops(config.n, config.c_in, config.c_out, config.t, config.h, config.w)
        element = bench.mode.dtype.itemsize
        x_bytes = config.n * config.c_in * config.t * config.h * config.w * element
        y_bytes = x_bytes * config.c_out // config.c_in
        fwd = h.Work(flops, x_bytes + y_bytes, flops, bench.mode.matrix)
        bwd = h.Work(2 * flops, 2 * x_bytes + y_bytes, 2 * flops, bench.mode.matrix)
        return h.pass_work(pass_, fwd, bwd)


def test_conv_forms(benchmark, bench, case):
    h.run_op_case(benchmark, bench, ConvBench(), case)
