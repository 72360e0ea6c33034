"""``fastgait.ops._autotune.Chooser`` with an injected fake timer (no GPU needed), and how the
row-cut engine's ``design="auto"`` resolves on a CPU."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from fastgait.ops import _autotune, conv_engine
from fastgait.ops._autotune import Chooser

CUDA = torch.device("cuda")  # only compared with: nothing runs on it here
CPU = torch.device("cpu")
ENV = "FASTGAIT_TEST_DESIGN"


class FakeTimer:
    """``ms`` per candidate; each call runs ``fn`` (which returns the candidate's name) and counts."""

    def __init__(self, ms: dict):
        self.ms = ms
        self.calls: list[str] = []

    def __call__(self, fn, device):
        name = fn()
        self.calls.append(name)
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return self.ms[name]


def cuda_only(device):
    """Timing is possible on (pretend) CUDA devices, not while capturing (never, here)."""
    return None if device.type == "cuda" else "not on CUDA"


def make(timer, *, store=None, context=lambda: "", why=cuda_only):
    return Chooser("cut_conv3d", ("hybrid", "gemm"), "hybrid", env_var=ENV, timer=timer, store=store,
                   context=context, why_not_timed=why)


def run(candidate):
    return candidate  # a candidate's "output": its name


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("FASTGAIT_CACHE", raising=False)


def test_picks_the_fastest_caches_it_and_logs_once(caplog):
    timer = FakeTimer({"hybrid": 2.0, "gemm": 1.5})
    chooser = make(timer)
    with caplog.at_level(logging.INFO, logger="fastgait.ops._autotune"):
        assert chooser.choose(("fwd", (2, 3)), run, CUDA) == "gemm"
        assert chooser.choose(("fwd", (2, 3)), run, CUDA) == "gemm"
    assert timer.calls == ["hybrid", "gemm"], "each candidate timed once, then the cache answers"
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "gemm" in logged[0] and "hybrid 2.000 ms" in logged[0] and "gemm 1.500 ms" in logged[0]
    (choice,) = chooser.choices().values()
    assert choice.timings_ms == {"hybrid": 2.0, "gemm": 1.5} and choice.how == "timed"

    timer.ms = {"hybrid": 1.0, "gemm": 3.0}  # another key is timed on its own
    assert chooser.choose(("bwd", (2, 3)), run, CUDA) == "hybrid"
    assert chooser.choose(("fwd", (2, 3)), run, CUDA) == "gemm"
    assert timer.calls == ["hybrid", "gemm", "hybrid", "gemm"]


def test_a_tie_keeps_the_candidates_order():
    assert make(FakeTimer({"hybrid": 1.0, "gemm": 1.0})).choose(("k",), run, CUDA) == "hybrid"


def test_env_override(monkeypatch):
    timer = FakeTimer({"hybrid": 2.0, "gemm": 1.0})
    chooser = make(timer)
    monkeypatch.setenv(ENV, "hybrid")
    assert chooser.choose(("k",), run, CUDA) == "hybrid"
    assert timer.calls == [], "a forced design is not timed"
    monkeypatch.setenv(ENV, "auto")
    assert chooser.choose(("k",), run, CUDA) == "gemm"
    monkeypatch.setenv(ENV, "gemm")
    assert chooser.choose(("other",), run, CPU) == "gemm", "the override also holds off CUDA"
    monkeypatch.setenv(ENV, "cudnn")
    with pytest.raises(ValueError) as error:
        chooser.choose(("k",), run, CUDA)
    assert str(error.value) == f"{ENV}='cudnn': must be one of auto, hybrid, gemm"


def test_off_cuda_the_fallback_untimed_and_uncached():
    timer = FakeTimer({"hybrid": 2.0, "gemm": 1.0})
    chooser = make(timer)
    with _autotune.usage() as used:
        assert chooser.choose(("k",), run, CPU) == "hybrid"
    assert timer.calls == [] and chooser.choices() == {}
    assert used[("k",)].how == "not on CUDA" and used[("k",)].timings_ms is None


def test_no_timing_during_cuda_graph_capture(monkeypatch):
    """The default ``why_not_timed``: during capture the fallback (or a choice made before)."""
    timer = FakeTimer({"hybrid": 2.0, "gemm": 1.0})
    chooser = make(timer, why=_autotune.why_not_timed)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert chooser.choose(("k",), run, CUDA) == "hybrid"
    assert timer.calls == [] and chooser.choices() == {}, "nothing timed or cached while capturing"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert chooser.choose(("k",), run, CUDA) == "gemm"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert chooser.choose(("k",), run, CUDA) == "gemm", "a choice made before the capture is used"
    assert timer.calls == ["hybrid", "gemm"]
    assert _autotune.why_not_timed(CPU) == "not on CUDA"


def test_a_candidate_that_fails_is_not_chosen(caplog):
    chooser = make(FakeTimer({"hybrid": 2.0, "gemm": RuntimeError("out of resources")}))
    with caplog.at_level(logging.WARNING, logger="fastgait.ops._autotune"):
        assert chooser.choose(("k",), run, CUDA) == "hybrid"
    assert any("out of resources" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="broken"):  # the fallback failing is an error
        make(FakeTimer({"hybrid": RuntimeError("broken"), "gemm": 1.0})).choose(("k",), run, CUDA)


def test_choices_persist_under_fastgait_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGAIT_CACHE", str(tmp_path))
    key = ("fwd", (2, 3, 4), "bfloat16", True)
    first = make(FakeTimer({"hybrid": 2.0, "gemm": 1.0}), store="engine", context=lambda: "v1")
    assert first.choose(key, run, CUDA) == "gemm"
    path = tmp_path / "autotune" / "engine.json"
    assert len(json.loads(path.read_text())) == 1
    assert not list(path.parent.glob("*.tmp")), "written through a temporary file, then replaced"

    timer = FakeTimer({"hybrid": 1.0, "gemm": 2.0})
    second = make(timer, store="engine", context=lambda: "v1")
    assert second.choose(key, run, CUDA) == "gemm" and timer.calls == [], "read back, not timed again"
    assert second.choices()[key].how == "cached"
    other_code = make(timer, store="engine", context=lambda: "v2")
    assert other_code.choose(key, run, CUDA) == "hybrid" and timer.calls == ["hybrid", "gemm"]


# ----------------------------------------------------------------------------------------
# The engine's "auto" on a CPU
# ----------------------------------------------------------------------------------------


def test_engine_designs():
    assert conv_engine.DEFAULT_DESIGN == "auto"
    assert conv_engine.DESIGN_CHOICES == ("auto", "hybrid", "hybrid2d", "gemm")
    assert conv_engine.CHOOSER.candidates == conv_engine.DESIGNS
    assert conv_engine.CHOOSER.fallback == conv_engine.FALLBACK_DESIGN
    assert conv_engine.CHOOSER.env_var == conv_engine.DESIGN_ENV == "FASTGAIT_CONV_DESIGN"
    # persisted choices are reused only with the same engine and kernel sources
    assert conv_engine.CHOOSER.context() == conv_engine._sources_digest() and len(conv_engine._sources_digest()) == 16


def test_engine_auto_on_cpu_is_the_fallback_untimed(monkeypatch):
    monkeypatch.delenv(conv_engine.DESIGN_ENV, raising=False)
    x = torch.randn(1, 2, 2, 5, 3)
    weight = torch.randn(3, 2, 3, 3, 3)
    cuts = conv_engine.Cuts("strips", 2)

    def never(*args):
        raise AssertionError("timed on a CPU")

    monkeypatch.setattr(conv_engine.CHOOSER, "timer", never)
    with _autotune.usage() as used:
        design = conv_engine.resolve_design("auto", "fwd", never, x, weight, weight, cuts, "add", "rest")
    assert design == conv_engine.FALLBACK_DESIGN
    (row,) = conv_engine.design_choices(used)
    assert row["direction"] == "fwd" and row["x_shape"] == [1, 2, 2, 5, 3] and row["geometry"] == "strips"
    assert row["choice"] == "hybrid" and row["how"] == "not on CUDA" and row["device"] == "cpu"
    monkeypatch.setenv(conv_engine.DESIGN_ENV, "gemm")
    assert conv_engine.resolve_design("auto", "bwd", never, x, weight, weight, cuts, "add", "rest") == "gemm"
    assert conv_engine.resolve_design("hybrid", "bwd", never, x, weight, weight, cuts, "add", "rest") == "hybrid", \
        "an explicit design is obeyed whatever the environment says"
    with pytest.raises(ValueError, match="design must be one of"):
        conv_engine.resolve_design("cudnn", "bwd", never, x, weight, weight, cuts, "add", "rest")
