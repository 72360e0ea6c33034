"""Where the time of a training step goes: a per-kernel profile of the fastgait GaitMask step.

``torch.profiler`` over a few steps of the headline step (``bench/test_step.py``'s GaitMask at the
CASIA-B config, ``fastgait-eager``: the fused ops and the vendor kernels under their own names)
after warm-up; the top kernels by total device time, with calls and milliseconds per step and
their share of the step's kernel time, go into the results JSON (``profiles``) and
docs/PERFORMANCE.md. Every optimisation is chosen from this table. On a CPU (the smoke) the same
code profiles CPU operators at tiny shapes: NOT a performance figure.
"""
from __future__ import annotations

import pytest
import torch

from bench import _harness as h
from bench.test_step import PAPER, SMOKE, make_batch, make_step, shrink

pytestmark = h.TIMED

PROFILED_PROVIDER = "fastgait-eager"
STEPS, WARMUP = 3, 2  # on a CPU (the smoke): 1 and 1
TOP = 25


def cases(mode: h.Mode) -> list[h.Case]:
    config = mode.pick(PAPER, SMOKE, shrink)[0]
    return [h.Case(config, PROFILED_PROVIDER, "profile", h.PRIORITY["profile"])]


def _device_time_us(event, cuda: bool) -> float:
    if not cuda:
        return event.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


def kernel_profile(step, args: tuple, device: torch.device, steps: int = STEPS, warmup: int = WARMUP,
                   top: int = TOP) -> dict:
    """``{"unit", "steps", "total_ms_per_step", "kernels": [{name, calls_per_step, ms_per_step, share}]}``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(*args)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(*args)
        if cuda:
            torch.cuda.synchronize()
    events = []
    for event in prof.key_averages():
        if cuda and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        time_us = _device_time_us(event, cuda)
        if time_us > 0:
            events.append((event.key, event.count, time_us))
    total = sum(t for _, _, t in events)
    events.sort(key=lambda e: -e[2])
    return {
        "unit": "CUDA kernels" if cuda else "CPU operators (self time)",
        "steps": steps,
        "total_ms_per_step": total / 1e3 / steps,
        "kernels": [{"name": name, "calls_per_step": count / steps, "ms_per_step": t / 1e3 / steps,
                     "share": t / total if total else None} for name, count, t in events[:top]],
    }


def test_profile(bench, case):
    config = case.config
    bench.require_time(60)
    batch = make_batch(bench, config, 0)
    step = make_step(bench, config, case.provider)
    steps = STEPS if bench.mode.paper_shapes else 1
    profile = kernel_profile(step, (batch["sils"], batch["labels"]), bench.device, steps=steps,
                             warmup=WARMUP if bench.mode.paper_shapes else 1)
    assert profile["kernels"], "the profiler recorded no kernel"
    assert sum(k["share"] for k in profile["kernels"]) <= 1.0 + 1e-6
    bench.recorder.add_profile(f"{config.name} · {case.provider}", {
        "config": config.name, "provider": case.provider, "dtype": str(bench.mode.dtype).replace("torch.", ""),
        "performance_figure": bench.mode.paper_shapes, **profile})
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
