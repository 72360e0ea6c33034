"""Ahead-of-time compile report of the GeM and triplet kernels for sm_90a (no GPU needed).

Runs the real launchers (``fastgait.ops.gem`` / ``fastgait.ops.triplet``) on ``meta`` tensors
under ``force_gpu_choices()`` at the papers' shapes, records every ``kernel[grid](...)`` call
instead of running it, compiles each distinct launch with the installed Triton for
``cuda:90`` (the JIT's specialisations: integer arguments equal to 1 become constants, those
divisible by 16 and the pointers get ``tt.divisibility=16``), and prints one line per kernel
variant: registers and spill bytes (stores + loads) from the ``ptxas -v`` log of Triton's own ptxas call, shared memory and whether the
PTX holds tensor-core instructions (``wgmma``/``mma``).

    python -m bench.aot_gem_triplet            # Triton 3.9 (installed)
    PYTHONPATH=/opt/triton36 python -m bench.aot_gem_triplet   # Triton 3.6
    python -m bench.aot_gem_triplet --quick    # fewer shapes
    python -m bench.aot_gem_triplet --maxnreg none,128,192   # registers/spills under each cap

Exit status 1 when any variant spills or fails to compile.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout

# A fresh cache, so every variant really runs ptxas and its log (registers, spills) is seen.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-gem-triplet-")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastgait.kernels.gem as gem_kernels
import fastgait.kernels.triplet as triplet_kernels
from fastgait.ops import gem as gem_ops
from fastgait.ops import triplet as triplet_ops
from fastgait.ops._dispatch import force_gpu_choices

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


class Recorder:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, grid, args, kwargs))

        return launch


@contextmanager
def recording(calls):
    saved = {}
    for module in (gem_kernels, triplet_kernels):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and not name.startswith("_"):
                saved[(module, name)] = obj
                setattr(module, name, Recorder(obj, calls))
    try:
        with force_gpu_choices():
            yield
    finally:
        for (module, name), obj in saved.items():
            setattr(module, name, obj)


def signature_of(kernel, args, kwargs):
    names = kernel.arg_names
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in options}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
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
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs, options




def compile_report(kernel, args, kwargs):
    signature, constexprs, attrs, options = signature_of(kernel, args, kwargs)
    options = {"num_warps": 4, "num_stages": 3} | options
    log = io.StringIO()
    with redirect_stdout(log):  # Triton prints its own ptxas -v log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
    ptx = compiled.asm["ptx"]
    text = log.getvalue()
    used = re.search(r"Used (\d+) registers", text)
    if used is None:
        raise RuntimeError("no ptxas log (TRITON_DUMP_PTXAS_LOG) was captured")
    regs = int(used.group(1))
    # Spills as reported by the ptxas call Triton itself made for this cubin.
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    tensor_core = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "-")
    shared = compiled.metadata.shared
    blocks = {k: v for k, v in constexprs.items() if k.isupper()}
    return regs, spill, shared, tensor_core, options["num_warps"], blocks


def real(op):
    """The launcher behind a ``torch.library.custom_op`` (meta tensors would reach its fake impl)."""
    return op._init_fn


def gem_cases(quick):
    shapes = [(128, 128, 30, 64, 22), (128, 128, 100, 64, 22), (128, 128, 30, 16, 11), (128, 128, 10, 32, 22)]
    bins_for = {64: [[64], [1, 2, 4, 8, 16]], 16: [[16], [1, 2, 4, 8, 16]], 32: [[32]]}
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if quick:
        shapes, dtypes = shapes[:1] + shapes[2:3], [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        for n, c, t, h, w in shapes:
            for layout in ("channels_last_3d", "contiguous"):
                x = torch.empty(n, c, t, h, w, dtype=dtype, device="meta")
                if layout == "channels_last_3d":
                    x = x.to(memory_format=torch.channels_last_3d)
                for bins in bins_for[h]:
                    for train in (True, False):
                        yield f"gem {str(dtype)[6:]} {layout[:6]} {n}x{c}x{t}x{h}x{w} bins{bins} {'train' if train else 'eval'}", (
                            lambda x=x, bins=bins, train=train: _gem_launch(x, bins, train))


def _gem_launch(x, bins, train):
    p = torch.empty(1, device="meta")
    out, frame_max, frame_arg = real(gem_ops.gem_hpp_fwd)(x, p, bins, 1e-6, train)
    if train:
        grad_out = torch.empty_like(out, dtype=x.dtype)
        real(gem_ops.gem_hpp_bwd)(grad_out, frame_max, frame_arg, out, p, bins, 1e-6, x.shape[2],
                            gem_ops._alloc.stride_order(x))


def triplet_cases(quick):
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    configs = [(128, 128, 64), (256, 128, 64), (256, 256, 64), (128, 256, 16), (64, 128, 16)]
    if quick:
        configs, dtypes = configs[:2], dtypes[:2]
    for dtype in dtypes:
        for n, c, parts in configs:
            yield f"triplet {str(dtype)[6:]} n{n} c{c} p{parts}", (
                lambda n=n, c=c, parts=parts, dtype=dtype: _triplet_launch(n, c, parts, dtype))
        for n, m, c, parts in [(5000, 5000, 256, 64), (1000, 1200, 128, 16)][: 1 if quick else 2]:
            yield f"part_distance {str(dtype)[6:]} {n}x{m} c{c} p{parts}", (
                lambda n=n, m=m, c=c, parts=parts, dtype=dtype: _distance_launch(n, m, c, parts, dtype))


def _triplet_launch(n, c, parts, dtype):
    # SeparateFCs' layout (a [p, n, c] tensor seen as [n, c, p]) and a contiguous [n, c, p] one.
    _triplet_launch_one(torch.empty(parts, n, c, dtype=dtype, device="meta").permute(1, 2, 0))
    _triplet_launch_one(torch.empty(n, c, parts, dtype=dtype, device="meta"))


def _triplet_launch_one(embeddings):
    n = embeddings.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device="meta")
    real(triplet_ops.triplet_loss_fwd)(embeddings, labels, 0.2, False)  # evaluation-style forward
    outputs = real(triplet_ops.triplet_loss_fwd)(embeddings, labels, 0.2, True)
    real(triplet_ops.triplet_loss_bwd)(torch.empty((), device="meta"), embeddings, *outputs[2:])


def _distance_launch(n, m, c, parts, dtype):
    probe = torch.empty(n, c, parts, dtype=dtype, device="meta")
    gallery = torch.empty(m, c, parts, dtype=dtype, device="meta")
    for cosine in (False, True):
        real(triplet_ops.part_distance_fwd)(probe, gallery, cosine)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("gem", "triplet"))
    parser.add_argument("--maxnreg", help="compile every variant under each of these register caps "
                        "instead of the launcher's, e.g. none,128,192 (how the launchers' caps were chosen)")
    options = parser.parse_args()
    caps = [None if v == "none" else int(v) for v in options.maxnreg.split(",")] if options.maxnreg else None
    print(f"triton {triton.__version__}, target cuda:90 (ptxas sm_90a)")
    seen, bad = {}, 0
    cases = []
    if options.only != "triplet":
        cases += list(gem_cases(options.quick))
    if options.only != "gem":
        cases += list(triplet_cases(options.quick))
    for label, launch in cases:
        calls = []
        with recording(calls):
            launch()
        for kernel, grid, args, kwargs in calls:
            signature, constexprs, attrs, opts = signature_of(kernel, args, kwargs)
            key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
                   tuple(sorted(attrs)), tuple(sorted(opts.items())))
            if key in seen:
                continue
            if caps:
                results = []
                for cap in caps:
                    capped = {k: v for k, v in kwargs.items() if k != "maxnreg"} | ({"maxnreg": cap} if cap else {})
                    regs, spill = compile_report(kernel, args, capped)[:2]
                    results.append(f"{cap}:{regs}/{spill}")
                seen[key] = True
                print(f"{kernel.__name__:24s} maxnreg:regs/spill {' '.join(results)}  [{label}]", flush=True)
                continue
            try:
                regs, spill, shared, tc, warps, blocks = compile_report(kernel, args, kwargs)
                seen[key] = (regs, spill)
                flag = "" if spill == 0 else "  <-- SPILLS"
                if "maxnreg" in kwargs:
                    blocks = blocks | {"maxnreg": kwargs["maxnreg"]}
                bad += spill > 0
                print(f"{kernel.__name__:24s} regs {regs:3d} spill {spill:5d} B smem {shared:6d} {tc:5s} "
                      f"warps {warps} {blocks} grid {tuple(grid)}  [{label}]{flag}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                seen[key] = None
                bad += 1
                print(f"{kernel.__name__:24s} COMPILE FAILED [{label}]: {str(e).splitlines()[0][:300]}", flush=True)
    print(f"{len(seen)} kernel variants, {bad} with spills or failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
