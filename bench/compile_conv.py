"""Compile every launch of the convolution-engine ops for sm_90a, without a GPU; print registers/spills.

    python -m bench.compile_conv                         # Triton as installed (3.9 here)
    PYTHONPATH=/opt/triton36 python -m bench.compile_conv  # the GPU machine's Triton 3.6

The real launchers run on ``meta`` tensors with the GPU choices forced
(``fastgait.ops._dispatch.force_gpu_choices``), at the CASIA-B shapes of the MLA, GL and
ReverseMask blocks; each ``kernel[grid](...)`` call is recorded instead of launched, then
compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the specialisations the
JIT would make (an int equal to 1 becomes a constant, ints and pointers divisible by 16 get the
divisibility hint). ``cuobjdump -res-usage`` reads registers and spill stores off the cubin.
Options: ``--dtypes bf16,fp16,fp32``, ``--layouts cl,contiguous``, ``--quick`` (one shape).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
               torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    """Stands in for a kernels module: ``rec.some_kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, module, launches):
        self._module, self._launches = module, launches

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        launches = self._launches

        class _Launch:
            def __getitem__(self, grid):
                def record(*args, **kwargs):
                    launches.append((kernel, grid, args, kwargs))

                return record

        return _Launch()


def _signature(kernel, args, kwargs):
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        param = kernel.params[i]
        value = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs, options


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_launch(kernel, args, kwargs):
    """Registers, stack (spill) bytes, shared memory, MMA instructions and 64-bit divisions of one launch on sm_90a."""
    signature, constexprs, attrs, options = _signature(kernel, args, kwargs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3)}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    shared = int(getattr(compiled.metadata, "shared", 0))  # dynamic shared memory, bytes
    ptx = compiled.asm["ptx"]
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    mma = sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    divs = len(re.findall(r"\b(?:div|rem)\.s64\b|\b(?:div|rem)\.u64\b", ptx))
    return dict(regs=regs, stack=stack, shared=shared, wgmma=wgmma, mma=mma, div64=divs)


@contextlib.contextmanager
def recording(modules):
    """Patch each ``(owner_module, attr)`` kernel accessor to return a recorder."""
    launches = []
    saved = []
    for owner, attr in modules:
        real = getattr(owner, attr)
        module = real()
        saved.append((owner, attr, real))
        setattr(owner, attr, lambda module=module: _Recorder(module, launches))
    try:
        yield launches
    finally:
        for owner, attr, real in saved:
            setattr(owner, attr, real)


def meta_input(n, c, t, h, w, dtype, layout):
    if layout == "cl":
        return torch.empty(n, t, h, w, c, dtype=dtype, device="meta").permute(0, 4, 1, 2, 3)
    return torch.empty(n, c, t, h, w, dtype=dtype, device="meta")


# CASIA-B, batch 8 x 16 = 128 clips, 10 frames after the temporal stem (blocks.md §2.3, §4):
# (name, c_in, c_out, h, w, fuse). GaitMask's MLA blocks cut at a band of floor(0.4*h) rows;
# GaitGL's GL blocks (halving 3) at the borders of 8 strips (8 rows at 64, 4 at 32).
SHAPES = [("A 32-64 64x44", 32, 64, 64, 44, "add"), ("A 64-128 32x22", 64, 128, 32, 22, "add"),
          ("B 128-128 32x22", 128, 128, 32, 22, "concat")]
BATCH, FRAMES = 128, 10


def record_launches(op, dtype, layout, make_input, recording, quick=False):
    """Yield ``(shape name, launches)``: every kernel launch of one forward and backward (both
    designs; training, evaluation and local-only for MLA) of ``op`` at each shape."""
    from fastgait.ops import _dispatch
    from fastgait.ops import conv_engine as engine
    from fastgait.ops import reverse_mask as rm

    for name, c_in, c_out, h, w, fuse in SHAPES[:1] if quick else SHAPES:
        with _dispatch.force_gpu_choices(), recording([(engine, "_kernels"), (rm, "_kernels")]) as launches:
            x = make_input(BATCH, c_in, FRAMES, h, w, dtype, layout)
            weight = torch.empty(c_out, c_in, 3, 3, 3, dtype=dtype, device="meta")
            band = torch.empty(BATCH, dtype=torch.int64, device="meta")
            if op == "mla":
                variants = [(engine.Cuts("band", int(0.4 * h), band), weight, "pair"),
                            (engine.Cuts("band", 0, None), weight, "pair"),
                            (engine.Cuts("band", int(0.4 * h), band), None, "pair")]
            elif op == "gl":
                variants = [(engine.Cuts("strips", h // 8), weight, "rest")]
            elif op == "rm":  # ReverseMaskNet's Plain RMB (one branch) and Inception RMB (global + two)
                params = torch.empty(3, dtype=torch.int64, device="meta")
                for region in ("unit", "band", "block", "none"):
                    rows = int(0.5 * h) if region != "none" else 0
                    for glob, branches in ((None, 1), (weight, 2)):
                        weight_rm = torch.empty(branches * c_out, c_in, 3, 3, 3, dtype=dtype, device="meta")
                        scales = torch.empty(branches, 2, dtype=torch.float32, device="meta")
                        args = (scales, params, region, rows, int(0.5 * w), 0.5, branches, fuse if glob is not None
                                else "add", 0.01)
                        y, gates = rm._rm_forward(x, glob, weight_rm, *args)
                        rm._rm_backward(torch.empty_like(y), x, glob, weight_rm, args[0], args[1], gates, *args[2:])
                yield f"{op} {name}", launches
                continue
            else:
                raise ValueError(f"unknown op {op!r}")
            for design in engine.DESIGNS:
                for cuts, glob, terms in variants:
                    y, gates = engine._forward(x, glob, weight, cuts, fuse, terms, 0.01, design)
                    engine._backward(torch.empty_like(y), x, glob, weight, cuts, gates, fuse, terms, 0.01, design)
        yield f"{op} {name}", launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--layouts", default="cl,contiguous")
    parser.add_argument("--ops", default="mla,gl,rm")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--filter", default="")
    args = parser.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    results = OrderedDict()
    failures = 0
    for op in args.ops.split(","):
        for dtype_name in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for shape_name, launches in record_launches(
                    op, dtypes[dtype_name], layout, meta_input, recording, quick=args.quick
                ):
                    for kernel, grid, kargs, kkwargs in launches:
                        key = (kernel.__name__, shape_name, dtype_name, layout,
                               tuple(sorted((k, v) for k, v in kkwargs.items() if isinstance(v, (bool, int)))))
                        if key in results or args.filter not in kernel.__name__:
                            continue
                        try:
                            results[key] = compile_launch(kernel, kargs, kkwargs)
                        except Exception as error:  # noqa: BLE001 - report every failure, go on
                            failures += 1
                            results[key] = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
                        r = results[key]
                        flags = ",".join(f"{k}={int(v)}" for k, v in key[4] if k.isupper() and not k.startswith("BLOCK"))
                        blocks = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in key[4] if k.startswith("BLOCK"))
                        warps = kkwargs.get("num_warps", 4)
                        if "error" in r:
                            line = f"ERROR {r['error']}"
                        else:
                            line = (f"regs {r['regs']:3d} stack {r['stack']:4d} smem {r['shared']:6d} "
                                    f"wgmma {'/'.join(r['wgmma']) or '-'} mma {'/'.join(r['mma']) or '-'} div64 {r['div64']}")
                        print(f"{kernel.__name__:32s} {shape_name:22s} {dtype_name:4s} {layout:10s} "
                              f"w{warps} {blocks:22s} {flags:40s} {line}", flush=True)
    print(f"triton {triton.__version__}: {len(results)} launches compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
