"""The compile gate: every kernel launch the recipes make, compiled for the GPU targets.

``launches(level)`` captures the launches of every scenario (``capture.py``); ``compile_launches``
compiles them with the installed Triton or another one (``TRITON_VERSIONS``) for an sm
capability, in worker processes (``worker.py``). ``check`` turns the results into the gate's
verdicts: a failed compile anywhere, or a spill in a launch of the trainer's layout
(channels-last-3d) on sm_90a, is an error naming the kernel, the config, the Triton version and
the compiler's message. ``python -m fastgait.compile_gate`` writes docs/KERNELS.md from the same
compiles.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from .capture import DTYPES, Launch, Scenario, capture, kernels_dir, merge

REPO = Path(__file__).resolve().parents[2]
# The GPU machines run Triton 3.6.0: a copy of it lives in its own folder (kernels/ imports only
# triton, so it can compile them beside the installed one). .ci/run installs it there.
TRITON36_DIR = Path(os.environ.get("FASTGAIT_TRITON36", REPO / ".triton-3.6.0"))
SM90, SM80 = 90, 80
HOT_LAYOUT = "channels_last_3d"  # the trainer's layout: spills there fail the gate


def triton_versions() -> dict[str, Optional[Path]]:
    """``{label: folder to put first on PYTHONPATH}`` (None: the installed Triton)."""
    return {"installed": None, "3.6.0": TRITON36_DIR}


def triton36_available() -> bool:
    return (TRITON36_DIR / "triton" / "__init__.py").exists()


def triton_version(triton_dir: Optional[Path]) -> str:
    """The version of the installed Triton (None) or of the one in ``triton_dir``."""
    if triton_dir is None:
        import triton

        return triton.__version__
    text = (Path(triton_dir) / "triton" / "__init__.py").read_text()
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return found.group(1) if found else "unknown"


def _distinct_recipes() -> list[str]:
    """The recipes a GPU runs (not the CPU demo), one per distinct model and batch."""
    from fastgait.config import available_configs, load_config

    seen, out = set(), []
    for name in available_configs():
        if name == "demo_cpu":
            continue
        config = load_config(name)
        train = config["train"]
        key = json.dumps([config["model"], train["P"], train["K"], train.get("clip_len")], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def _uses_engine(recipe: str) -> bool:
    """Whether the recipe's model has blocks that run the row-cut engine (MLA, GL), whose
    designs get scenarios of their own."""
    from fastgait.config import load_config
    from fastgait.models import build_model
    from fastgait.nn import MLA, GLConv

    from .capture import _model_config

    model = build_model(_model_config(load_config(recipe)))
    return any(isinstance(module, (MLA, GLConv)) for module in model.modules())


def scenarios() -> list[Scenario]:
    """Every recipe in bf16/fp16/fp32 training and bf16/fp32 evaluation in the trainer's layout,
    contiguous inputs, each design of the row-cut engine, and each ReverseMaskNet block."""
    from fastgait.config import load_config
    from fastgait.models.reverse_mask import BLOCK_TYPES
    from fastgait.ops.mla import DESIGNS, FALLBACK_DESIGN

    out = []
    for recipe in _distinct_recipes():
        out += [Scenario(recipe, dtype, "train") for dtype in DTYPES]
        out += [Scenario(recipe, dtype, "eval") for dtype in ("bf16", "fp32")]
        out += [Scenario(recipe, "bf16", "train", channels_last=False), Scenario(recipe, "fp32", "eval", channels_last=False)]
        model = load_config(recipe)["model"]["name"]
        if _uses_engine(recipe):
            # The default design, "auto", runs FALLBACK_DESIGN on fake tensors (it cannot time
            # there): the other designs get their own scenarios, so that every launch "auto" may
            # make on a GPU is captured (the MLA and GL blocks alike).
            for design in DESIGNS:
                if design != FALLBACK_DESIGN:
                    out += [Scenario(recipe, dtype, "train", design=design) for dtype in DTYPES]
                    out += [Scenario(recipe, "bf16", "eval", design=design),
                            Scenario(recipe, "bf16", "train", channels_last=False, design=design)]
        if model == "ReverseMaskNet":
            default_block = load_config(recipe)["model"].get("block")
            out += [Scenario(recipe, "bf16", "train", overrides=(("model.block", block),))
                    for block in BLOCK_TYPES if block != default_block]
    return out


def launches(selected: Optional[list[Scenario]] = None) -> tuple[list[Launch], dict[str, set]]:
    """Distinct launches of the scenarios, and the fastgait ops each scenario called."""
    recorded, ops = [], {}
    for scenario in selected if selected is not None else scenarios():
        found, called = capture(scenario)
        recorded += found
        ops[scenario.name] = called
    return merge(recorded), ops


def _cache_dir() -> Path:
    base = Path(os.environ.get("FASTGAIT_CACHE", Path.home() / ".cache" / "fastgait"))
    return base / "compile-gate"


def _source_digest(kernels: Path) -> str:
    """The kernel sources and the worker's (a changed worker reports other fields)."""
    digest = hashlib.sha1(Path(__file__).with_name("worker.py").read_bytes())
    for path in sorted(kernels.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def compile_launches(found: list[Launch], capability: int, triton_dir: Optional[Path] = None,
                     workers: Optional[int] = None, kernels: Optional[Path] = None,
                     use_cache: bool = True, always_compile: bool = True) -> dict[str, dict]:
    """``{launch key: result}`` for every launch, compiled in ``workers`` processes.

    Results are cached by (kernel sources, launch, Triton folder, capability) under
    ``$FASTGAIT_CACHE/compile-gate`` so an unchanged kernel is not compiled twice on one machine.
    """
    kernels = kernels or kernels_dir()
    cache_file = _cache_dir() / (f"{_source_digest(kernels)}-{capability}-"
                                 f"{triton_version(triton_dir)}.json")
    cached: dict[str, dict] = {}
    if use_cache and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    todo = [launch for launch in found if launch.key not in cached]
    fresh = _compile(todo, capability, triton_dir, workers, kernels, always_compile) if todo else {}
    if use_cache and fresh:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**cached, **fresh}))
        os.replace(tmp, cache_file)
    return {launch.key: (fresh.get(launch.key) or cached[launch.key]) for launch in found}


def _compile(found: list[Launch], capability: int, triton_dir: Optional[Path], workers: Optional[int],
             kernels: Path, always_compile: bool = True) -> dict[str, dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if always_compile:
        env["TRITON_ALWAYS_COMPILE"] = "1"  # no cache hits: ptxas must run to report registers
    else:
        env.pop("TRITON_ALWAYS_COMPILE", None)
    env.pop("PYTHONPATH", None)
    if triton_dir is not None:
        env["PYTHONPATH"] = str(triton_dir)
    workers = workers or max(1, min(len(found), os.cpu_count() or 1))
    chunks = [found[i::workers] for i in range(workers)]
    worker = Path(__file__).with_name("worker.py")

    def run(chunk: list[Launch]) -> list[dict]:
        if not chunk:
            return []
        jobs = "".join(json.dumps(launch.as_job()) + "\n" for launch in chunk)
        proc = subprocess.run([sys.executable, str(worker), str(capability), str(kernels)], input=jobs,
                              capture_output=True, text=True, env=env, cwd=str(Path(worker).parent))
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or len(results) != len(chunk):
            raise RuntimeError(f"the compile worker (Triton at {triton_dir or 'installed'}) stopped: "
                               f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return results

    with ThreadPoolExecutor(workers) as pool:
        results = [r for part in pool.map(run, chunks) for r in part]
    return {r["key"]: r for r in results}


def config_label(launch: Launch) -> str:
    """The launch's config in one line: its constexprs and options, and the argument dtypes."""
    dtypes = sorted({a["tensor"] for a in launch.args if isinstance(a, dict)})
    options = ", ".join(f"{k}={v}" for k, v in launch.describe().items())
    return f"{options}; tensors {'/'.join(dtypes)}"


def check(found: list[Launch], results: dict[str, dict], version: str, capability: int,
          spill_free: bool) -> list[str]:
    """The gate's errors: failed compiles, and spills in trainer-layout launches when ``spill_free``."""
    errors = []
    for launch in found:
        result = results[launch.key]
        where = (f"{launch.kernel} (fastgait.kernels.{launch.module}, op {launch.op}) [{config_label(launch)}] "
                 f"with Triton {result['triton']} ({version}) for sm_{capability}")
        if not result["ok"]:
            errors.append(f"{where} does not compile, first in scenario '{launch.scenarios[0]}':\n{result['error']}")
            continue
        spills = (result["spill_stores"] or 0) + (result["spill_loads"] or 0)
        hot = any(HOT_LAYOUT in s for s in launch.scenarios)
        if spill_free and hot and spills:
            errors.append(f"{where} spills ({result['spill_stores']} B stored, {result['spill_loads']} B loaded, "
                          f"{result['registers']} registers) in the trainer's layout, scenario '{launch.scenarios[0]}'")
    return errors


def warm(capability: int, workers: Optional[int] = None) -> tuple[int, int]:
    """Compile every launch of the trainer's layout (all dtypes, train and eval) for
    ``capability`` with the installed Triton, in ``workers`` processes, into Triton's own cache
    (``~/.triton/cache`` or ``$TRITON_CACHE_DIR``).

    The worker compiles a launch exactly as ``kernel[grid](...)`` would (Triton's binder and
    ``_pack_args``, the same ``triton.compile`` call), so the cache entries are the ones the
    kernels look up at run time: on a GPU machine, tests and benchmarks that run afterwards (or
    meanwhile) load them instead of compiling one kernel at a time. Launches at other shapes
    (the tests' small batches) may specialise differently and still compile when they run.
    Returns ``(launches, failures)``.
    """
    selected = [s for s in scenarios() if s.channels_last]
    found, _ = launches(selected)
    results = compile_launches(found, capability, None, workers, use_cache=False, always_compile=False)
    return len(found), sum(not r.get("ok") for r in results.values())
