"""Records the kernel launches the real launchers make, without a GPU and without running them.

A scenario (a recipe's model at its real shapes, one dtype, train or eval, one memory format)
runs forward (and loss and backward, for training) on fake tensors (``FakeTensorMode``: shapes,
strides and dtypes, no data) under autocast, with the launchers' GPU choices forced
(``fastgait.ops._dispatch.force_gpu_choices``). Every ``fastgait::`` custom op the model calls is
intercepted and its real implementation (the launcher) is called on the same fake tensors, with
``kernel[grid](...)`` patched to record the call instead of launching it. What is recorded is
what the launchers would launch on a GPU: the kernels, their argument dtypes and alignment,
the integer values Triton specializes on, the constexprs, warps and stages.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAIN_FRAMES_DEFAULT = 30
EVAL_FRAMES = 90  # a whole CASIA-B sequence is ~70-120 frames
EVAL_BATCH = 1  # the evaluator embeds one whole sequence at a time
GALLERY = 1000  # evaluation distances: probes x gallery embeddings
INPUT_SIZE = (64, 44)  # OpenGait's pretreated silhouettes, cut to 64 x 44


@dataclass(frozen=True)
class Scenario:
    """One way the kernels run: a recipe's model, its dtype, train/eval, memory format, the
    row-cut engine's design (MLA and GL blocks)."""

    recipe: str
    dtype: str  # a key of DTYPES
    mode: str  # "train" (forward, loss, backward) or "eval" (forward, distances)
    channels_last: bool = True
    design: Optional[str] = None  # the engine's design; None: the default ("auto")
    overrides: tuple = ()  # (dotted key, value) pairs applied to the recipe

    @property
    def name(self) -> str:
        parts = [self.recipe, *(f"{k}={v}" for k, v in self.overrides), self.dtype, self.mode,
                 "channels_last_3d" if self.channels_last else "contiguous"]
        if self.design:
            parts.append(f"design={self.design}")
        return " ".join(parts)


@dataclass
class Launch:
    """One kernel launch as recorded: enough to compile it exactly as ``kernel[grid](...)`` would."""

    module: str  # fastgait.kernels.<module>
    kernel: str
    args: list
    kwargs: dict
    op: str  # the fastgait:: op whose launcher made it
    compile_class: list  # what Triton specializes on (see _compile_class): equal classes, equal binaries
    scenarios: list = field(default_factory=list)

    @property
    def key(self) -> str:
        text = json.dumps([self.module, self.kernel, self.compile_class], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def as_job(self) -> dict:
        return {"key": self.key, "module": self.module, "kernel": self.kernel, "args": self.args, "kwargs": self.kwargs}

    def describe(self) -> dict:
        """The constexprs and options of the launch (what distinguishes two configs of a kernel)."""
        return {k: v for k, v in self.kwargs.items() if not isinstance(v, dict)}


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        offset = value.storage_offset() * value.element_size()
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": offset % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        raise TypeError(f"a torch.dtype passed to a kernel: {value}")
    if hasattr(value, "value"):  # tl.constexpr
        return _encode(value.value)
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _python_function(kernel):
    """The kernel's Python function, under the compiler or the interpreter (TRITON_INTERPRET=1),
    through Autotuner / Heuristics wrappers."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel


def _constexpr_params(kernel) -> set[str]:
    parameters = inspect.signature(_python_function(kernel)).parameters
    return {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}


def _kernel_identity(kernel) -> tuple[str, str]:
    fn = _python_function(kernel)
    module = fn.__module__
    if not module.startswith("fastgait.kernels."):
        raise ValueError(f"kernel {fn.__name__} is defined in {module}, not in fastgait.kernels")
    return module.rsplit(".", 1)[1], fn.__name__


def _specialization(value: Any) -> Any:
    """What Triton's binder keeps of a non-constexpr argument: 1 itself, an int's width and
    divisibility by 16, a pointer's dtype and alignment, a float or bool's type alone."""
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if value == 1:
            return 1
        return ["i32" if -(2**31) <= value < 2**31 else "i64", value % 16 == 0]
    if isinstance(value, float):
        return "fp32"
    return value  # tensors (dtype, alignment) and None


def _compile_class(kernel, args: list, kwargs: dict) -> list:
    names = list(inspect.signature(_python_function(kernel)).parameters)
    constexprs = _constexpr_params(kernel)
    out = [a if names[i] in constexprs else _specialization(a) for i, a in enumerate(args)]
    out += [[k, v if k not in names or k in constexprs else _specialization(v)] for k, v in sorted(kwargs.items())]
    return out


class _Recorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.op = "?"

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import KernelInterface

        recorder = self

        def getitem(kernel, grid):
            def launch(*args, **kwargs):
                configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
                module, name = _kernel_identity(kernel)
                for config in configs:
                    options = dict(kwargs)
                    if config is not None:
                        options.update(config.all_kwargs())
                    encoded_args = [_encode(a) for a in args]
                    encoded_kwargs = {k: _encode(v) for k, v in sorted(options.items())}
                    recorder.launches.append(Launch(
                        module, name, encoded_args, encoded_kwargs, recorder.op,
                        _compile_class(kernel, encoded_args, encoded_kwargs)))

            return launch

        previous = KernelInterface.__getitem__
        KernelInterface.__getitem__ = getitem
        try:
            yield
        finally:
            KernelInterface.__getitem__ = previous


def _real_implementation(op_name: str) -> Callable:
    from torch._library.custom_ops import OPDEFS

    if op_name not in OPDEFS:
        raise RuntimeError(f"{op_name} is not a torch.library.custom_op: the compile gate cannot find its launcher")
    return OPDEFS[op_name]._init_fn


_VENDOR_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


def _as_cudnn_would(func, args, out):
    """Vendor convolutions in cuDNN's memory format: channels-last-3d in, channels-last-3d out.

    On fake CPU tensors an fp16 ``conv3d`` (and its backward) returns contiguous tensors from
    channels-last-3d inputs (the CPU's slow path), where cuDNN keeps channels-last-3d; without
    this, the fp16 scenarios would capture the contiguous launches downstream of the first
    convolution, not the trainer's layout. Only the format changes (fake tensors: no data)."""
    backward = func is torch.ops.aten.convolution_backward.default
    x, weight = (args[1], args[2]) if backward else (args[0], args[1])

    def channels_last(t):
        return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()

    # cuDNN's rule (cudnn_conv_suggest_memory_format): channels-last when the input or the weight
    # is; with one input channel (the stem) only the weight can say so.
    if x.dim() != 5 or not (channels_last(x) or channels_last(weight)):
        return out

    def fix(t):
        if isinstance(t, torch.Tensor) and t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return tuple(fix(t) for t in out) if isinstance(out, tuple) else fix(out)


class _OpInterceptor:
    """A dispatch mode that runs each ``fastgait::`` op's launcher (recording its launches)."""

    def __init__(self, recorder: _Recorder):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace == "fastgait":
                    recorder.op = func._schema.name
                    _real_implementation(func._schema.name)(*args, **kwargs)
                    outer.ops.add(func._schema.name)
                out = func(*args, **kwargs)
                if func in _VENDOR_CONVOLUTIONS:
                    out = _as_cudnn_would(func, args, out)
                return out

        self.mode = Mode()
        self.ops: set[str] = set()


def _fake_model(model: torch.nn.Module, channels_last: bool) -> None:
    """Replace every parameter and buffer by an empty fake tensor of its shape and layout."""

    def fake(t: torch.Tensor) -> torch.Tensor:
        ref = t.to(memory_format=torch.channels_last_3d) if channels_last and t.dim() == 5 else t
        return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device)

    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model._apply(fake)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


def _recipe(scenario: Scenario) -> dict:
    from fastgait.config import load_config

    return load_config(scenario.recipe, [f"{k}={v}" for k, v in scenario.overrides])


def _model_config(config: dict) -> dict:
    model_cfg = dict(config["model"])
    if model_cfg.get("num_classes") == "auto":
        model_cfg["num_classes"] = 74 if "casia" in str(config.get("name", "")) else 5153
    return model_cfg


@contextlib.contextmanager
def _engine_design(design: Optional[str]) -> Iterator[None]:
    """Every row-cut engine call (MLA and GL blocks) resolves its design to ``design``, through
    FASTGAIT_CONV_DESIGN (which "auto" obeys before anything else); None: the default, "auto",
    which on fake tensors is the engine's FALLBACK_DESIGN. Whatever FASTGAIT_CONV_DESIGN said
    outside is put back afterwards, so the scenarios capture the same launches whatever the
    environment says."""
    import os

    from fastgait.ops.conv_engine import DESIGN_ENV

    outside = os.environ.pop(DESIGN_ENV, None)
    if design is not None:
        os.environ[DESIGN_ENV] = design
    try:
        yield
    finally:
        os.environ.pop(DESIGN_ENV, None)
        if outside is not None:
            os.environ[DESIGN_ENV] = outside


def _run(scenario: Scenario, config: dict, model: torch.nn.Module) -> None:
    """Forward (+ loss and backward) of ``model`` on fake inputs; called under the fake mode."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from fastgait.nn import CrossEntropyLoss, TripletLoss
    from fastgait.ops import part_distance

    train = config["train"]
    _fake_model(model, scenario.channels_last)
    model.train(scenario.mode == "train")
    height, width = INPUT_SIZE
    if scenario.mode == "train":
        batch, frames = int(train["P"]) * int(train["K"]), int(train.get("clip_len", TRAIN_FRAMES_DEFAULT))
    else:
        batch, frames = EVAL_BATCH, EVAL_FRAMES
    sils = torch.empty(batch, frames, height, width)
    if scenario.channels_last:
        sils = sils.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
    dtype = DTYPES[scenario.dtype]
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    with torch.set_grad_enabled(scenario.mode == "train"):
        with autocast:
            out = model(sils)
        embeddings, logits = out if isinstance(out, tuple) else (out, None)
        if scenario.mode == "eval":
            probe = embeddings.float()
            gallery = torch.empty(GALLERY, *probe.shape[1:])
            part_distance(probe, gallery, "euc")
            part_distance(probe, gallery, "cos")
            return
        labels = torch.arange(int(train["P"])).repeat_interleave(int(train["K"]))
        try:
            loss, _ = TripletLoss(float(config["loss"]["margin"]))(embeddings.float(), labels)
        except DataDependentOutputException:
            # A path that reads values on the host (the reference triplet loss, which the fused op
            # falls back to above its batch limit) cannot run on fake tensors and launches no
            # kernel: a stand-in loss carries the backward through the model.
            loss = embeddings.float().square().mean()
        if logits is not None:
            ce, _ = CrossEntropyLoss()(logits, labels)
            loss = loss + ce
        loss.backward()


def capture(scenario: Scenario) -> tuple[list[Launch], set[str]]:
    """The kernel launches of one scenario (in order) and the fastgait ops that made them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastgait.ops._dispatch import force_gpu_choices

    from fastgait.models import build_model

    config = _recipe(scenario)
    model = build_model(_model_config(config))  # real (cheap) weights, made fake inside the mode
    recorder = _Recorder()
    interceptor = _OpInterceptor(recorder)
    with force_gpu_choices(), _engine_design(scenario.design), recorder.patched():
        with FakeTensorMode(allow_non_fake_inputs=True), interceptor.mode:
            _run(scenario, config, model)
    for launch in recorder.launches:
        launch.scenarios.append(scenario.name)
    return recorder.launches, interceptor.ops


def merge(launches: list[Launch]) -> list[Launch]:
    """One entry per distinct launch (same kernel, argument types, specializing values, options)."""
    unique: dict[str, Launch] = {}
    for launch in launches:
        known = unique.get(launch.key)
        if known is None:
            unique[launch.key] = copy.deepcopy(launch)
        else:
            known.scenarios.extend(s for s in launch.scenarios if s not in known.scenarios)
    return list(unique.values())


def kernels_dir() -> Path:
    import fastgait.kernels

    return Path(fastgait.kernels.__file__).resolve().parent
