"""The row-cut convolution engine's other blocks beside the MLA rows (``bench/test_mla.py``):
GaitGL's GL block (``gl_conv3d``), ReverseMask's RMFE pair (Plain RMB) and Inception RMB
(``rmb_conv3d``), each against its reference.

Providers: ``reference-eager`` (the spec: OpenGait's per-strip convolutions; ``Xa``/``Xb``
materialised), ``reference-compiled``, ``torch`` (the engine in PyTorch: one stacked convolution
plus the cut rows / the masked rows), for GL ``triton-hybrid`` / ``triton-gemm`` (the fused
engine's designs) / ``triton-auto`` (the default: the faster design per shape; the row's
``design_choices`` record the choice) and for ReverseMask ``triton`` (``fastgait::rmb_conv3d``:
vendor convolution of X, Triton kernels for ``A`` with the mask in-kernel).

FLOPs of one forward (``conv`` = one 3x3x3 convolution at the block's shape):
- GL: ``2*conv`` for every provider (the reference's per-strip convolutions sum to one), plus
  ``2*slots/(3*H)*conv`` of cut-row correction for the engine (``slots = 2*(strips-1)``);
- RMFE pair: ``2*conv`` (reference: ``c3(Xa) + c3(Xb)``; engine: ``W*X`` and ``W*(X*Mm)``);
- Inception RMB: ``5*conv`` (global, two per RMFE branch) either way for unit masks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pytest
import torch

from bench import _harness as h
from fastgait.ops import gl_conv3d
from fastgait.ops.gl import gl_conv3d_triton
from fastgait.ops.reverse_mask import draw_mask, rmb_conv3d

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

PRIORITY = h.PRIORITY["step"]  # after the MLA rows and the other ops' rows


@dataclass(frozen=True)
class ConvConfig:
    name: str
    block: str  # "gl", "rmfe" or "inception"
    n: int
    c_in: int
    c_out: int
    t: int
    h: int
    w: int
    fuse: str = "add"  # GL: fm_sign = (fuse == "concat")
    region: str = "unit"
    halving: int = 3
    priority: int = PRIORITY

    def shape(self) -> dict:
        shape = asdict(self)
        del shape["name"], shape["priority"]
        return shape

    @property
    def out_rows(self) -> int:
        if self.fuse != "concat":
            return self.h
        return 3 * self.h if self.block == "inception" else 2 * self.h


PAPER = [
    ConvConfig("casia-b GL 32-64 10x64x44", "gl", 128, 32, 64, 10, 64, 44),
    ConvConfig("casia-b GL 64-128 10x32x22", "gl", 128, 64, 128, 10, 32, 22),
    ConvConfig("casia-b GL-fm 128-128 10x32x22", "gl", 128, 128, 128, 10, 32, 22, "concat"),
    ConvConfig("casia-b RMFE unit 32-64 10x64x44", "rmfe", 128, 32, 64, 10, 64, 44),
    ConvConfig("casia-b Inception-RMB unit 32-64 10x64x44", "inception", 128, 32, 64, 10, 64, 44),
    ConvConfig("casia-b Inception-RMB unit 128-128 10x32x22 concat", "inception", 128, 128, 128, 10, 32, 22,
               "concat"),
    ConvConfig("casia-b Inception-RMB band 64-128 10x32x22", "inception", 128, 64, 128, 10, 32, 22, region="band"),
]
SMOKE = [
    ConvConfig("tiny GL 4-8 3x8x6", "gl", 2, 4, 8, 3, 8, 6, halving=2),
    ConvConfig("tiny RMFE 4-8 3x8x6", "rmfe", 2, 4, 8, 3, 8, 6),
    ConvConfig("tiny Inception-RMB 4-8 3x8x6", "inception", 2, 4, 8, 3, 8, 6, "concat", region="block"),
]
PROVIDERS = {"gl": ("reference-eager", "reference-compiled", "torch", "triton-hybrid", "triton-gemm", "triton-auto"),
             "rmfe": ("reference-eager", "reference-compiled", "torch", "triton"),
             "inception": ("reference-eager", "reference-compiled", "torch", "triton")}


def shrink(config: ConvConfig) -> ConvConfig:
    return replace(config, n=2, c_in=max(4, config.c_in // 16), c_out=max(4, config.c_out // 16), t=3, h=8, w=6,
                   halving=2)


def cases(mode: h.Mode) -> list[h.Case]:
    out = []
    for config in mode.pick(PAPER, SMOKE, shrink):
        out += h.op_cases([config], PROVIDERS[config.block])
    return out


def flops(config: ConvConfig, engine: bool) -> float:
    conv = h.conv3d_flops(config.n, config.c_in, config.c_out, config.t, config.h, config.w)
    if config.block == "gl":
        strip = config.h // 2**config.halving
        slots = 2 * (-(-config.h // strip) - 1)
        return 2 * conv + (2 * slots / (3 * config.h) * conv if engine else 0.0)
    return 2 * conv if config.block == "rmfe" else 5 * conv


class ConvBench(h.OpBench):
    op = "conv_blocks"

    def inputs(self, bench, config, seed):
        device, dtype = bench.device, bench.mode.dtype
        gen = torch.Generator(device=device).manual_seed(seed)

        def channels_last(c, rows):
            values = torch.randn(config.n, config.t, rows, config.w, c, generator=gen, device=device)
            return values.to(dtype).permute(0, 4, 1, 2, 3)

        def weight():
            scale = (27 * config.c_in) ** -0.5
            return (torch.randn(config.c_out, config.c_in, 3, 3, 3, generator=gen, device=device) * scale).requires_grad_()

        inputs = {"x": channels_last(config.c_in, config.h).requires_grad_()}
        if config.block != "rmfe":  # RMFE has one (shared) weight: a leaf it never reads would get no gradient
            inputs["weight_global"] = weight()
        inputs.update(weight_local=weight(), grad_out=channels_last(config.c_out, config.out_rows))
        if config.block != "gl":
            inputs["draw"] = draw_mask(config.region, 0.5, config.h, config.w, device, gen)
            inputs["scales"] = torch.rand(2, 2, generator=gen, device=device)
            if config.block == "inception":
                inputs["weight_scaling"] = weight()
        return inputs

    def forward(self, bench, provider, config):
        if config.block == "gl":
            fm_sign = config.fuse == "concat"
            if provider.startswith("triton-"):
                design = provider.removeprefix("triton-")
                return lambda i: gl_conv3d_triton(i["x"], i["weight_global"], i["weight_local"], config.halving,
                                                  fm_sign, design=design)

            def run(impl):
                return lambda i: gl_conv3d(i["x"], i["weight_global"], i["weight_local"], config.halving, fm_sign,
                                           impl=impl)
        else:
            def run(impl):
                def call(i):
                    if config.block == "rmfe":
                        return rmb_conv3d(i["x"], None, [i["weight_local"]], i["scales"][:1], i["draw"], impl=impl)
                    return rmb_conv3d(i["x"], i["weight_global"], [i["weight_local"], i["weight_scaling"]],
                                      i["scales"], i["draw"], config.fuse, impl=impl)
                return call

        if provider == "reference-eager":
            return run("reference")
        if provider == "reference-compiled":
            return bench.compile(run("reference"), key=(self.op, config.name, provider))
        return run(provider)

    def work(self, bench, config, provider, pass_):
        element = bench.mode.dtype.itemsize
        x_bytes = config.n * config.c_in * config.t * config.h * config.w * element
        y_bytes = config.n * config.c_out * config.t * config.out_rows * config.w * element
        floor = flops(config, engine=True)
        executed = flops(config, engine=not provider.startswith("reference"))
        fwd = h.Work(floor, x_bytes + y_bytes, executed, bench.mode.matrix)
        bwd = h.Work(2 * floor, 2 * x_bytes + y_bytes, 2 * executed, bench.mode.matrix)
        return h.pass_work(pass_, fwd, bwd)


def test_conv_blocks(benchmark, bench, case):
    h.run_op_case(benchmark, bench, ConvBench(), case)
