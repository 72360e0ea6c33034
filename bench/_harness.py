"""The benchmark harness: how a case is timed, checked, counted and recorded.

Timing. pytest-benchmark runs every measurement (``benchmark.pedantic``: a ``setup`` that is
not timed, then the timed ``target``), and its timer is :func:`cuda_event_clock` on a GPU
(set per module with :data:`TIMED`): each reading records a CUDA event and waits for it, so a
round's duration is the GPU time between two events around the target (the events
``triton.testing.do_bench`` times with), and pytest-benchmark's own statistics (median,
quartiles) are event timings. ``setup`` rotates among several input sets (more bytes than the L2 cache
holds), so the cache is not what is measured, and prepares what a pass needs (the forward,
for a backward). Warm-up rounds come after compilation. Inputs are random, never zeros.

Modes (see :class:`Mode`): without ``--benchmark``, a smoke at tiny shapes (CI; not a
performance figure); with it on a GPU, the papers' shapes, written to ``bench/results``; with it
on a CPU (or with ``FASTGAIT_BENCH_SHRINK=1``), a dry run of the full path at tiny shapes.

Environment variables:
- ``FASTGAIT_BENCH_SHRINK=1``: tiny shapes even on a GPU (a dry run of the full path);
- ``FASTGAIT_BENCH_RESULTS=PATH``: write the results JSON there (any mode);
- ``FASTGAIT_BENCH_DEADLINE=EPOCH_S``: skip cases that would not finish before then
  (``bench/run_gpu.sh`` sets it to fit its 10 minutes);
- ``FASTGAIT_BENCH_COMPILE_BACKEND``: torch.compile backend (default ``inductor`` with
  ``--benchmark``, ``aot_eager`` in the smoke: tracing and autograd checked, no code generation);
- ``FASTGAIT_COMMIT``: the commit to record where the tree has no ``.git``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import fastgait.ops.mla as mla_module
from fastgait.ops import _autotune, conv_engine
from fastgait.testing import relative_error

from bench import _results

ROOT = Path(__file__).resolve().parent.parent
SMOKE_BANNER = "fastgait bench SMOKE at tiny shapes: NOT a performance figure (pytest bench --benchmark on a GPU measures)"
DRY_RUN_BANNER = "fastgait bench DRY RUN of the full path at tiny shapes: NOT a performance figure"

# Relative error allowed between a provider and the reference on the same inputs, by device and
# compute dtype: fp32 on a CPU (sums reassociated), fp32 with TF32 matrix products on a GPU (the
# trainer's setting; a triplet near the margin may flip), bf16 autocast. A wrong kernel is off by O(1).
TOLERANCE = {("cpu", torch.float32): 1e-4, ("cuda", torch.float32): 1e-2, ("cuda", torch.bfloat16): 2e-2}


# ---------------------------------------------------------------------------------------------
# The clock pytest-benchmark reads
# ---------------------------------------------------------------------------------------------


class _ClockState:
    last: Optional[torch.cuda.Event] = None
    seconds = 0.0


def cuda_event_clock() -> float:
    """Seconds of GPU time since the first reading: records a CUDA event on the current stream,
    waits for it, and adds the event-to-event interval (float64 sum of float32 intervals, each
    good to about 0.5 µs, so a difference of two readings is one event interval)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _ClockState.last is not None:
        _ClockState.seconds += _ClockState.last.elapsed_time(event) / 1e3
    _ClockState.last = event
    return _ClockState.seconds


DEVICE_CLOCK: Callable[[], float] = cuda_event_clock if torch.cuda.is_available() else time.perf_counter
TIMED = pytest.mark.benchmark(timer=DEVICE_CLOCK)  # ``pytestmark`` of the device-timed modules


# ---------------------------------------------------------------------------------------------
# Mode
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    benchmark: bool  # --benchmark: the full case list
    paper_shapes: bool  # the papers' shapes: --benchmark on a GPU, not shrunk
    device: torch.device
    compile_backend: str

    @classmethod
    def from_config(cls, config) -> "Mode":
        benchmark = bool(config.getoption("--benchmark"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shrink = os.environ.get("FASTGAIT_BENCH_SHRINK", "0") not in ("", "0")
        backend = os.environ.get("FASTGAIT_BENCH_COMPILE_BACKEND") or ("inductor" if benchmark else "aot_eager")
        return cls(benchmark, benchmark and device.type == "cuda" and not shrink, device, backend)

    @property
    def kind(self) -> str:
        return "gpu" if self.paper_shapes else "dry-run" if self.benchmark else "smoke"

    @property
    def banner(self) -> Optional[str]:
        return None if self.paper_shapes else DRY_RUN_BANNER if self.benchmark else SMOKE_BANNER

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the training step: bf16 autocast on a GPU, fp32 on a CPU
        (the Triton interpreter does no bf16 math)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def matrix(self) -> str:
        """The rate (``Work.matrix``) the matrix work of the step runs at."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def warmup_rounds(self) -> int:
        return 3 if self.paper_shapes else 1 if self.benchmark else 0

    def rounds(self, estimate_s: Optional[float]) -> int:
        """Enough rounds for about 0.3 s (10 to 100) at the papers' shapes; 2 in a dry run, 1 in the smoke."""
        if not self.paper_shapes:
            return 2 if self.benchmark else 1
        return int(min(100, max(10, math.ceil(0.3 / max(estimate_s or 0.0, 1e-6)))))

    def pick(self, paper: list, smoke: list, shrink: Callable[[Any], Any]) -> list:
        """The configs of this mode: the papers' (shrunk in a dry run) with --benchmark, else the smoke's."""
        if not self.benchmark:
            return smoke
        return paper if self.paper_shapes else [shrink(config) for config in paper]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

# Run order with --benchmark (lower first), so that what matters most is measured before a
# time budget runs out: the GaitMask step (the headline ratios), its per-kernel profile, the CASIA-B MLA blocks, GeM,
# triplet, the bare convolution forms, loaders, the other models' steps, the compiled references of GeM and triplet (their
# torch.compile took 73 s and 29 s on the first H200 run: they come after every eager row, whose
# targets are against the eager reference), the OUMVLP shapes.
PRIORITY = {"headline-step": 10, "profile": 15, "mla": 20, "gem": 30, "triplet": 40, "data": 50, "step": 60,
            "compiled-step": 70, "compiled-op": 75, "oumvlp": 80}
COMPILED = "reference-compiled"


@dataclass(frozen=True)
class Case:
    """One row to measure: ``config`` (a dataclass with ``name``) x ``provider`` x ``pass_``."""

    config: Any
    provider: str
    pass_: str
    priority: int = 0

    @property
    def id(self) -> str:
        return f"{self.config.name}|{self.provider}|{self.pass_}".replace(" ", "_")


def op_cases(configs: list, providers: tuple[str, ...], passes=("fwd", "bwd", "fwd+bwd"),
             compiled_priority: Optional[int] = None) -> list[Case]:
    """Config by config, pass by pass, the reference first: a row's baseline is measured before it.
    ``compiled_priority``: where the ``reference-compiled`` rows run instead (never before their config's)."""
    def priority(config, provider):
        if provider == COMPILED and compiled_priority is not None:
            return max(config.priority, compiled_priority)
        return config.priority

    return [
        Case(config, provider, pass_, priority(config, provider))
        for config in configs
        for pass_ in passes
        for provider in providers
    ]


# ---------------------------------------------------------------------------------------------
# Work: FLOPs and bytes, and the floor they give
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What a measured call must do. ``flops``: the useful (band-aware) count, the floor for
    every provider; ``executed``: what this provider computes (default ``flops``); ``bytes``:
    each input read once, each output written once; ``matrix``: the dtype of the matrix work."""

    flops: float
    bytes: float
    executed: Optional[float] = None
    matrix: str = "bf16"


def pass_work(pass_: str, fwd: Work, bwd: Work) -> Work:
    """The work of ``pass_`` (``fwd``, ``bwd`` or ``fwd+bwd``) from the forward's and the backward's."""
    if pass_ in ("fwd", "bwd"):
        return fwd if pass_ == "fwd" else bwd
    executed = [w.flops if w.executed is None else w.executed for w in (fwd, bwd)]
    return Work(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes, sum(executed), fwd.matrix)


def conv3d_flops(n: int, c_in: int, c_out: int, t: int, h: int, w: int, taps: int = 27) -> float:
    """One forward convolution: ``2 * N * C_in * C_out * taps * T * H * W`` (output positions)."""
    return 2.0 * n * c_in * c_out * taps * t * h * w


def floor_fields(work: Work, ceilings: dict, median_ms: Optional[float]) -> dict:
    """``floor_ms`` (the larger of FLOPs over the matrix rate and bytes over the copy
    bandwidth, both measured in this run), ``pct_floor`` and the achieved ``tflops``."""
    rate = ceilings[f"matmul_{work.matrix}_tflops"] * 1e12
    floor_ms = max(work.flops / rate, work.bytes / (ceilings["copy_gbps"] * 1e9)) * 1e3
    executed = work.flops if work.executed is None else work.executed
    return {
        "flops": work.flops,
        "flops_executed": executed,
        "bytes": work.bytes,
        "matrix_dtype": work.matrix,
        "floor_ms": floor_ms,
        "pct_floor": None if not median_ms else 100.0 * floor_ms / median_ms,
        "tflops": None if not median_ms else executed / (median_ms * 1e-3) / 1e12,
    }


def _median_seconds(fn: Callable[[], Any], clock: Callable[[], float], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, clock: Callable[[], float]) -> dict:
    """The two rates of the floor, measured once per run: a large matrix product in bf16 and in
    fp32 (TF32 allowed, as the trainer sets it) and a large device-to-device copy (bytes read
    plus written). Random operands, never zeros."""
    gen = torch.Generator(device=device).manual_seed(0)
    size, copy_bytes, reps = (8192, 1 << 30, 10) if device.type == "cuda" else (256, 8 << 20, 3)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if device.type == "cpu" and dtype == torch.bfloat16:
            continue
        a = torch.randn(size, size, device=device, generator=gen).to(dtype)
        b = torch.randn(size, size, device=device, generator=gen).to(dtype)
        seconds = _median_seconds(lambda: a @ b, clock, reps, warmup=3)
        out[f"matmul_{name}_tflops"] = 2.0 * size**3 / seconds / 1e12
    if "matmul_bf16_tflops" not in out:  # CPU: the fp32 rate stands for both
        out["matmul_bf16_tflops"] = out["matmul_fp32_tflops"]
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), clock, reps, warmup=3)
    out["copy_gbps"] = 2.0 * copy_bytes / seconds / 1e9
    out["matmul_size"], out["copy_bytes"] = size, copy_bytes
    return out


# ---------------------------------------------------------------------------------------------
# Environment and the results file
# ---------------------------------------------------------------------------------------------


def _command(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def source_digest() -> str:
    """sha256 over the library, kernel and bench sources: names the code where no commit can."""
    digest = hashlib.sha256()
    for folder in ("fastgait", "kernels", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("FASTGAIT_COMMIT") or _command("git", "rev-parse", "HEAD")
    status = _command("git", "status", "--porcelain")
    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "source_digest": source_digest(),
        "mla_default_design": getattr(mla_module, "DEFAULT_DESIGN", None),
        "conv_design_override": os.environ.get(conv_engine.DESIGN_ENV) or None,
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        env.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            driver=driver.splitlines()[0] if driver else None,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def results_path(mode: Mode, env: dict) -> Optional[Path]:
    """Where this run's rows go: ``FASTGAIT_BENCH_RESULTS``, else ``bench/results/<date>-<gpu>.json``
    at the papers' shapes, else nowhere (smoke and dry-run rows are no measurements)."""
    if os.environ.get("FASTGAIT_BENCH_RESULTS"):
        return Path(os.environ["FASTGAIT_BENCH_RESULTS"])
    if not mode.paper_shapes:
        return None
    return _results.RESULTS_DIR / f"{env['date']}-{_results.slug(env['gpu'])}.json"


class Recorder:
    """The rows of this run, rewritten to the results file after every row (a run cut short
    keeps what it measured). A file of the same date and GPU from the same code is extended
    (a later row replaces an earlier one of the same op/config/provider/pass); from other code,
    the new run goes to a new file beside it."""

    def __init__(self, mode: Mode, path: Optional[Path], run: dict, env: dict):
        self.path = path
        self.run = run
        self.data = {"schema": _results.SCHEMA, "kind": mode.kind, "environment": env, "runs": [run], "rows": []}
        if path is None or not path.exists():
            return
        previous = _results.load(path)
        if previous["environment"].get("source_digest") == env["source_digest"] and previous["kind"] == mode.kind:
            self.data["runs"] = previous["runs"] + [run]
            self.data["rows"] = previous["rows"]
            return
        number = 2
        while path.with_name(f"{path.stem}-{number}.json").exists():
            number += 1
        self.path = path.with_name(f"{path.stem}-{number}.json")

    @property
    def rows(self) -> list[dict]:
        return [row for row in self.data["rows"] if row["run"] == self.run["id"]]

    def add_profile(self, name: str, profile: dict) -> None:
        """A per-kernel profile (``bench/test_profile.py``), kept beside the rows under ``profiles``."""
        self.data.setdefault("profiles", {})[name] = {"run": self.run["id"], **profile}
        if self.path is not None:
            _results.save(self.path, self.data)

    def add(self, row: dict) -> dict:
        key = _results.row_key(row)[1:]
        self.data["rows"] = [old for old in self.data["rows"] if _results.row_key(old)[1:] != key] + [row]
        _results.finalise(self.data["rows"])
        if self.path is not None:
            _results.save(self.path, self.data)
        return row


# ---------------------------------------------------------------------------------------------
# The session: caches, compile, timing, recording
# ---------------------------------------------------------------------------------------------


class _LastOnly:
    """A one-entry cache: cases run config by config, so one config's tensors are kept at a time."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make: Callable[[], Any]):
        if key != self.key:
            self.key, self.value = None, None  # free the old entry before making the new one
            self.value, self.key = make(), key
        return self.value


@dataclass
class Bench:
    """Session state shared by the bench tests (the ``bench`` fixture)."""

    mode: Mode
    recorder: Recorder
    clock: Callable[[], float] = DEVICE_CLOCK
    compiled: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)
    inputs: _LastOnly = field(default_factory=_LastOnly)
    references: _LastOnly = field(default_factory=_LastOnly)
    _ceilings: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return self.mode.device

    @property
    def ceilings(self) -> dict:
        if self._ceilings is None:
            self._ceilings = measure_ceilings(self.device, self.clock)
            self.recorder.run["ceilings"] = self._ceilings
        return self._ceilings

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def require_time(self, seconds: float) -> None:
        """Skip the case if fewer than ``seconds`` are left before ``FASTGAIT_BENCH_DEADLINE``."""
        deadline = os.environ.get("FASTGAIT_BENCH_DEADLINE")
        if deadline:
            left = float(deadline) - time.time()
            if left < seconds:
                pytest.skip(f"time budget: {left:.0f} s left before FASTGAIT_BENCH_DEADLINE, this case needs ~{seconds:.0f} s")

    def compile(self, fn: Callable, key=None) -> Callable:
        """``torch.compile(fn)`` with static shapes and this mode's backend; once per ``key`` if given."""
        if key is None:
            return torch.compile(fn, backend=self.mode.compile_backend, dynamic=False)
        if key not in self.compiled:
            self.compiled[key] = self.compile(fn)
        return self.compiled[key]

    def rotation(self, key, make_set: Callable[[int], dict]) -> list[dict]:
        """Input sets (``make_set(seed)``) to rotate among, kept for the cases of one config:
        enough that together they are three times the L2 cache (2 to 16 sets, at most a tenth
        of the GPU memory); 2 on a CPU."""
        return self.inputs.get(key, lambda: self._input_sets(make_set))

    def _input_sets(self, make_set: Callable[[int], dict]) -> list[dict]:
        first = make_set(0)
        count = 2
        if self.device.type == "cuda":
            set_bytes = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
            props = torch.cuda.get_device_properties(self.device)
            l2 = getattr(props, "L2_cache_size", 0) or 64 << 20
            count = max(2, min(16, math.ceil(3 * l2 / set_bytes), int(props.total_memory / 10 // set_bytes)))
        return [first] + [make_set(seed) for seed in range(1, count)]

    def rotating(self, sets: list[dict], prepare: Callable[[dict], tuple]) -> Callable[[], tuple]:
        """A pedantic ``setup``: the next set, through ``prepare(set) -> args`` (not timed)."""
        turn = iter(range(sys.maxsize))

        def setup():
            return prepare(sets[next(turn) % len(sets)]), {}

        return setup

    def measure(self, benchmark, target: Callable, setup: Callable[[], tuple], rounds: Optional[int] = None,
                warmup_rounds: Optional[int] = None, memory: bool = True) -> dict:
        """Time ``target`` through pytest-benchmark (``rounds``: default by :meth:`Mode.rounds`);
        then, with ``memory``, its peak memory in one more call."""
        if rounds is None:
            estimate = None
            if self.mode.paper_shapes:  # one call (also a warm-up) sizes the number of rounds
                args, kwargs = setup()
                start = self.clock()
                target(*args, **kwargs)
                estimate = self.clock() - start
                del args, kwargs
            rounds = self.mode.rounds(estimate)
        warmup_rounds = self.mode.warmup_rounds if warmup_rounds is None else warmup_rounds
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
        times: dict = {"rounds": rounds, "warmup_rounds": warmup_rounds}
        if benchmark.stats is not None:  # None under --benchmark-disable
            stats = benchmark.stats.stats
            times.update({f"{name}_ms": getattr(stats, name) * 1e3 for name in ("median", "mean", "min", "max", "q1", "q3")})
        if memory:
            times.update(self.peak_memory(target, setup))
        return times

    def peak_memory(self, target: Callable, setup: Callable[[], tuple]) -> dict:
        """``torch.cuda.max_memory_allocated`` over one call after ``reset_peak_memory_stats``:
        total, and above what was allocated before the call (inputs and saved tensors)."""
        if self.device.type != "cuda":
            return {"peak_mem_bytes": None, "peak_mem_total_bytes": None}
        args, kwargs = setup()
        self.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = target(*args, **kwargs)
        self.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del result, args, kwargs
        return {"peak_mem_bytes": peak - before, "peak_mem_total_bytes": peak}

    def record(self, benchmark, case: Case, op: str, times: dict, work: Optional[Work], **fields) -> dict:
        """One row: identity, times, memory, work and floor, ``fields``; also into ``extra_info``."""
        floor = {} if work is None else floor_fields(work, self.ceilings, times.get("median_ms"))
        row = {
            "run": self.recorder.run["id"],
            "op": op,
            "config": case.config.name,
            "provider": case.provider,
            "pass": case.pass_,
            "dtype": str(self.mode.dtype).replace("torch.", ""),
            "performance_figure": self.mode.paper_shapes,
            **times,
            **floor,
            **fields,
        }
        assert benchmark.disabled or (row.get("median_ms") or 0) > 0, f"{case.id}: no time was recorded"
        self.recorder.add(row)
        benchmark.extra_info.update(row)
        return row

    def group(self, benchmark, *names: str) -> None:
        """pytest-benchmark's table groups rows that compare; the smoke says it is one."""
        prefix = "" if self.mode.paper_shapes else "NOT A PERFORMANCE FIGURE: "
        benchmark.group = prefix + " | ".join(names)


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(relative_error(a.float(), e.float()) for a, e in zip(actual, expected))


# ---------------------------------------------------------------------------------------------
# Fused ops: one flow for mla_conv3d, gem_hpp and triplet_loss
# ---------------------------------------------------------------------------------------------


class OpBench:
    """What a fused op's bench module supplies; :func:`run_op_case` does the rest.

    ``inputs(bench, config, seed)`` returns one input set: a dict of tensors (the leaves that get
    gradients have ``requires_grad``) with ``"grad_out"``, the upstream gradient (random, in the
    output's dtype and layout). ``forward(bench, provider, config)`` returns
    ``fn(inputs) -> output`` (or skips). ``autocast``: whether the op runs inside the training
    step's autocast region (the triplet loss does not: the trainer feeds it fp32 embeddings).
    """

    op: str = ""
    reference: str = "reference-eager"
    autocast: bool = True

    def inputs(self, bench: Bench, config, seed: int) -> dict:
        raise NotImplementedError

    def forward(self, bench: Bench, provider: str, config) -> Callable[[dict], torch.Tensor]:
        raise NotImplementedError

    def work(self, bench: Bench, config, provider: str, pass_: str) -> Work:
        raise NotImplementedError

    def context(self, bench: Bench):
        return bench.mode.autocast() if self.autocast else contextlib.nullcontext()

    def dtype(self, bench: Bench) -> torch.dtype:
        return bench.mode.dtype if self.autocast else torch.float32


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _clear_grads(inputs: dict) -> None:
    for leaf in _leaves(inputs):
        leaf.grad = None


def _forward_backward(bench: Bench, spec: OpBench, fn: Callable, inputs: dict) -> list[torch.Tensor]:
    """Output and every leaf's gradient, detached: what two providers must agree on."""
    _clear_grads(inputs)
    with spec.context(bench):
        out = fn(inputs)
    torch.autograd.backward(out, inputs["grad_out"])
    return [out.detach()] + [leaf.grad.detach().clone() for leaf in _leaves(inputs)]


def design_choices(used: dict) -> Optional[list[dict]]:
    """What the row-cut engine's ``design="auto"`` chose in a case (``_autotune.usage()``), as a row
    field: one entry per shape and direction, with the timings it chose by; None if it was not used."""
    return conv_engine.design_choices(used) or None


def run_op_case(benchmark, bench: Bench, spec: OpBench, case: Case) -> dict:
    """Check the provider against the reference on the same inputs, then time the pass; the row
    records the designs ``design="auto"`` chose (``design_choices``)."""
    with _autotune.usage() as used:
        return _run_op_case(benchmark, bench, spec, case, used)


def _run_op_case(benchmark, bench: Bench, spec: OpBench, case: Case, used: dict) -> dict:
    config, provider, pass_ = case.config, case.provider, case.pass_
    compiled = provider.endswith("-compiled")
    key = (spec.op, config.name, provider)
    bench.require_time(60 if compiled and key not in bench.checked else 15)
    bench.group(benchmark, spec.op, config.name, pass_)
    fn = spec.forward(bench, provider, config)
    sets = bench.rotation((spec.op, config.name), lambda seed: spec.inputs(bench, config, seed))

    if key not in bench.checked:  # once per provider and config, whatever the pass
        start = time.perf_counter()
        got = _forward_backward(bench, spec, fn, sets[0])
        bench.synchronize()
        first_call_s = time.perf_counter() - start
        reference_fn = spec.forward(bench, spec.reference, config)
        want = bench.references.get(
            (spec.op, config.name), lambda: _forward_backward(bench, spec, reference_fn, sets[0])
        )
        bench.checked[key] = (max_relative_error(got, want), first_call_s if compiled else None)
        del got
    error, compile_s = bench.checked[key]
    tolerance = TOLERANCE[(bench.device.type, spec.dtype(bench))]
    assert error <= tolerance, f"{spec.op} {provider} disagrees with the reference: relative error {error:.2e} > {tolerance:.0e}"

    def fwd(inputs):
        with spec.context(bench):
            return fn(inputs)

    def fresh(inputs):
        _clear_grads(inputs)
        return (inputs,)

    def after_forward(inputs):
        _clear_grads(inputs)
        return fwd(inputs), inputs["grad_out"]

    def fwd_bwd(inputs):
        torch.autograd.backward(fwd(inputs), inputs["grad_out"])

    target, prepare = {
        "fwd": (fwd, fresh),
        "bwd": (torch.autograd.backward, after_forward),
        "fwd+bwd": (fwd_bwd, fresh),
    }[pass_]
    times = bench.measure(benchmark, target, bench.rotating(sets, prepare))
    row = bench.record(
        benchmark, case, spec.op, times, spec.work(bench, config, provider, pass_),
        shape=config.shape(), dtype=str(spec.dtype(bench)).replace("torch.", ""), rel_error=error, compile_s=compile_s,
        design_choices=design_choices(used),
    )
    for leftover in sets:
        _clear_grads(leftover)
    return row


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs PyTorch's own counter sees in ``fn()`` (convolutions and matrix products, forward
    and backward): used to count whole training steps, and to check the hand counts."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
