"""A device-free model of an op's peak GPU memory in fwd+bwd (``python -m bench.memory_model``).

What it models: the ``peak_mem_bytes`` column of the bench (``bench._harness.Bench.peak_memory``):
``torch.cuda.max_memory_allocated()`` over one fwd+bwd call minus what was allocated before it
(the input set: ``x``, the weights, ``grad_out``; leaf gradients cleared first), with the bench's
own inputs (``bench/test_*.py``: shapes, dtypes, channels-last-3d) under bf16 autocast.

How: the call runs on fake tensors (``FakeTensorMode``: shapes, strides, dtypes, no data) on the
CPU device under ``torch.autocast("cpu", bfloat16)``, with the launchers' GPU choices forced
(``fastgait.ops._dispatch.force_gpu_choices``) and every ``fastgait::`` custom op replaced by its
real launcher with Triton launches recorded instead of run (the compile gate's machinery,
``fastgait.compile_gate.capture``). A :class:`MemoryTracker` (a ``TorchDispatchMode`` below the
launcher interception, so it sees the launchers' own allocations) adds every new output storage's
bytes when an ATen op creates it and takes them off when the storage dies (a weak reference to the
storage, polled at every op: a free between two ops is seen before the next allocation, which is
when a peak can be reached). Every allocation is rounded up to 512 bytes as the CUDA caching
allocator does, and named after the line of fastgait code that made it (``gpre``, ``y``, ...) or,
outside fastgait code, the autograd engine's ATen op.

What it does not see (say so next to any figure): vendor workspaces (cuDNN convolution and cuBLAS
workspaces are allocated inside the vendor call, not by an ATen op: the eager reference's three
convolutions and the hybrid design's vendor convolution and its backward allocate them on a
GPU); the caching allocator's block slack (a reused block up to 1 MiB larger than asked for, a new
large segment rounded to 2 MiB, counted whole when the rest is under 1 MiB); CUDA-only autocast
rules (the CPU autocast lists are used: both put convolutions in bf16 and leave the rest of these
ops alone). Model numbers are not measurements.

The fused ops' real launchers run under the model, so its "engine" rows are the engine as it is:
no materialized zero gradient for the gates, and the batch in chunks of samples
(``fastgait.ops.conv_engine.CHUNK_BYTES``; patch that constant to model other chunk sizes).
Model-only variants (:data:`VARIANTS`) replace the engine's launchers *in the model* by
allocation-only prototypes (the engine's own sequence as a check, other chunk sizes, bit-packed
gates, no gpre): they quantify options; nothing in the engine changes.
"""
from __future__ import annotations

import argparse
import contextlib
import linecache
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
MIB = float(1 << 20)
ROUND_BYTES = 512  # the CUDA caching allocator's granule
NOT_VISIBLE = ("vendor workspaces (cuDNN/cuBLAS) are not visible to the model, nor the caching "
               "allocator's block slack (<= 2 MiB per large block)")

# The first H200 run (shared/measurements/2026-11-30-nvidia-h200.json, engine of commit e0705a9),
# fwd+bwd peak_mem_bytes (above the inputs), by (op, config, provider).
H200_MEASURED = {
    ("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "reference-eager"): 3229868032,
    ("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "torch"): 3460743168,
    ("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "triton-hybrid"): 2575900672,
    ("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "triton-gemm"): 2575900672,
    ("mla_conv3d", "casia-b MLA-A 64-128 10x32x22", "reference-eager"): 1615708160,
    ("mla_conv3d", "casia-b MLA-A 64-128 10x32x22", "torch"): 1731919872,
    ("mla_conv3d", "casia-b MLA-A 64-128 10x32x22", "triton-hybrid"): 1310883840,
    ("mla_conv3d", "casia-b MLA-A 64-128 10x32x22", "triton-gemm"): 1310883840,
    ("mla_conv3d", "casia-b MLA-B 128-128 10x32x22", "reference-eager"): 2077966336,
    ("mla_conv3d", "casia-b MLA-B 128-128 10x32x22", "torch"): 2079719424,
    ("mla_conv3d", "casia-b MLA-B 128-128 10x32x22", "triton-hybrid"): 1663107584,
    ("mla_conv3d", "casia-b MLA-B 128-128 10x32x22", "triton-gemm"): 1661337600,
    ("gem_hpp", "casia-b GaitMask 128x10x64x22", "reference-eager"): 977274880,
    ("gem_hpp", "casia-b GaitMask 128x10x64x22", "triton"): 656417792,
    ("gem_hpp", "casia-b GaitGL 128x10x32x22", "reference-eager"): 488638464,
    ("gem_hpp", "casia-b GaitGL 128x10x32x22", "triton"): 328213504,
    ("triplet_loss", "casia-b 8x16 c128 p64", "reference-eager"): 266885120,
    ("triplet_loss", "casia-b 8x16 c128 p64", "triton"): 20975616,
    ("triplet_loss", "32x8 c128 p64", "reference-eager"): 621467648,
    ("triplet_loss", "32x8 c128 p64", "triton"): 75503616,
    ("triplet_loss", "oumvlp 32x8 c256 p64", "reference-eager"): 621467648,
    ("triplet_loss", "oumvlp 32x8 c256 p64", "triton"): 83892224,
}


def round_up(nbytes: int, granule: int = ROUND_BYTES) -> int:
    """Bytes the caching allocator counts for a request (at least one granule)."""
    return max(granule, -(-nbytes // granule) * granule) if granule > 1 else nbytes


# ---------------------------------------------------------------------------------------------
# Naming an allocation after the code that made it
# ---------------------------------------------------------------------------------------------

# Frames that only forward an allocation (their caller's line names it better).
_PASS_THROUGH = {"empty", "empty_like", "_fill", "empty_in_layout", "_empty_activation", "_slot_rows"}
_SELF = Path(__file__).resolve()
_SKIP_FILES = {_SELF, (ROOT / "bench" / "_harness.py").resolve()}
_VARIANT_FRAMES = {"forward", "backward", "_wgrad_partial"}
_ASSIGN = re.compile(r"^\s*((?:[A-Za-z_][\w.]*(?:\[[^\]=]*\])?\s*,\s*)*[A-Za-z_][\w.]*(?:\[[^\]=]*\])?)\s*(\+=|-=|\*=|=)(?!=)")
# Lines that allocate without naming what they allocate.
_ALIASES = {
    ("_forward_outputs", "return y, _empty_activation"): "gates",
    ("_wgrad", "return partial.sum(0)"): "wgrad partial.sum",
    ("_backward", "return dx, dweight.to("): "dweight (to weight dtype)",
    ("backward", "return dx, dweight.to("): "dweight (to weight dtype)",
    ("_wgrad_partial", "return torch.empty("): "partial",
}


@dataclass(frozen=True)
class Site:
    """Where an allocation was made: a short name and the code path (repo frames, outermost first)."""

    name: str
    where: str


def _repo_frames() -> list:
    """Frames of the project's code (fastgait/, bench/ test modules), innermost first."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        try:
            resolved = path.resolve()
        except OSError:
            resolved = path
        if resolved not in _SKIP_FILES and (ROOT / "fastgait") in resolved.parents:
            frames.append(frame)
        elif resolved == _SELF and frame.f_code.co_name in _VARIANT_FRAMES:  # the model-only prototypes
            frames.append(frame)
        frame = frame.f_back
    return frames


def site_of(func, index: int, count: int, phase: str) -> Site:
    """Name the ``index``-th of ``count`` tensor outputs of ``func`` by the fastgait line that made it."""
    op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    frames = [f for f in _repo_frames() if f.f_code.co_name not in _PASS_THROUGH]
    if not frames:  # made by the autograd engine (AccumulateGrad, materialized zero grads, ...) or autocast
        suffix = f"[{index}]" if count > 1 else ""
        if phase == "backward" and op in ("zeros", "zeros_like", "new_zeros"):
            return Site(f"zero gradient of an output, materialized by autograd (aten.{op}, no fastgait frame)",
                        f"aten.{op}")
        return Site(f"{phase}: aten.{op}{suffix} (autograd/autocast, no fastgait frame)", f"aten.{op}")
    inner = frames[0]
    code = inner.f_code
    line = linecache.getline(code.co_filename, inner.f_lineno).strip()
    chain = " > ".join(f.f_code.co_name for f in reversed(frames[:3]))
    rel = Path(code.co_filename).resolve().relative_to(ROOT)
    where = f"{rel}:{inner.f_lineno} {chain}"
    for (function, prefix), alias in _ALIASES.items():
        if code.co_name == function and line.startswith(prefix):
            return Site(alias, where)
    match = _ASSIGN.match(line)
    if match:
        targets = [t.strip() for t in match.group(1).split(",")]
        if len(targets) == count and count > 1:
            name = targets[index]
        elif len(targets) == 1:
            name = targets[0] + (f"[{index}]" if count > 1 else "")
        else:  # e.g. ``a, b = f(), g()``: one of them
            name = " or ".join(targets)
        if match.group(2) != "=":
            name += f" {match.group(2)} (temporary)"
        return Site(f"{name} ({op})", where)
    return Site(f"{code.co_name}: {op}" + (f"[{index}]" if count > 1 else ""), where)


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------


@dataclass
class Allocation:
    seq: int
    nbytes: int  # rounded to the allocator granule
    site: Site
    phase: str
    op: str
    shape: tuple
    dtype: str


@dataclass
class Snapshot:
    """The live allocations when the peak was reached."""

    bytes: int
    seq: int
    phase: str
    op: str
    live: list  # [Allocation]


_SUBCLASS_OUT_OF_PLACE = {"scatter", "scatter_add", "scatter_reduce", "index_put", "_index_put_impl", "index_add",
                          "index_copy", "index_fill", "masked_scatter", "masked_fill", "slice_scatter",
                          "select_scatter", "diagonal_scatter", "as_strided_scatter"}
_ZEROS_OPS = {"zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full", "empty", "empty_like", "new_empty"}


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the storages ATen ops create while this mode is on (fake or real tensors).

    Storages that existed before (the inputs) are never counted, nor views, nor in-place
    results: an output counts when its storage is neither live-tracked nor one of the op's inputs'.
    ``weights`` (a function of an :class:`Allocation` giving a byte count) re-weighs allocations
    for what-if questions (e.g. 1 bit per gate): it applies when an allocation is made.
    """

    def __init__(self, granule: int = ROUND_BYTES, name_sites: bool = True,
                 weights: Optional[Callable[[Allocation], int]] = None, fix_subclass_paths: bool = True):
        super().__init__()
        self.granule = granule
        self.name_sites = name_sites
        self.weights = weights
        self.phase = "forward"
        self.current = 0
        self.peak = Snapshot(0, -1, "", "", [])
        self.allocations: list[Allocation] = []
        self.timeline: list[tuple[int, str, int]] = []  # (seq, phase, live bytes) after each allocation
        self._live: dict[int, tuple[StorageWeakRef, Allocation]] = {}
        self._seq = 0
        self.fix_subclass_paths = fix_subclass_paths
        self.fixups = 0  # ops counted in place (see _inplace_on_gpu)

    # -- bookkeeping -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Take off the storages that died since the last op."""
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            _, allocation = self._live.pop(key)
            self.current -= allocation.nbytes

    def live(self) -> list[Allocation]:
        self.sweep()
        return [allocation for _, allocation in self._live.values()]

    def observe(self, func, args, kwargs, out) -> None:
        self.sweep()
        inputs = set()
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor):
                with contextlib.suppress(Exception):
                    inputs.add(value.untyped_storage()._cdata)
        leaves = tree_flatten(out)[0]  # with the Nones, so that an index matches ``a, b, _ = op(...)``
        added = False
        for index, tensor in enumerate(leaves):
            if not isinstance(tensor, torch.Tensor):
                continue
            try:
                storage = tensor.untyped_storage()
            except Exception:  # noqa: BLE001 - storage-less tensors (sparse, nested) own no plain block
                continue
            key = storage._cdata
            if key in self._live or key in inputs:
                continue
            op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
            site = site_of(func, index, len(leaves), self.phase) if self.name_sites else Site(op, op)
            allocation = Allocation(self._seq, round_up(storage.nbytes(), self.granule), site, self.phase, op,
                                    tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
            if self.weights is not None:
                weighed = int(self.weights(allocation))
                allocation.nbytes = round_up(weighed, self.granule) if weighed > 0 else 0
            self._seq += 1
            self._live[key] = (StorageWeakRef(storage), allocation)
            self.allocations.append(allocation)
            self.current += allocation.nbytes
            added = True
        if added:
            self.timeline.append((self._seq, self.phase, self.current))
            if self.current > self.peak.bytes:
                op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
                live = sorted((replace(a) for _, a in self._live.values()), key=lambda a: -a.nbytes)  # copies
                self.peak = Snapshot(self.current, self._seq, self.phase, op, live)

    def _inplace_on_gpu(self, func, args, out) -> bool:
        """Whether this out-of-place op runs in place in eager CUDA code: under any dispatch mode
        (this one included) autograd's backward formulas take their tensor-subclass paths, e.g.
        ``zeros(...).scatter(...)`` for the max backward where plain tensors get
        ``zeros(...).scatter_(...)``. Recognised: one of :data:`_SUBCLASS_OUT_OF_PLACE` from the
        autograd engine (no fastgait frame) whose first argument is the zeros it made just before."""
        op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else ""
        if not self.fix_subclass_paths or op not in _SUBCLASS_OUT_OF_PLACE or self.phase != "backward":
            return False
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return False
        entry = self._live.get(args[0].untyped_storage()._cdata)
        if entry is None or entry[1].seq != self._seq - 1 or entry[1].op not in _ZEROS_OPS:
            return False
        if _repo_frames():
            return False
        storage = out.untyped_storage()
        if storage.nbytes() != args[0].untyped_storage().nbytes():
            return False
        # The result takes over the zeros' block: same bytes, one allocation.
        zeros = entry[1]
        self._live[storage._cdata] = (StorageWeakRef(storage), replace(zeros, op=f"{zeros.op}+{op}_ (in place on a GPU)"))
        zeros.nbytes = 0  # its bytes moved to the result: the live total is unchanged
        self.fixups += 1
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._inplace_on_gpu(func, args, out):
            self.observe(func, args, kwargs, out)
        return out


class _Launchers(TorchDispatchMode):
    """Runs each ``fastgait::`` op's real launcher (its Triton launches recorded, not run) and
    returns the launcher's own outputs, so the tensors the op allocates are those counted."""

    def __init__(self, overrides: Optional[dict] = None):
        super().__init__()
        self.overrides = overrides or {}
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "fastgait":
            from fastgait.compile_gate.capture import _real_implementation

            name = func._schema.name
            self.ops.append(name)
            implementation = self.overrides.get(name) or _real_implementation(name)
            return implementation(*args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The harness protocol on fake tensors
# ---------------------------------------------------------------------------------------------


class _ShimMode:
    """What the bench modules read of ``bench.mode``: bf16 autocast on the CPU device."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.matrix = "bf16" if dtype == torch.bfloat16 else "fp32"
        self.compile_backend = "none"

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)


class _ShimBench:
    def __init__(self, dtype: torch.dtype):
        self.device = torch.device("cpu")
        self.mode = _ShimMode(dtype)

    def compile(self, fn, key=None):
        raise NotImplementedError("the memory model runs eager code only")


@dataclass
class Result:
    op: str
    config: str
    provider: str
    variant: str
    peak_bytes: int
    peak_phase: str
    peak_op: str
    live_at_peak: list  # [Allocation]
    allocations: int
    launches: int
    fastgait_ops: list = field(default_factory=list)
    error: Optional[str] = None
    note: Optional[str] = None  # how it was modelled, where not on fake tensors

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def breakdown(self) -> list[tuple[str, int, int, str]]:
        """(name, bytes, count, phase) of the live allocations at the peak, largest first."""
        groups: dict[tuple[str, str], list[int]] = {}
        for a in self.live_at_peak:
            groups.setdefault((a.site.name, a.phase), []).append(a.nbytes)
        rows = [(name, sum(sizes), len(sizes), phase) for (name, phase), sizes in groups.items()]
        return sorted(rows, key=lambda r: -r[1])


@contextlib.contextmanager
def _patched(module, **attributes) -> Iterator[None]:
    previous = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(module, name, value)


def run_fwd_bwd(make_inputs: Callable[[], dict], fn: Callable[[dict], torch.Tensor], *, autocast: Callable[[], Any],
                fake: bool = True, tracker: Optional[MemoryTracker] = None, overrides: Optional[dict] = None,
                patches: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> tuple[MemoryTracker, _Launchers, int]:
    """The harness's fwd+bwd (``run_op_case``: leaf grads cleared, forward under the op's autocast,
    ``torch.autograd.backward(out, grad_out)``) under a tracker; the inputs are made before it starts.
    Returns the tracker, the launcher interceptor and the number of recorded kernel launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastgait.compile_gate.capture import _Recorder
    from fastgait.ops._dispatch import force_gpu_choices

    tracker = tracker or MemoryTracker()
    launchers = _Launchers(overrides)
    recorder = _Recorder()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with force_gpu_choices(), recorder.patched(), (patches() if patches else contextlib.nullcontext()):
        with fake_mode:
            inputs = make_inputs()
            for leaf in (t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad):
                leaf.grad = None
            with tracker, launchers:
                tracker.phase = "forward"
                with autocast():
                    out = fn(inputs)
                tracker.phase = "backward"
                torch.autograd.backward(out, inputs["grad_out"])
                tracker.phase = "after"
                del out
                tracker.sweep()
            del inputs
    return tracker, launchers, len(recorder.launches)


# ---------------------------------------------------------------------------------------------
# The bench's ops
# ---------------------------------------------------------------------------------------------


def _spec(op: str):
    if op == "mla_conv3d":
        from bench.test_mla import MLABench, PAPER, SMOKE

        return MLABench(), PAPER, SMOKE
    if op == "gem_hpp":
        from bench.test_gem import GeMBench, PAPER, SMOKE

        return GeMBench(), PAPER, SMOKE
    if op == "triplet_loss":
        from bench.test_triplet import TripletBench, PAPER, SMOKE

        return TripletBench(), PAPER, SMOKE
    raise ValueError(f"unknown op {op!r}")


def reference_module_at(commit: str):
    """``fastgait/ops/reference.py`` as it was at ``commit`` (read with git), as a module."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{commit}:fastgait/ops/reference.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"fastgait_reference_at_{commit}")
    module.__file__ = str(ROOT / "fastgait" / "ops" / f"reference@{commit}.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - the project's own history
    return module


def _reference_patches(commit: str) -> Callable[[], contextlib.AbstractContextManager]:
    """Run the ops' ``impl="reference"`` paths with the reference functions of ``commit``."""
    old = reference_module_at(commit)

    @contextlib.contextmanager
    def patches():
        import fastgait.ops.gem as gem
        import fastgait.ops.mla as mla
        import fastgait.ops.triplet as triplet

        with _patched(mla, mla_conv3d_reference=old.mla_conv3d_reference), \
                _patched(gem, gem_hpp_reference=old.gem_hpp_reference), \
                _patched(triplet, triplet_loss_reference=old.triplet_loss_reference):
            yield

    return patches


def model_case(op: str, config, provider: str, variant: str = "engine", dtype: torch.dtype = torch.bfloat16,
               weights: Optional[Callable[[Allocation], int]] = None, reference_at: Optional[str] = None) -> Result:
    """Model one bench row (``op``, ``config``, ``provider``) fwd+bwd; ``variant`` a key of
    :data:`VARIANTS`; ``reference_at``: a commit whose reference functions the reference rows run."""
    spec, _, _ = _spec(op)
    bench = _ShimBench(dtype if spec.autocast else torch.float32)
    tracker = MemoryTracker(weights=weights)
    overrides, patches = VARIANTS[variant](config) if variant != "engine" else (None, None)
    if reference_at is not None:
        patches = _reference_patches(reference_at)
        variant = f"reference.py at {reference_at}"
    note = None
    try:
        fn = spec.forward(bench, provider, config)
        run = lambda fake: run_fwd_bwd(  # noqa: E731
            lambda: spec.inputs(bench, config, 0), fn, autocast=lambda: spec.context(bench), tracker=tracker,
            overrides=overrides, patches=patches, fake=fake,
        )
        try:
            _, launchers, launches = run(True)
        except Exception as error:  # noqa: BLE001
            from torch._subclasses.fake_tensor import DataDependentOutputException

            if not isinstance(error, DataDependentOutputException) or spec.autocast or provider.startswith("triton"):
                raise
            # A path that reads values on the host (the reference triplet loss) cannot run on fake
            # tensors: fp32 outside autocast, small, it runs on real CPU tensors instead.
            tracker = MemoryTracker(weights=weights)
            _, launchers, launches = run(False)
            note = "real CPU tensors (host reads)"
    except Exception as error:  # noqa: BLE001 - reported in the table
        return Result(op, config.name, provider, variant, 0, "", "", [], 0, 0, error=f"{type(error).__name__}: {error}"[:200])
    peak = tracker.peak
    return Result(op, config.name, provider, variant, peak.bytes, peak.phase, peak.op, peak.live,
                  len(tracker.allocations), launches, sorted(set(launchers.ops)), note=note)


# ---------------------------------------------------------------------------------------------
# Model-only prototypes of memory options for the fused MLA op (allocation sequences only)
# ---------------------------------------------------------------------------------------------


def _engine():
    from fastgait.ops import conv_engine

    return conv_engine


def _chunks(ce, n: int, chunk, per_sample_bytes: int) -> list:
    """The variant's chunks of samples: ``None`` the engine's rule (``conv_engine.sample_chunks``,
    ``CHUNK_BYTES``), ``"all"`` one chunk, an int that many samples per chunk."""
    if chunk is None:
        return ce.sample_chunks(n, per_sample_bytes)
    step = n if chunk == "all" else chunk
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _forward_variant(packed: bool, chunk=None):
    """The engine's ``_forward`` allocation sequence (its gates: 2 bits a channel), with ``packed`` the
    gates at 1 bit (the boundary
    rows' second bit, ``P0 > 0``, in a per-slot buffer ``[n, slots, t, w, c_out/8]`` after them),
    and the P rows and (hybrid) the vendor's ``[G; F]`` temporary made per chunk of samples
    (``chunk``: see :func:`_chunks`; ``None`` is the engine's rule)."""
    ce = _engine()

    def forward(x, weight_global, weight_local, cuts, fuse, terms, negative_slope, design):
        n, c_in, t, h, w = x.shape
        c_out = weight_local.shape[0]
        weight = ce._stacked(weight_global, weight_local)
        c_pre = weight.shape[0]
        has_cuts = cuts.any(h)
        fuse_concat = weight_global is not None and fuse == "concat"
        y = ce._empty_activation(n, c_out, t, 2 * h if fuse_concat else h, w, like=x)
        if packed:  # one buffer: the packed gates, then the boundary slots' P0 > 0 bits
            n_bits = n * t * h * w * -(-c_pre // 8) + n * cuts.slots(h) * t * w * -(-c_out // 8)
            gates = torch.empty(n_bits, dtype=torch.uint8, device=x.device)
        else:
            gates = ce._empty_activation(n, ce.gate_bytes(c_out, c_pre), t, h, w, like=x, dtype=torch.uint8)
        packs = []  # held through the chunks, as the engine holds them
        if has_cuts:
            packs.append(ce._forward_pack(weight_local))
        if design == "gemm":
            packs.append(ce._forward_pack(ce._interleaved(weight_global, weight_local)))
        p_bytes = cuts.slots(h) * t * w * c_out * 4 if has_cuts else 0
        pre_bytes = 0 if design == "gemm" else c_pre * t * h * w * x.element_size()
        for rows in _chunks(ce, n, chunk, max(pre_bytes, p_bytes)):
            xs = x[rows]
            p_rows = ce._slot_rows(xs, cuts.slots(h), c_out, torch.float32) if has_cuts else None
            if design != "gemm":
                pre = torch.nn.functional.conv3d(xs, weight, padding=1)  # the vendor's temporary
                del pre
            del p_rows  # the epilogue has written y and the gates of these samples
        return y, gates

    return forward


def _backward_variant(chunk=None):
    """The engine's ``_backward`` allocation sequence, with ``gpre``/``delta`` and the dgrad/wgrad
    done per chunk of samples (``chunk``: see :func:`_chunks`; ``None`` is the engine's rule). dX:
    the GEMM design's dgrad kernel writes each chunk's slice of the full dX; the hybrid's vendor
    dgrad returns a chunk-sized dX that is copied into place (one chunk: the vendor's dX is the
    output). dW: an fp32 sum over the chunks. ``gpre`` is freed before the delta terms."""
    ce = _engine()

    def backward(grad_y, x, weight_global, weight_local, cuts, gates, fuse, terms, negative_slope, design):
        n, c_in, t, h, w = x.shape
        c_out = weight_local.shape[0]
        weight = ce._stacked(weight_global, weight_local)
        c_pre = weight.shape[0]
        slots = cuts.slots(h)
        has_cuts = cuts.any(h)
        configs = ce.launch_configs(x.device, c_in, c_out, c_pre, t * w, x.stride(1) == 1, x.element_size())
        chunks = _chunks(ce, n, chunk, c_pre * t * h * w * x.element_size())
        packs = []  # held through the chunks, as the engine holds them
        if design == "gemm":
            packs.append(ce._dgrad_pack(weight))
        if has_cuts:
            packs.append(ce._dgrad_pack(weight_local))
        dx = ce._empty_activation(n, c_in, t, h, w, like=x) if design == "gemm" or len(chunks) > 1 else None
        dweight = None
        for rows in chunks:
            xs = x[rows]
            gpre = ce._empty_activation(xs.shape[0], c_pre, t, h, w, like=x)
            delta = ce._slot_rows(xs, slots, c_out) if has_cuts else None
            if design == "gemm":
                partial = _wgrad_partial(xs, c_pre, h, configs["wgrad"])
                dws = partial.sum(0).view(c_pre, 3, 3, 3, c_in).permute(0, 4, 1, 2, 3)
                del partial
            else:
                dxs, dws, _ = torch.ops.aten.convolution_backward(
                    gpre, xs, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False]
                )
                if dx is None:
                    dx = ce._in_format_of(dxs, like=x)
                else:
                    dx[rows].copy_(dxs)
                del dxs
                dws = dws.float()
            del gpre
            if dweight is None:
                dweight = dws
            else:
                dweight += dws
            del dws
            if has_cuts:
                partial = _wgrad_partial(xs, c_out, slots, dict(configs["wgrad"], BLOCK_O=ce._block(c_out, 16, 64)))
                dweight[c_pre - c_out:] += partial.sum(0).view(c_out, 3, 3, 3, c_in).permute(0, 4, 1, 2, 3)
                del partial
            del delta
        return dx, dweight.to(weight.dtype).contiguous()

    return backward


def _wgrad_partial(x, c_grad, slots, config):
    """The fp32 partial-sum buffer ``_wgrad`` allocates (same split rule)."""
    ce = _engine()
    n, c_in, t, h, w = x.shape
    block_k = ce.k_tiling(c_in, 64, True, taps=27, interpreter_cap=128)["BLOCK_K"]
    tiles = ce._cdiv(c_grad, config["BLOCK_O"]) * ce._cdiv(27 * c_in, block_k)
    reductions = n * slots * ce._cdiv(t * w, config["BLOCK_M"])
    splits = max(1, min(reductions, ce._cdiv(4 * ce.sm_count(x.device), tiles), 64))
    splits = ce._cdiv(reductions, ce._cdiv(reductions, splits))
    return torch.empty(splits, c_grad, 27 * c_in, dtype=torch.float32, device=x.device)


def _variant(packed: bool = False, chunk=None, forward_chunk=None):
    """Overrides of the two ``fastgait::`` ops (their launchers' allocation sequences); ``chunk``
    (backward) and ``forward_chunk`` (forward): see :func:`_chunks`."""

    def make(config):
        ce = _engine()
        forward = _forward_variant(packed, forward_chunk)
        backward = _backward_variant(chunk)

        def forward_op(x, weight_global, weight_local, band_start, geometry, size, fuse, terms, negative_slope, design):
            return forward(x, weight_global, weight_local, ce.Cuts(geometry, size, band_start), fuse, terms,
                           negative_slope, design)

        def backward_op(grad_y, x, weight_global, weight_local, band_start, gates, geometry, size, fuse, terms,
                        negative_slope, design):
            return backward(grad_y, x, weight_global, weight_local, ce.Cuts(geometry, size, band_start), gates, fuse,
                            terms, negative_slope, design)

        return {"fastgait::cut_conv3d": forward_op, "fastgait::cut_conv3d_backward": backward_op}, None

    make.drop_gpre = False
    return make


def _without_gpre(make):
    """On top of ``make``: no ``gpre`` buffer (the GEMM design's dgrad and wgrad kernels gate
    ``grad_y`` with the gates as they load their tiles), modelled by not counting ``gpre``."""

    def wrapped(config):
        return make(config)

    wrapped.drop_gpre = True
    return wrapped


# The engine already has A (no materialized zero gradient for the gates) and C (the batch in
# chunks of samples, forward and backward: ``conv_engine.CHUNK_BYTES``); the variants below are
# relative to it, plus the engine without chunks (as it was before C) for comparison.
VARIANTS: dict[str, Callable] = {
    "engine": None,  # the engine as it is
    "engine (allocation replay)": _variant(),  # check: the prototypes replay the engine
    "engine without chunks (one chunk per pass)": _variant(chunk="all", forward_chunk="all"),
    "chunks of 32 samples (fwd+bwd)": _variant(chunk=32, forward_chunk=32),
    "B': 1-bit gates (the engine packs 2 bits)": _variant(packed=True),
    "B', chunks of 32": _variant(packed=True, chunk=32, forward_chunk=32),
    "B'+D (gemm: no gpre, gating fused into dgrad/wgrad)": _without_gpre(_variant(packed=True)),
}


def model_variant(config, provider: str, variant: str) -> Result:
    """The fused MLA op with a model-only variant (see :data:`VARIANTS`)."""
    make = VARIANTS[variant]
    drop_gpre = getattr(make, "drop_gpre", False)

    def weights(a: Allocation) -> int:
        if drop_gpre and a.site.name.startswith("gpre "):
            return 0
        return a.nbytes
    return model_case("mla_conv3d", config, provider, variant, weights=weights)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

MLA_PROVIDERS = ("reference-eager", "torch", "triton-hybrid", "triton-hybrid2d", "triton-gemm")
OTHER_PROVIDERS = {"gem_hpp": ("reference-eager", "triton"), "triplet_loss": ("reference-eager", "triton")}


def _mib(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value / MIB:.0f}" if value >= 10 * MIB else f"{value / MIB:.3g}"


def table(results: list[Result]) -> str:
    """Markdown: model peak vs the H200 measurement where there is one."""
    reference = {(r.op, r.config, r.variant): r.peak_bytes for r in results if r.provider == "reference-eager" and not r.error}
    h200_ref = {(op, cfg): v for (op, cfg, p), v in H200_MEASURED.items() if p == "reference-eager"}
    lines = [
        "| op | config | provider | variant | model peak MiB | model vs model reference | H200 measured MiB (code of e0705a9) | H200 vs H200 reference | model / H200 | peak in | at op |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.op} | {r.config} | {r.provider} | {r.variant} | not modelled: {r.error} | | | | | | |")
            continue
        ref = reference.get((r.op, r.config, r.variant)) or reference.get((r.op, r.config, "engine"))
        measured = H200_MEASURED.get((r.op, r.config, r.provider))
        measured_ref = h200_ref.get((r.op, r.config))
        ratio = f"{r.peak_bytes / ref:.2f}×" if ref else "—"
        h_ratio = f"{measured / measured_ref:.2f}×" if measured and measured_ref else "—"
        vs = f"{r.peak_bytes / measured:.3f}" if measured else "—"
        provider = r.provider + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.op} | {r.config} | {provider} | {r.variant} | {_mib(r.peak_bytes)} | {ratio} | "
                     f"{_mib(measured)} | {h_ratio} | {vs} | {r.peak_phase} | {r.peak_op} |")
    return "\n".join(lines)


def breakdown_table(result: Result, limit: int = 12) -> str:
    lines = [f"**{result.provider}** {result.config} ({result.variant}): model peak {result.peak_mib:.0f} MiB "
             f"in the {result.peak_phase}, at aten.{result.peak_op}", "",
             "| live at the peak | MiB | tensors | allocated in |", "| --- | --- | --- | --- |"]
    rows = result.breakdown()
    for name, nbytes, count, phase in rows[:limit]:
        lines.append(f"| {name} | {nbytes / MIB:.1f} | {count} | {phase} |")
    rest = rows[limit:]
    if rest:
        lines.append(f"| (other {sum(r[2] for r in rest)} tensors) | {sum(r[1] for r in rest) / MIB:.1f} | {sum(r[2] for r in rest)} | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="mla_conv3d,gem_hpp,triplet_loss")
    parser.add_argument("--configs", default="casia-b", help="substring of the config names to model (paper shapes)")
    parser.add_argument("--smoke", action="store_true", help="the bench's tiny smoke shapes")
    parser.add_argument("--breakdown", action="store_true", help="what is alive at the peak, fused MLA and reference")
    parser.add_argument("--variants", action="store_true", help="model-only memory options of the fused MLA op")
    parser.add_argument("--reference-at", default=None, metavar="COMMIT",
                        help="also model the reference rows with fastgait/ops/reference.py of COMMIT (e.g. e0705a9, "
                             "the first H200 run's code)")
    args = parser.parse_args(argv)

    print("# fastgait memory model (fake tensors, bf16 autocast, GPU launch choices): MODEL numbers, not measurements\n")
    print(f"Peak = bytes allocated above the inputs over one fwd+bwd call (the bench's protocol), "
          f"each allocation rounded up to {ROUND_BYTES} B. Not visible: {NOT_VISIBLE}.\n")
    results, fused = [], []
    for op in args.ops.split(","):
        spec, paper, smoke = _spec(op)
        configs = smoke if args.smoke else [c for c in paper if args.configs in c.name]
        providers = MLA_PROVIDERS if op == "mla_conv3d" else OTHER_PROVIDERS[op]
        for config in configs:
            for provider in providers:
                result = model_case(op, config, provider)
                results.append(result)
                if op == "mla_conv3d" and provider != "torch":
                    fused.append(result)
    if args.reference_at:
        for op in args.ops.split(","):
            spec, paper, smoke = _spec(op)
            configs = smoke if args.smoke else [c for c in paper if args.configs in c.name]
            results += [model_case(op, config, "reference-eager", reference_at=args.reference_at) for config in configs]
    print(table(results))
    if args.breakdown:
        print("\n## Live at the peak (model)\n")
        for result in fused:
            if not result.error:
                print(breakdown_table(result) + "\n")
    if args.variants and "mla_conv3d" in args.ops:
        print("\n## Model-only variants of the fused MLA op (allocation prototypes, in the model only)\n")
        _, paper, smoke = _spec("mla_conv3d")
        configs = smoke if args.smoke else [c for c in paper if args.configs in c.name]
        rows = []
        for config in configs:
            for provider in ("triton-hybrid", "triton-gemm"):
                for variant in VARIANTS:
                    if variant == "engine" or (provider == "triton-hybrid" and getattr(VARIANTS[variant], "drop_gpre", False)):
                        continue  # (the vendor's dgrad/wgrad need gpre in memory)
                    result = model_variant(config, provider, variant)
                    results.append(result)
                    rows.append(result)
        print(table([r for r in results if r.provider == "reference-eager" and r.op == "mla_conv3d"] + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
