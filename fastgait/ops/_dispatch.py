"""Choosing an implementation for an op: ``impl="reference" | "torch" | "triton" | "auto"``.

- ``"reference"``: the plain PyTorch spec (``fastgait.ops.reference``), written for reading.
- ``"torch"``: an optimised PyTorch path, where the op has one (else the reference).
- ``"triton"``: the fused Triton kernels. CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before Triton was imported (how CI checks the kernels).
- ``"auto"`` (default): Triton on CUDA, the best PyTorch path elsewhere.
"""
from __future__ import annotations

import contextlib
import os

import torch

IMPLS = ("auto", "reference", "torch", "triton")


try:
    import triton  # noqa: F401

    _TRITON_IMPORTABLE = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton here"
    _TRITON_IMPORTABLE = False


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_gpu_choices_forced = False


@contextlib.contextmanager
def force_gpu_choices():
    """Make launchers take their CUDA-only choices (block sizes, warps, splits) on any device.

    The compile gate (``fastgait.testing.compile_gate``) runs the real launchers on meta tensors
    inside this context and records each ``kernel[grid](...)`` call instead of running it.
    """
    global _gpu_choices_forced
    previous, _gpu_choices_forced = _gpu_choices_forced, True
    try:
        yield
    finally:
        _gpu_choices_forced = previous


def gpu_choices(device: torch.device) -> bool:
    """Whether a launcher should pick its GPU configuration for tensors on ``device``.

    Every device-dependent choice in a launcher goes through here (never ``device.type`` directly),
    so the compile gate sees what runs on a GPU.
    """
    return device.type == "cuda" or _gpu_choices_forced


GATE_SM_COUNT = 132  # an H100/H200 SXM: what the compile gate assumes for grid-size choices


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (for split and grid choices); the H200's under the gate."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return GATE_SM_COUNT


def host_readable(t: torch.Tensor) -> bool:
    """Whether an input check may read ``t``'s values on the host (CPU tensors, outside the compile gate)."""
    return t.device.type == "cpu" and not _gpu_choices_forced


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device, *, op: str, has_torch: bool, has_triton: bool) -> str:
    """Turn ``impl`` (possibly ``"auto"``) into the concrete path to run on ``device``.

    Raises a ValueError naming the op and the fix when the request cannot run here.
    """
    check_impl(impl)
    if impl == "auto":
        if gpu_choices(device) and has_triton and triton_importable():
            return "triton"
        return "torch" if has_torch else "reference"
    if impl == "torch" and not has_torch:
        return "reference"
    if impl == "triton":
        if not has_triton:
            raise ValueError(f"{op}: there is no Triton implementation; use impl='torch' or 'reference'")
        if not triton_importable():
            raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install triton)")
        if not gpu_choices(device) and not triton_interpreter_on():
            raise ValueError(
                f"{op}: impl='triton' got {device.type} tensors; Triton runs on CUDA tensors, or on CPU "
                "tensors under the interpreter (set TRITON_INTERPRET=1 before importing triton). "
                "Use impl='auto' to pick the best path for the device."
            )
    return impl
