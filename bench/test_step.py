"""Whole training steps of GaitMask, ReverseMaskNet (Inception RMB) and GaitGL at the CASIA-B config.

One step is ``fastgait.engine.trainer.Trainer.train_step`` without its host-side bookkeeping:
forward under autocast (bf16 on a GPU) on channels-last-3d clips, the batch-all triplet loss
on fp32 embeddings, backward, Adam. (The GradScaler is off for bf16 and the lr schedule is a
host-side multiply; the host-to-device copy of the batch belongs to the loader, ``test_data.py``.)

Providers, all with the same weights, inputs and optimizer:
- ``reference-eager``: ``impl="reference"`` (plain modules and the reference ops), eager;
- ``reference-compiled``: the same model under ``torch.compile``;
- ``fastgait-eager``: ``impl="auto"`` (the fused ops), eager;
- ``fastgait``: ``impl="auto"`` under ``torch.compile``: the trainer's GPU configuration.

FLOPs: PyTorch's FLOP counter over one forward and backward, of the reference model (what
the reference executes: every MLA pair as two convolutions) and of the band-aware
``impl="torch"`` model (the floor: each pair as one convolution plus the boundary rows).
Throughput: sequences per second, ``P·K`` over the median step time.

Before timing, each provider's first step is checked against the reference's: same seed (so
the same bands and masks; compiled code draws them as eager code does, see
``compiled_randomness_like_eager``), same weights and batch, embeddings within tolerance.

The fused models run the row-cut engine's default design, ``"auto"`` (the faster design per
shape, timed on the first step): each row's ``design_choices`` lists what it chose per block
shape and direction, with the timings (``bench/report.py``: "Design chosen per shape").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pytest
import torch

from bench import _harness as h
from bench._results import HEADLINE_STEP
from fastgait.models import MODELS
from fastgait.nn import MLA, TripletLoss
from fastgait.ops import _autotune
from fastgait.testing import relative_error

pytestmark = [h.TIMED, pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")]

OP = "train_step"
PROVIDERS = {  # provider: (impl, compiled)
    "reference-eager": ("reference", False),
    "reference-compiled": ("reference", True),
    "fastgait-eager": ("auto", False),
    "fastgait": ("auto", True),
}
SMOKE_COMPILED = "fastgait"  # the smoke compiles one model once (compiling on a CPU takes long)
MARGIN, LR, CHECK_SEED = 0.2, 1e-4, 1234
# Relative error of the embeddings after the whole network, fused vs reference: bf16 rounding
# compounds over the layers; a wrong kernel is off by O(1) (the op benches check each op tightly).
STEP_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1}


@dataclass(frozen=True)
class StepConfig:
    name: str
    model: str  # a key of fastgait.models.MODELS
    options: tuple = ()  # constructor arguments besides impl, as (name, value) pairs
    P: int = 8
    K: int = 16
    frames: int = 30
    height: int = 64
    width: int = 44

    @property
    def batch(self) -> int:
        return self.P * self.K

    def shape(self) -> dict:
        return {"model": self.model, "P": self.P, "K": self.K, "frames": self.frames, "height": self.height,
                "width": self.width, **dict(self.options)}

    def build(self, impl: str, device: torch.device) -> torch.nn.Module:
        model = MODELS[self.model](**dict(self.options), impl=impl)
        return model.to(device=device, memory_format=torch.channels_last_3d).train()


PAPER = [
    StepConfig(HEADLINE_STEP[0], "GaitMask", (("preset", "casia-b"),)),
    StepConfig("ReverseMaskNet casia-b inception", "ReverseMaskNet", (("preset", "casia-b"), ("block", "inception"))),
    StepConfig("GaitGL casia-b", "GaitGL", (("preset", "casia-b"),)),
]
SMALL_CLIPS = dict(P=2, K=2, frames=6, height=16, width=12)
NARROW_GAITGL_STEM = ({"in": 1, "out": 8}, {"in": 8, "out": 8, "kernel": (3, 1, 1), "stride": (3, 1, 1)})
NARROW_GAITGL_BLOCKS = tuple(
    {"type": "maxpool"} if c_in is None else {"type": "gl", "in": c_in, "out": c_out, "halving": 3, "fm_sign": last}
    for c_in, c_out, last in ((8, 16, False), (None, None, False), (16, 32, False), (32, 32, True))
)
SMOKE = [
    StepConfig("GaitMask small", "GaitMask", (("preset", "small"), ("input_height", 16)), **SMALL_CLIPS),
    StepConfig("ReverseMaskNet inception narrow", "ReverseMaskNet",
               (("channels", (8, 16, 16)), ("input_height", 16)), **SMALL_CLIPS),
    StepConfig("GaitGL narrow", "GaitGL", (("stem", NARROW_GAITGL_STEM), ("blocks", NARROW_GAITGL_BLOCKS),
                                           ("input_height", 16)), **SMALL_CLIPS),
]


def shrink(config: StepConfig) -> StepConfig:
    return replace(config, options=config.options + (("input_height", 16),), **SMALL_CLIPS)


def cases(mode: h.Mode) -> list[h.Case]:
    out = []
    for config in mode.pick(PAPER, SMOKE, shrink):
        headline = config.model == "GaitMask"
        for provider, (_, compiled) in PROVIDERS.items():
            if compiled and not mode.benchmark and not (headline and provider == SMOKE_COMPILED):
                continue
            kind = "headline-step" if headline else "compiled-step" if compiled else "step"
            out.append(h.Case(config, provider, "step", h.PRIORITY[kind]))
    return out


@pytest.fixture(scope="module", autouse=True)
def compiled_randomness_like_eager():
    """Inductor draws random numbers with its own generator unless ``fallback_random``; with it,
    a compiled step draws the bands and masks an eager step draws from the same seed (so the
    check compares like with like). The draws are ``[n]`` and mask-sized: no effect on speed."""
    import torch._inductor.config as inductor_config

    previous = inductor_config.fallback_random
    inductor_config.fallback_random = True
    yield
    inductor_config.fallback_random = previous


_INITIAL_STATE: dict = {}
_FLOPS: dict = {}


def initial_state(config: StepConfig) -> dict:
    """The weights every provider starts from (the reference model's, seed 0)."""
    if config.name not in _INITIAL_STATE:
        torch.manual_seed(0)
        model = MODELS[config.model](**dict(config.options), impl="reference")
        _INITIAL_STATE[config.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _INITIAL_STATE[config.name]


def make_batch(bench: h.Bench, config: StepConfig, seed: int) -> dict:
    """Binary silhouettes as the trainer feeds them (``[n, 1, t, h, w]`` channels-last-3d), P x K labels."""
    gen = torch.Generator(device=bench.device).manual_seed(seed)
    sils = torch.rand(config.batch, config.frames, config.height, config.width, generator=gen, device=bench.device)
    sils = (sils > 0.5).float().unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
    labels = torch.arange(config.P, device=bench.device).repeat_interleave(config.K)
    return {"sils": sils, "labels": labels}


def make_step(bench: h.Bench, config: StepConfig, provider: str):
    """``step(sils, labels) -> (loss, embeddings)``: one training step of a fresh model."""
    impl, compiled = PROVIDERS[provider]
    model = config.build(impl, bench.device)
    model.load_state_dict(initial_state(config))
    net = bench.compile(model) if compiled else model
    loss_fn = TripletLoss(MARGIN, impl="reference" if impl == "reference" else "auto")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step(sils, labels):
        with bench.mode.autocast():
            out = net(sils)
        embeddings = out[0] if isinstance(out, tuple) else out
        loss, _ = loss_fn(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), embeddings.detach()

    return step


def first_step(bench: h.Bench, config: StepConfig, provider: str, batch: dict):
    """``(step, embeddings of its first step, seconds the first step took)``, from ``CHECK_SEED``."""
    step = make_step(bench, config, provider)
    torch.manual_seed(CHECK_SEED)
    start = time.perf_counter()
    _, embeddings = step(batch["sils"], batch["labels"])
    bench.synchronize()
    return step, embeddings, time.perf_counter() - start


def step_flops(bench: h.Bench, config: StepConfig, batch: dict) -> tuple[float, float]:
    """``(band-aware, as the reference executes)`` FLOPs of one forward and backward."""
    if config.name not in _FLOPS:
        counts = {}
        for impl in ("torch", "reference"):
            model = config.build(impl, bench.device)
            has_mla = any(isinstance(m, MLA) for m in model.modules())
            if impl == "reference" and not has_mla:  # no band trick to count: the same work
                counts[impl] = counts["torch"]
                continue
            loss_fn = TripletLoss(MARGIN, impl="reference")

            def once():
                with bench.mode.autocast():
                    out = model(batch["sils"])
                embeddings = out[0] if isinstance(out, tuple) else out
                loss_fn(embeddings.float(), batch["labels"])[0].backward()

            counts[impl] = h.counted_flops(once)
        _FLOPS[config.name] = (counts["torch"], counts["reference"])
    return _FLOPS[config.name]


def test_step(benchmark, bench, case):
    with _autotune.usage() as used:
        _test_step(benchmark, bench, case, used)


def _test_step(benchmark, bench, case, used):
    config, provider = case.config, case.provider
    compiled = PROVIDERS[provider][1]
    bench.require_time(150 if compiled else 30)
    bench.group(benchmark, OP, config.name)
    sets = bench.rotation((OP, config.name), lambda seed: make_batch(bench, config, seed))

    step, embeddings, first_s = first_step(bench, config, provider, sets[0])
    reference = bench.references.get(
        (OP, config.name),
        lambda: embeddings if provider == "reference-eager" else first_step(bench, config, "reference-eager", sets[0])[1],
    )
    error = relative_error(embeddings.float(), reference.float())
    tolerance = STEP_TOLERANCE[bench.mode.dtype]
    assert error <= tolerance, f"{config.name} {provider}: embeddings differ from the reference's by {error:.2e}"

    band_aware, naive = step_flops(bench, config, sets[0])
    times = bench.measure(benchmark, step, bench.rotating(sets, lambda batch: (batch["sils"], batch["labels"])))
    median_ms = times.get("median_ms")
    work = h.Work(band_aware, 0.0, naive if provider.startswith("reference") else band_aware, bench.mode.matrix)
    bench.record(
        benchmark, case, OP, times, work,
        shape=config.shape(), rel_error=error, compile_s=first_s if compiled else None, flops_naive=naive,
        throughput=config.batch / (median_ms * 1e-3) if median_ms else None,
        design_choices=h.design_choices(used),
    )
    del step
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
