"""Compiles captured kernel launches for a GPU target with whatever Triton is importable.

Run as a script, never imported by fastgait at run time: ``python worker.py ARCH < launches.json``
prints one JSON result per launch. It imports Triton and the kernel files only (no torch, no
fastgait package code), so the same worker runs under the installed Triton and under another
Triton version put first on ``PYTHONPATH`` (the GPU machines' 3.6.0).

Each launch is compiled the way ``kernel[grid](...)`` would compile it on a GPU: Triton's own
binder specializes the arguments (tensors stand in as ``MockTensor``-like objects with the
recorded dtype and alignment), Triton's ``_pack_args`` builds the signature, constexprs and
attributes, and ``triton.compile`` runs for the target. ``ptxas -v`` reports registers and
spills; ``cuobjdump -sass`` shows which tensor-core instructions the dots became.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path


class _DType:
    """Stands in for a torch dtype: Triton maps ``str(dtype)`` to its type string."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"


_DTYPES: dict[str, _DType] = {}


class _MockTensor:
    """A pointer argument: its dtype and whether its address is 16-byte aligned."""

    def __init__(self, dtype: str, aligned: bool):
        # One object per dtype, as torch's dtypes are: Triton's binder caches type strings by the
        # dtype object's identity, so a fresh object reusing a dead one's address would get its type.
        self.dtype = _DTYPES.setdefault(dtype, _DType(dtype))
        self._ptr = 0 if aligned else 2

    def data_ptr(self) -> int:
        return self._ptr


def _decode(value):
    if isinstance(value, dict) and "tensor" in value:
        return _MockTensor(value["tensor"], value["aligned"])
    return value


def _load_kernel(kernels_dir: str, module: str, name: str):
    """``fastgait.kernels.<module>.<name>`` without importing the fastgait package (torch)."""
    if "fastgait.kernels" not in sys.modules:
        root = types.ModuleType("fastgait")
        root.__path__ = []
        pkg = types.ModuleType("fastgait.kernels")
        pkg.__path__ = [kernels_dir]
        sys.modules["fastgait"], sys.modules["fastgait.kernels"] = root, pkg
    return getattr(importlib.import_module(f"fastgait.kernels.{module}"), name)


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # Autotuner / Heuristics wrap a JITFunction
    return kernel


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_INT64_DIVISION = re.compile(r"\b(?:div|rem)\.[su]64\b")  # software divisions on the GPU
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA)\.([0-9A-Za-z_.]+)")


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _tensor_core_instructions(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    counts: dict[str, int] = {}
    for kind, shape in _MMA.findall(sass):
        key = f"{kind}.{shape}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def compile_launch(launch: dict, capability: int, kernels_dir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(_load_kernel(kernels_dir, launch["module"], launch["kernel"]))
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    args = [_decode(a) for a in launch["args"]]
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v prints here
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    used = _PTXAS_USED.search(text)
    spill = _PTXAS_SPILL.search(text)
    stack = _PTXAS_STACK.search(text)
    return {
        "ok": True,
        "registers": int(used.group(1)) if used else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "tensor_core": _tensor_core_instructions(compiled.asm["cubin"]),
        "int64_divisions": len(_INT64_DIVISION.findall(compiled.asm["ptx"])),
        "compile_s": round(seconds, 3),
    }


def _error_message(error: BaseException) -> str:
    """The compiler's message: the source lines it points at, and the root cause's words."""
    text = f"{type(error).__name__}: {error}"
    lines = [line for line in text.splitlines() if line.strip()][-12:]
    cause, seen = error.__cause__ or error.__context__, 0
    while cause is not None and seen < 5:
        lines.append(f"caused by {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return "\n".join(lines)


def main() -> int:
    capability = int(sys.argv[1])
    kernels_dir = sys.argv[2]
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton

    version = triton.__version__
    for line in sys.stdin:
        launch = json.loads(line)
        try:
            result = compile_launch(launch, capability, kernels_dir)
        except Exception as error:  # noqa: BLE001 - every failure is reported, named, per launch
            result = {"ok": False, "error": _error_message(error)}
        result.update(key=launch["key"], triton=version, capability=capability)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
