"""The compile gate: every kernel launch of the recipes compiles for sm_90a (and sm_80 in the slow
run) with the installed Triton and with Triton 3.6.0, the GPU machines' version, and no launch of
the trainer's layout spills on sm_90a. ``python -m pytest -k compile`` runs these alone.

The interpreter (the rest of the suite) accepts code the compiler refuses; these tests are what
sees it without a GPU. The launches are captured from the real launchers (``fastgait.compile_gate``),
so the gate checks what runs, not a hand-kept list.
"""
from __future__ import annotations

import os
import textwrap

import pytest

from fastgait.compile_gate import gate
from fastgait.compile_gate.capture import Launch

VERSIONS = list(gate.triton_versions())


@pytest.fixture(scope="module")
def captured():
    return gate.launches()


def _folder(version: str):
    folder = gate.triton_versions()[version]
    if folder is not None and not gate.triton36_available():
        message = (f"Triton 3.6.0 is not at {folder}: `pip install --no-deps --target {folder} triton==3.6.0` "
                   "(.ci/run does this)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def test_compile_gate_captures_every_fused_op(captured):
    """Each fastgait custom op (forward and backward) is launched by some recipe scenario."""
    from torch._library.custom_ops import OPDEFS

    found, ops = captured
    called = set().union(*ops.values())
    registered = {name for name in OPDEFS if name.startswith("fastgait::")}
    assert registered - called == set(), f"ops no scenario launches (add a recipe or scenario): {registered - called}"
    assert {launch.kernel for launch in found}, "no kernel launch was captured"


def test_compile_gate_capture_sees_launcher_choices(captured):
    """The captured launches carry the launchers' GPU choices (warps), in every dtype and both layouts."""
    found, _ = captured
    scenarios = {s for launch in found for s in launch.scenarios}
    for needle in ("bf16 train", "fp16 train", "fp32 train", "bf16 eval", "fp32 eval", "contiguous", "channels_last_3d"):
        assert any(needle in s for s in scenarios), f"no launch from a '{needle}' scenario"
    assert any("num_warps" in launch.kwargs for launch in found)


@pytest.mark.parametrize("version", VERSIONS)
def test_compile_gate_sm90(captured, version):
    folder = _folder(version)
    found, _ = captured
    results = gate.compile_launches(found, gate.SM90, folder)
    errors = gate.check(found, results, version, gate.SM90, spill_free=True)
    assert not errors, f"{len(errors)} of {len(found)} launches fail the gate:\n\n" + "\n\n".join(errors)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_compile_gate_sm80(captured, version):
    folder = _folder(version)
    found, _ = captured
    results = gate.compile_launches(found, gate.SM80, folder)
    errors = gate.check(found, results, version, gate.SM80, spill_free=False)
    assert not errors, f"{len(errors)} of {len(found)} launches fail to compile for sm_80:\n\n" + "\n\n".join(errors)


BROKEN_KERNEL = '''
import triton
import triton.language as tl

SCALE: tl.constexpr = 0.5  # an annotated float: the interpreter reads it, the compiler refuses it


@triton.jit
def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * SCALE, mask=offs < n)
'''


@pytest.mark.parametrize("version", VERSIONS)
def test_compile_gate_names_a_kernel_that_does_not_compile(tmp_path, version):
    """The gate's message names the kernel, its config, the Triton version and the compiler's words
    (the first H200 run's failure: an annotated float constant, as ``LN2`` was in kernels/gem.py)."""
    folder = _folder(version)
    (tmp_path / "broken.py").write_text(textwrap.dedent(BROKEN_KERNEL))
    args = [{"tensor": "bfloat16", "aligned": True}, 1000]
    kwargs = {"BLOCK": 128, "num_warps": 4}
    launch = Launch("broken", "scale_kernel", args, kwargs, "fastgait::example", [args, kwargs], ["a scenario"])
    results = gate.compile_launches([launch], gate.SM90, folder, kernels=tmp_path, use_cache=False)
    errors = gate.check([launch], results, version, gate.SM90, spill_free=True)
    assert len(errors) == 1
    assert "scale_kernel" in errors[0] and "BLOCK=128" in errors[0] and "does not compile" in errors[0]
    assert gate.triton_version(folder) in errors[0]
    assert "SCALE" in errors[0], errors[0]

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    (fixed / "broken.py").write_text(textwrap.dedent(BROKEN_KERNEL).replace(
        "SCALE: tl.constexpr = 0.5", "SCALE = tl.constexpr(0.5)"))
    results = gate.compile_launches([launch], gate.SM90, folder, kernels=fixed, use_cache=False)
    assert gate.check([launch], results, version, gate.SM90, spill_free=True) == []
    assert results[launch.key]["registers"] > 0


@pytest.mark.parametrize("version", VERSIONS)
def test_compile_gate_fails_on_the_old_ln2_line(captured, tmp_path, version):
    """Putting back the first H200 run's line in kernels/gem.py (``LN2: tl.constexpr = 0.69...``)
    fails the gate with a message naming the GeM backward kernel, on both Tritons."""
    import shutil

    from fastgait.compile_gate.capture import kernels_dir

    folder = _folder(version)
    found, _ = captured
    kernels = tmp_path / "kernels"
    shutil.copytree(kernels_dir(), kernels)
    source = (kernels / "gem.py").read_text()
    fixed_line = next(line for line in source.splitlines() if line.startswith("LN2 = tl.constexpr("))
    (kernels / "gem.py").write_text(source.replace(fixed_line, "LN2: tl.constexpr = 0.6931471805599453"))
    gem = [launch for launch in found if launch.module == "gem"]
    results = gate.compile_launches(gem, gate.SM90, folder, kernels=kernels, use_cache=False)
    errors = gate.check(gem, results, version, gate.SM90, spill_free=True)
    backward = [e for e in errors if e.startswith("gem_rows_bwd_kernel") and "does not compile" in e]
    assert backward, "the gate passed a GeM backward kernel that reads an annotated float constant"
    assert "LN2" in backward[0], backward[0]
    assert not any(e.startswith("gem_rows_fwd_kernel") for e in errors), "the forward does not read LN2"


_RUNTIME_LOOKUP = textwrap.dedent('''
    """Run as a script: JITFunction.run(warmup=True), the path of kernel[grid](...), with a mock
    driver for an sm_90 GPU; prints how many new entries it added to Triton's cache."""
    import json, os, sys
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    sys.path.insert(0, os.environ["FASTGAIT_WORKER_DIR"])
    import worker

    class Hopper:
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return None

    driver.set_active(Hopper())
    job = json.loads(sys.stdin.read())
    kernel = worker._jit_function(worker._load_kernel(sys.argv[1], job["module"], job["kernel"]))
    args = [worker._decode(a) for a in job["args"]]
    kwargs = {k: worker._decode(v) for k, v in job["kwargs"].items()}
    cache = os.environ["TRITON_CACHE_DIR"]
    before = set(os.listdir(cache))
    kernel.run(*args, grid=(1,), warmup=True, **kwargs)
    print(len(set(os.listdir(cache)) - before))
''')


@pytest.mark.parametrize("version", VERSIONS)
def test_warm_fills_the_cache_entries_the_runtime_looks_up(captured, tmp_path, version):
    """``--warm`` compiles launches through the gate's worker into Triton's cache; a kernel launch
    (``JITFunction.run``, mock sm_90 driver) must then find its binary there: no new entry."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fastgait.compile_gate.capture import kernels_dir

    folder = _folder(version)
    found, _ = captured
    launch = next(launch for launch in found if launch.kernel == "gem_rows_fwd_kernel")  # quick to compile
    cache = tmp_path / "triton-cache"
    cache.mkdir()
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), FASTGAIT_WORKER_DIR=str(Path(gate.__file__).parent))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(cache))
        results = gate.compile_launches([launch], gate.SM90, folder, use_cache=False, always_compile=False)
    assert results[launch.key]["ok"], results[launch.key]
    assert any(cache.iterdir()), "the worker wrote nothing into TRITON_CACHE_DIR"
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTHONPATH", None)
    if folder is not None:
        env["PYTHONPATH"] = str(folder)
    script = tmp_path / "lookup.py"
    script.write_text(_RUNTIME_LOOKUP)
    proc = subprocess.run([sys.executable, str(script), str(kernels_dir())], input=json.dumps(launch.as_job()),
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0", "the runtime compiled again: its cache key differs"
