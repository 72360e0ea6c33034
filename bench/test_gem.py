"""``gem_hpp`` (``kernels/gem.py``): GeM over strips fused with the temporal max, against its reference.

Providers: ``reference-eager`` (``impl="reference"``: max over frames, clamp, pow, a mean per
strip, pow), ``reference-compiled``, ``triton`` (one pass over the input).

Input: the last block's output, ``[n, c, t, h, w]`` bf16 channels-last-3d on a GPU (the model
runs under autocast), one strip per row (``bins = (h,)``, as the models pool: the row kernel
writes the output itself, one launch), and one pyramid (bins 1..32: the row kernel, then the
strip combine). Memory-bound: the floor is the bytes (read X once, write the strips; backward:
read the saved frame max and its frame, write dX), the FLOPs (max over frames, then clamp, log,
multiply, exp and a sum per element of the frame max) count elementwise work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from bench import _harness as h
from fastgait.ops import gem_hpp

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

OP = "gem_hpp"
PROVIDERS = ("reference-eager", "reference-compiled", "triton")
P_INIT = 6.5  # the models' initial exponent


@dataclass(frozen=True)
class GeMConfig:
    name: str
    n: int
    c: int
    t: int
    h: int
    w: int
    priority: int = h.PRIORITY["gem"]
    bins: tuple = ()  # strips per bin; () means one strip per row (the models' GeMHPP)

    @property
    def strip_bins(self) -> tuple:
        return self.bins or (self.h,)

    def shape(self) -> dict:
        shape = asdict(self)
        del shape["name"], shape["priority"]
        return shape | {"bins": list(self.strip_bins)}


PAPER = [
    GeMConfig("casia-b GaitMask 128x10x64x22", 128, 128, 10, 64, 22),  # after MLA-B: 2H = 64 rows
    GeMConfig("casia-b GaitGL 128x10x32x22", 128, 128, 10, 32, 22),
    # Pyramid bins (GaitSet-style HPP) go through the row kernel and the strip combine.
    GeMConfig("casia-b GaitMask 128x10x64x22 bins 1-32", 128, 128, 10, 64, 22, bins=(1, 2, 4, 8, 16, 32)),
    GeMConfig("oumvlp GaitMask 256x10x64x22", 256, 256, 10, 64, 22, priority=h.PRIORITY["oumvlp"]),
]
SMOKE = [GeMConfig("tiny 8x3x8x6", 2, 8, 3, 8, 6)]


def shrink(config: GeMConfig) -> GeMConfig:
    return replace(config, n=2, c=8, t=3, h=8, w=6, bins=tuple(b for b in config.bins if b <= 8))


def cases(mode: h.Mode) -> list[h.Case]:
    return h.op_cases(mode.pick(PAPER, SMOKE, shrink), PROVIDERS, compiled_priority=h.PRIORITY["compiled-op"])


class GeMBench(h.OpBench):
    op = OP

    def inputs(self, bench, config, seed):
        device, dtype = bench.device, bench.mode.dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(config.n, config.t, config.h, config.w, config.c, generator=gen, device=device)
        x = F.leaky_relu(x, 0.01).to(dtype).permute(0, 4, 1, 2, 3)  # a block's output, channels innermost
        strips = sum(config.strip_bins)
        grad_out = torch.randn(config.n, config.c, strips, generator=gen, device=device).to(dtype)
        p = torch.full((1,), P_INIT, device=device)
        return {"x": x.requires_grad_(), "p": p.requires_grad_(), "grad_out": grad_out}

    def forward(self, bench, provider, config):
        def run(impl):
            return lambda i: gem_hpp(i["x"], i["p"], config.strip_bins, impl=impl)

        if provider == "reference-compiled":
            return bench.compile(run("reference"), key=(OP, config.name, provider))
        return run("reference" if provider == "reference-eager" else provider)

    def work(self, bench, config, provider, pass_):
        element = bench.mode.dtype.itemsize
        frames = config.n * config.c * config.t * config.h * config.w
        frame_max = config.n * config.c * config.h * config.w
        strips = config.n * config.c * sum(config.strip_bins) * 4  # fp32
        fwd = h.Work(flops=frames + 5 * frame_max, bytes=frames * element + strips, matrix="fp32")
        saved = frame_max * (element + 2)  # the frame max and its frame (int16)
        bwd = h.Work(flops=frames + 6 * frame_max, bytes=frames * element + saved + strips, matrix="fp32")
        return h.pass_work(pass_, fwd, bwd)


def test_gem(benchmark, bench, case):
    h.run_op_case(benchmark, bench, GeMBench(), case)


def test_compiled_references_run_after_the_eager_rows(bench):
    """GeM's and triplet's ``reference-compiled`` rows (73 s and 29 s of torch.compile on the first
    H200 run) come after every eager row of the run, so a time budget cuts them first."""
    from bench import test_triplet

    for all_cases in (cases(bench.mode), test_triplet.cases(bench.mode)):
        compiled = [case for case in all_cases if case.provider == h.COMPILED]
        assert compiled and all(case.priority == max(case.config.priority, h.PRIORITY["compiled-op"])
                                for case in compiled)
        assert all(case.priority == case.config.priority for case in all_cases if case.provider != h.COMPILED)
