"""``mla_conv3d`` (``kernels/conv_engine.py``, the row-cut engine): the fused MLA block against its reference.

Providers: ``reference-eager`` (``impl="reference"``: three cuDNN convolutions on masked copies,
under bf16 autocast with channels-last-3d inputs, the fair baseline of fused_ops.md §1),
``reference-compiled`` (the same, ``torch.compile``'d), ``torch`` (the band-aware PyTorch path),
``triton-hybrid``, ``triton-hybrid2d`` and ``triton-gemm`` (``fastgait.ops.mla.mla_conv3d_triton``'s
designs; hybrid2d is the hybrid with cuDNN's 2-D kernels over frame-stacked channels) and
``triton-auto`` (the default: the faster design per shape, forward and backward chosen apart by
timing; the row's ``design_choices`` say what it chose and the timings it chose by), and
``triton-unchunked`` (``triton-auto`` with ``FASTGAIT_CHUNK_MIB=0``: the whole batch in one chunk;
fwd+bwd only): beside ``triton-auto``, what the sample chunks cost in time and save in peak memory.

FLOPs of one forward, with ``conv = 2·N·C_in·C_out·27·T·H·W`` (one 3×3×3 convolution):
- reference (executed): ``3·conv`` (global, and the local weight on ``X·M0`` and on ``X·M1``);
- band-aware (the floor, and what the torch path executes): ``2·conv + (8/(3H))·conv``: ``[G; F]``
  as one convolution with ``2·C_out`` outputs, plus ``P`` on at most 4 cut rows per sample, each
  two kernel rows of three (the middle row never reads across the band edge; the Triton kernels
  skip it too).
The backward (dgrad and wgrad of each convolution) is twice the forward. ``test_flop_counts``
checks both counts against PyTorch's FLOP counter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pytest
import torch

import fastgait.ops.conv_engine as conv_engine
import fastgait.ops.mla as mla_module
from bench import _harness as h
from fastgait.ops import band_height, mla_conv3d

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

OP = "mla_conv3d"
DROP_RATIO = 0.4  # GaitMask's band: floor(0.4 * H) rows
PROVIDERS = ("reference-eager", "reference-compiled", "torch", "triton-hybrid", "triton-hybrid2d", "triton-gemm",
             "triton-auto", "triton-unchunked")
UNCHUNKED = "triton-unchunked"


@dataclass(frozen=True)
class MLAConfig:
    name: str
    n: int
    c_in: int
    c_out: int
    t: int
    h: int
    w: int
    fuse: str  # "add" (MLA-A) or "concat" (MLA-B: 2H output rows)
    priority: int = h.PRIORITY["mla"]

    def shape(self) -> dict:
        shape = asdict(self)
        del shape["name"], shape["priority"]
        return shape

    @property
    def band_rows(self) -> int:
        return band_height(self.h, DROP_RATIO)

    @property
    def out_rows(self) -> int:
        return 2 * self.h if self.fuse == "concat" else self.h


# performance.md §1: CASIA-B, batch 8x16 clips of 30 frames (10 after the temporal stem).
PAPER = [
    MLAConfig("casia-b MLA-A 32-64 10x64x44", 128, 32, 64, 10, 64, 44, "add"),
    MLAConfig("casia-b MLA-A 64-128 10x32x22", 128, 64, 128, 10, 32, 22, "add"),
    MLAConfig("casia-b MLA-B 128-128 10x32x22", 128, 128, 128, 10, 32, 22, "concat"),
    # OU-MVLP's heaviest block (batch 32x8 = 256, first stage at full resolution).
    MLAConfig("oumvlp MLA-A 128-128 10x64x44", 256, 128, 128, 10, 64, 44, "add", priority=h.PRIORITY["oumvlp"]),
]
SMOKE = [MLAConfig("tiny MLA-A 4-8 3x8x6", 2, 4, 8, 3, 8, 6, "add")]


def shrink(config: MLAConfig) -> MLAConfig:
    return replace(config, n=2, c_in=max(4, config.c_in // 16), c_out=max(4, config.c_out // 16), t=3, h=8, w=6)


def cases(mode: h.Mode) -> list[h.Case]:
    return [case for case in h.op_cases(mode.pick(PAPER, SMOKE, shrink), PROVIDERS)
            if case.provider != UNCHUNKED or case.pass_ == "fwd+bwd"]


def flops(config: MLAConfig, band_aware: bool) -> float:
    """Forward FLOPs: band-aware ``(2 + 8/(3H))·conv``, or the reference's ``3·conv``."""
    conv = h.conv3d_flops(config.n, config.c_in, config.c_out, config.t, config.h, config.w)
    return (2 + 8 / (3 * config.h)) * conv if band_aware else 3 * conv


class MLABench(h.OpBench):
    op = OP

    def inputs(self, bench, config, seed):
        """X (a block's input: bf16 on a GPU, channels-last-3d), fp32 weights (parameters under
        autocast), per-sample band starts, and the upstream gradient in the output's layout."""
        device, dtype = bench.device, bench.mode.dtype
        gen = torch.Generator(device=device).manual_seed(seed)

        def channels_last(c, rows, scale=1.0):
            values = torch.randn(config.n, config.t, rows, config.w, c, generator=gen, device=device) * scale
            return values.to(dtype).permute(0, 4, 1, 2, 3)  # [n, c, t, h, w] with channels innermost

        def weight():
            scale = (27 * config.c_in) ** -0.5
            values = torch.randn(config.c_out, config.c_in, 3, 3, 3, generator=gen, device=device) * scale
            return values.requires_grad_()

        starts = torch.randint(0, config.h - config.band_rows + 1, (config.n,), generator=gen, device=device)
        return {
            "x": channels_last(config.c_in, config.h).requires_grad_(),
            "weight_global": weight(),
            "weight_local": weight(),
            "band_start": starts,
            "grad_out": channels_last(config.c_out, config.out_rows),
        }

    def forward(self, bench, provider, config):
        def run(impl):
            return lambda i: mla_conv3d(
                i["x"], i["weight_global"], i["weight_local"], i["band_start"], config.band_rows, config.fuse, impl=impl
            )

        if provider == "reference-eager":
            return run("reference")
        if provider == "reference-compiled":
            return bench.compile(run("reference"), key=(OP, config.name, provider))
        if provider == "torch":
            return run("torch")
        design = "auto" if provider == UNCHUNKED else provider.removeprefix("triton-")
        fused = getattr(mla_module, "mla_conv3d_triton", None)
        if fused is None or design not in getattr(mla_module, "DESIGN_CHOICES", getattr(mla_module, "DESIGNS", ())):
            pytest.skip(f"fastgait.ops.mla has no mla_conv3d_triton(..., design={design!r}) yet")
        return lambda i: fused(
            i["x"], i["weight_global"], i["weight_local"], i["band_start"], config.band_rows, config.fuse, design=design
        )

    def work(self, bench, config, provider, pass_):
        element = bench.mode.dtype.itemsize
        x_bytes = config.n * config.c_in * config.t * config.h * config.w * element
        y_bytes = config.n * config.c_out * config.t * config.out_rows * config.w * element
        floor, executed = flops(config, band_aware=True), flops(config, band_aware=not provider.startswith("reference"))
        fwd = h.Work(floor, x_bytes + y_bytes, executed, bench.mode.matrix)
        bwd = h.Work(2 * floor, 2 * x_bytes + y_bytes, 2 * executed, bench.mode.matrix)  # read X and dY, write dX
        return h.pass_work(pass_, fwd, bwd)


def test_mla(benchmark, bench, case, monkeypatch):
    if case.provider == UNCHUNKED:  # read at each call, the backward's included
        monkeypatch.setenv(conv_engine.CHUNK_ENV, "0")
    h.run_op_case(benchmark, bench, MLABench(), case)


def test_flop_counts(bench):
    """The hand counts above are what PyTorch's counter sees: the torch path executes the
    band-aware count, the reference three convolutions."""
    config = SMOKE[0]
    i = MLABench().inputs(bench, config, 0)
    for impl, band_aware in (("torch", True), ("reference", False)):
        with bench.mode.autocast():
            counted = h.counted_flops(lambda: mla_conv3d(
                i["x"], i["weight_global"], i["weight_local"], i["band_start"], config.band_rows, config.fuse, impl=impl
            ))
        assert counted == pytest.approx(flops(config, band_aware)), impl
