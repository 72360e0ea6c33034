"""``bench.memory_model``: the tracker counts a known allocation pattern exactly, and the model
runs the reference and the fused MLA op (both designs) at the bench's tiny shape, in one chunk
and in chunks of samples."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench import memory_model as mm
from bench.test_mla import SMOKE as MLA_SMOKE


@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
def test_tracker_counts_a_known_pattern(fake):
    """Bytes rounded to 512, a freed temporary, a view, an in-place op and a pre-existing input."""
    with FakeTensorMode() if fake else torch.no_grad():
        x = torch.empty(64, 64)  # before the tracker: an input, never counted
        with mm.MemoryTracker() as tracker:
            a = torch.empty(1000)  # 4000 B -> 4096
            b = torch.empty(256, 1024, dtype=torch.bfloat16)  # 524288 B
            x.view(-1).add_(1)  # a view of an input, in place: nothing
            a.view(10, 100).mul_(2)  # nothing
            tmp = b * 2  # 524288 B, freed below: the peak
            peak_then = tracker.current
            del tmp
            c = torch.empty(100, dtype=torch.float32)  # 400 B -> 512
            d = x + 1  # 16384 B: a new tensor from an input
            live = tracker.live()
    assert peak_then == 4096 + 2 * 524288
    assert tracker.peak.bytes == 4096 + 2 * 524288
    assert sum(allocation.nbytes for allocation in live) == 4096 + 524288 + 512 + 16384
    assert tracker.current == 4096 + 524288 + 512 + 16384
    assert [allocation.nbytes for allocation in tracker.allocations] == [4096, 524288, 524288, 512, 16384]
    del a, b, c, d


def test_tracker_exact_bytes_and_frees_between_ops():
    with FakeTensorMode():
        with mm.MemoryTracker(granule=1) as tracker:
            kept = torch.empty(3, 5, dtype=torch.float16)  # 30 B
            for _ in range(3):
                scratch = torch.empty(7, dtype=torch.int64)  # 56 B, each freed when the next is bound
                scratch = scratch + 1  # a second 56 B while the first is alive
            del scratch
            tracker.sweep()
    assert tracker.peak.bytes == 30 + 56 + 56
    assert tracker.current == 30
    del kept


def test_autograd_subclass_paths_count_in_place():
    """Under a dispatch mode the max backward is ``zeros().scatter()``; eager CUDA does ``scatter_``."""
    with FakeTensorMode():
        x = torch.empty(64, 32, 16, requires_grad=True)
        with mm.MemoryTracker(granule=1) as tracker:
            tracker.phase = "forward"
            values, _ = x.max(dim=1)  # 4 KiB values + 8 KiB int64 indices
            tracker.phase = "backward"
            values.sum().backward()
    assert tracker.fixups == 1
    # values, indices, the sum, its ones_like, then one zeros block for the gradient (scattered in place)
    assert tracker.peak.bytes == 64 * 16 * (4 + 8) + 4 + 4 + 64 * 32 * 16 * 4


def _names(result: mm.Result) -> set[str]:
    return {allocation.site.name.split(" (")[0] for allocation in result.live_at_peak}


@pytest.mark.parametrize("provider", ["triton-hybrid", "triton-gemm"])
def test_fused_mla_tiny(provider):
    config = MLA_SMOKE[0]
    result = mm.model_case("mla_conv3d", config, provider)
    assert result.error is None, result.error
    assert set(result.fastgait_ops) == {"fastgait::cut_conv3d", "fastgait::cut_conv3d_backward"}
    assert result.launches > 0
    assert result.peak_phase == "backward"
    # What must be alive at the backward's peak: y, the gates, delta and dx (the hybrid's is the
    # vendor's dX, "dxs", in one chunk); gpre in the GEMM design (the hybrid frees it before the
    # delta terms, whose wgrad partial sums make the peak at this tiny shape).
    sizes = {allocation.site.name.split(" (")[0]: allocation.nbytes for allocation in result.live_at_peak}
    if "dxs" in sizes and "dx" not in sizes:
        sizes["dx"] = sizes["dxs"]
    assert {"y", "gates", "delta", "dx"} <= set(sizes)
    n, c_in, c_out, t, h, w = config.n, config.c_in, config.c_out, config.t, config.h, config.w
    bf16 = 2  # the bench's x (and so gpre, y, dx) in the autocast dtype
    if provider == "triton-gemm":
        assert sizes["gpre"] == mm.round_up(n * 2 * c_out * t * h * w * bf16)
    assert sizes["y"] == mm.round_up(n * c_out * t * h * w * bf16)
    assert sizes["gates"] == mm.round_up(n * 2 * -(-c_out // 4) * t * h * w)  # 2 bits a channel, packed
    assert sizes["delta"] == mm.round_up(n * 4 * t * w * c_out * bf16)
    assert sizes["dx"] == mm.round_up(n * c_in * t * h * w * bf16)


def test_reference_mla_tiny_and_replay():
    """The reference's peak is the hand count; the variants' replay of the engine is the engine."""
    config = MLA_SMOKE[0]
    reference = mm.model_case("mla_conv3d", config, "reference-eager")
    assert reference.error is None
    n, c_in, c_out, t, h, w = config.n, config.c_in, config.c_out, config.t, config.h, config.w
    out, masked, weight = (mm.round_up(size * 2) for size in (n * c_out * t * h * w, n * c_in * t * h * w, c_out * c_in * 27))
    # At the final add: 3 convolution outputs (kept for the LeakyReLU backward), the local sum, the
    # global LeakyReLU, the add's output, X*M0 and X*M1 (kept for the wgrad), two bf16 weight casts,
    # the two band masks (bf16, one granule each).
    assert (reference.peak_phase, reference.peak_op) == ("forward", "add")
    assert reference.peak_bytes == 6 * out + 2 * masked + 2 * weight + 2 * 512
    engine = mm.model_case("mla_conv3d", config, "triton-gemm")
    replay = mm.model_variant(config, "triton-gemm", "engine (allocation replay)")
    assert replay.peak_bytes == engine.peak_bytes
    packed = mm.model_variant(config, "triton-gemm", "B': 1-bit gates (the engine packs 2 bits)")
    assert packed.peak_bytes < engine.peak_bytes


@pytest.mark.parametrize("provider", ["triton-hybrid", "triton-gemm"])
def test_chunked_engine_lowers_the_peak(monkeypatch, provider):
    """The engine's launchers in chunks of samples (a tiny forced byte budget: one sample per
    chunk at the bench's tiny shape) peak lower than in one chunk, with a chunk-sized gpre."""
    from fastgait.ops import conv_engine

    config = MLA_SMOKE[0]
    assert config.n >= 2
    monkeypatch.setattr(conv_engine, "CHUNK_BYTES", 1 << 40)
    whole = mm.model_case("mla_conv3d", config, provider)
    monkeypatch.setattr(conv_engine, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_engine, "MIN_CHUNK_SAMPLES", 1)
    trackers = []

    class Tracker(mm.MemoryTracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trackers.append(self)

    monkeypatch.setattr(mm, "MemoryTracker", Tracker)
    chunked = mm.model_case("mla_conv3d", config, provider)
    assert whole.error is None and chunked.error is None, (whole.error, chunked.error)
    assert chunked.peak_bytes < whole.peak_bytes
    assert chunked.launches > whole.launches  # the kernels run once per chunk
    n, c_out, t, h, w = config.n, config.c_out, config.t, config.h, config.w
    gpre = [a.nbytes for a in trackers[-1].allocations if a.site.name.startswith("gpre ")]
    assert gpre == [mm.round_up(2 * c_out * t * h * w * 2)] * n, gpre  # one sample's per chunk, bf16
