"""``python -m bench.report``: ``docs/PERFORMANCE.md`` and its plots from every ``bench/results/*.json``.

    python -m bench.report                      # bench/results -> docs/PERFORMANCE.md, docs/performance/*.png
    python -m bench.report --results DIR --out FILE --plots DIR
    python -m bench.report --summary [FILE]     # a short table of one results file (default: the newest)
    python -m bench.report --synthetic FILE     # write a made-up results file (tests the pipeline)

Tables put each measured ratio beside its target of performance.md §3 (met / not met); every
ratio compares two rows of the same run. Plots need matplotlib (skipped with a note without it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from bench import _results
from bench._results import BASELINES, TARGETS, evaluate

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROVIDER_ORDER = ("reference-eager", "reference-compiled", "torch", "triton-hybrid", "triton-hybrid2d", "triton-gemm",
                  "triton-auto", "triton-unchunked", "triton", "fastgait-eager", "fastgait")
DESIGN_ORDER = ("hybrid", "hybrid2d", "gemm")  # the row-cut engine's designs, as fastgait.ops.conv_engine.DESIGNS
OPS = (("mla_conv3d", "Fused MLA block (`mla_conv3d`)"),
       ("conv3x3x3", "The MLA blocks' stacked 3x3x3 convolution in the vendor's forms (`bench/test_conv_forms.py`)"),
       ("gem_hpp", "GeM over strips with temporal max (`gem_hpp`)"),
       ("triplet_loss", "Batch-all triplet loss (`triplet_loss`)"))
KIND_NOTE = {
    "synthetic": "**SYNTHETIC: made-up numbers that test the report pipeline, not a measurement.**",
    "dry-run": "**DRY RUN at tiny shapes: not a performance figure.**",
    "smoke": "**SMOKE at tiny shapes: not a performance figure.**",
}
HOW_TO_MEASURE = (
    "How to measure:",
    "",
    "- `bash bench/run_gpu.sh`: on a GPU machine, in under 10 minutes: the GPU tests (bf16 parity at real "
    "shapes), `pytest bench --benchmark`, this page; results and logs also go to `$OUT` when it is set.",
    "- `pytest bench --benchmark`: the measurements alone, at the papers' shapes, into "
    "`bench/results/<date>-<gpu>.json` (the fused ops against their references, eager and compiled, fwd, bwd "
    "and fwd+bwd; whole training steps; loader throughput).",
    "- `python -m pytest bench`: the smoke at tiny shapes that CI runs; it checks the harness and that every "
    "provider agrees with the reference, and is not a performance figure. `FASTGAIT_BENCH_SHRINK=1 pytest "
    "bench --benchmark` runs the full path at tiny shapes (a dry run; on a CPU, `--benchmark` alone does).",
    "- `python -m bench.report`: this page and `docs/performance/*.png` from every results file.",
)
HOW_TO_READ = """\
How to read: times are medians of CUDA-event timings fed through pytest-benchmark, after
warm-up and compilation, with inputs rotated among sets larger than the L2 cache. Speed-up =
the reference's time / this time, both from the same run (*vs eager*: the reference in eager
PyTorch with bf16 autocast and channels-last-3d; *vs compiled*: the same under
`torch.compile`). Memory ratio = peak memory above the inputs / the eager reference's.
% floor = floor time / time, the floor being the larger of FLOPs over the bf16 matrix rate and
bytes over the copy bandwidth, both measured in the same run (band-aware FLOPs for MLA:
each pair as one convolution plus the boundary rows)."""


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".3g", suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:{spec}}{suffix}"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(met: Optional[bool]) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


def provider_rank(row: dict) -> tuple:
    provider = row["provider"]
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER), provider


def ordered(rows: list[dict]) -> list[dict]:
    """Rows in file order of configs and passes, providers in a fixed order."""
    configs = list(dict.fromkeys(row["config"] for row in rows))
    passes = _results.PASSES
    return sorted(rows, key=lambda r: (configs.index(r["config"]), passes.index(r["pass"]), provider_rank(r)))


def mib(value) -> Optional[float]:
    return None if value is None else value / 2**20


def time_cell(row: dict) -> str:
    """The median, with the quartiles."""
    if row.get("median_ms") is None:
        return "—"
    spread = f" ({row['q1_ms']:.3g}–{row['q3_ms']:.3g})" if row.get("q1_ms") is not None else ""
    return f"{row['median_ms']:.3g}{spread}"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def targets_only() -> list[str]:
    return table(["target (performance.md §3)", "wanted"], ([t.text, t.wanted] for t in TARGETS))


def targets_table(rows: list[dict], short: bool = False) -> list[str]:
    """Each target beside each row it judges; ``short``: the targets' labels, not their text."""
    return table(
        ["target (performance.md §3)", "config", "provider", "measured", "wanted", "verdict"],
        (
            [e.target.label if short else e.target.text, e.row["config"] if e.row else "—",
             e.row["provider"] if e.row else "—", fmt(e.value, ".3g", e.target.unit), e.target.wanted, verdict(e.met)]
            for e in evaluate(rows)
        ),
    )


def op_section(rows: list[dict], op: str, title: str) -> list[str]:
    """One line per config and provider: the three passes' times, then fwd+bwd's ratios, memory and rates."""
    rows = ordered([row for row in rows if row["op"] == op])
    if not rows:
        return []
    by_pass = {(r["config"], r["provider"], r["pass"]): r for r in rows}
    header = ["config", "provider", "fwd ms", "bwd ms", "fwd+bwd ms (q1–q3)", "speed-up vs eager", "vs compiled",
              "peak MiB", "memory vs eager", "TFLOP/s", "% floor", "rel. error"]
    body = []
    for config, provider in dict.fromkeys((r["config"], r["provider"]) for r in rows):
        both = by_pass.get((config, provider, "fwd+bwd"), {})
        median = [by_pass.get((config, provider, p), {}).get("median_ms") for p in ("fwd", "bwd")]
        body.append([
            config, provider, fmt(median[0]), fmt(median[1]), time_cell(both),
            fmt(both.get("speedup_eager"), ".2f", "×"), fmt(both.get("speedup_compiled"), ".2f", "×"),
            fmt(mib(both.get("peak_mem_bytes")), ".4g"), fmt(both.get("memory_ratio_eager"), ".2f", "×"),
            fmt(both.get("tflops"), ".3g"), fmt(both.get("pct_floor"), ".1f"), fmt(both.get("rel_error"), ".1e"),
        ])
    return [f"### {title}", ""] + table(header, body) + [""]


def step_section(rows: list[dict]) -> list[str]:
    rows = ordered([row for row in rows if row["op"] == "train_step"])
    if not rows:
        return []
    header = ["model", "provider", "step ms (q1–q3)", "sequences/s", "vs eager reference", "vs compiled reference",
              "% band-aware floor", "TFLOP/s", "peak GiB", "compile s", "80k iterations (h)"]
    body = (
        [r["config"], r["provider"], time_cell(r), fmt(r.get("throughput"), ".4g"),
         fmt(r.get("speedup_eager"), ".2f", "×"), fmt(r.get("speedup_compiled"), ".2f", "×"),
         fmt(r.get("pct_floor"), ".1f"), fmt(r.get("tflops"), ".3g"),
         fmt(None if r.get("peak_mem_total_bytes") is None else r["peak_mem_total_bytes"] / 2**30, ".3g"),
         fmt(r.get("compile_s"), ".0f"), fmt(r.get("projected_80k_h"), ".2f")]
        for r in rows
    )
    note = ("Whole training step: forward under autocast, triplet loss, backward, Adam. "
            "Band-aware floor: PyTorch's FLOP count of the `impl=\"torch\"` model over the bf16 matrix rate.")
    return ["### Whole training step", "", note, ""] + table(header, body) + [""]


def data_section(rows: list[dict]) -> list[str]:
    rows = ordered([row for row in rows if row["op"] == "data_loader"])
    if not rows:
        return []
    header = ["config", "provider", "ms per batch (q1–q3)", "sequences/s", "vs fastgait GaitMask step"]
    body = (
        [r["config"], r["provider"], time_cell(r), fmt(r.get("throughput"), ".4g"), fmt(r.get("loader_vs_step"), ".2f", "×")]
        for r in rows
    )
    return ["### Data loading", ""] + table(header, body) + [""]


def _block(entry: dict) -> str:
    """A row-cut engine call in words: geometry and cut size, fusion, terms."""
    parts = [f"{entry.get('geometry')} {entry.get('size')}",
             entry.get("fuse") if entry.get("has_global") else "local only", entry.get("terms")]
    if not entry.get("cut", True):
        parts.append("no cut rows")
    return ", ".join(str(p) for p in parts)


def design_section(rows: list[dict]) -> list[str]:
    """What the row-cut engine's ``design="auto"`` chose per block shape and direction (rows'
    ``design_choices``: the fused-op benches' ``triton-auto`` and the training steps)."""
    found: dict[tuple, dict] = {}
    providers: dict[tuple, list[str]] = {}
    for row in ordered([r for r in rows if r.get("design_choices")]):
        for entry in row["design_choices"]:
            fields = tuple(json_key(entry.get(k)) for k in ("direction", "x_shape", "dtype", "layout", "c_out",
                                                          "has_global", "fuse", "terms", "geometry", "size", "cut"))
            key = (row["config"], fields)
            found.setdefault(key, entry)
            if entry.get("how") == "timed":  # a timed entry beats an untimed one
                found[key] = entry if found[key].get("how") != "timed" else found[key]
            providers.setdefault(key, [])
            if row["provider"] not in providers[key]:
                providers[key].append(row["provider"])
    if not found:
        return []
    designs = list(dict.fromkeys(d for e in found.values() for d in (e.get("timings_ms") or {})))
    designs.sort(key=lambda d: (DESIGN_ORDER.index(d) if d in DESIGN_ORDER else len(DESIGN_ORDER), d))
    header = ["config", "providers", "pass", "x [n, c_in, t, h, w]", "c_out", "block", "dtype, layout", "chosen",
              *[f"{d} ms" for d in designs], "how"]
    body = []
    for (config, _), entry in found.items():
        timings = entry.get("timings_ms") or {}
        body.append([
            config, ", ".join(providers[(config, _)]), str(entry.get("direction")),
            "×".join(str(v) for v in entry.get("x_shape") or []), str(entry.get("c_out")), _block(entry),
            f"{entry.get('dtype')}, {entry.get('layout')}", f"**{entry.get('choice')}**",
            *[fmt(timings.get(d), ".3g") for d in designs], str(entry.get("how")),
        ])
    note = ("The row-cut engine's default design, `auto`, times every design on a shape's first call and keeps the "
            "fastest, the forward (`fwd`) and the backward (`bwd`) apart; ms: median of its CUDA-event timings.")
    return ["### Design chosen per shape", "", note, ""] + table(header, body) + [""]


def json_key(value):
    return tuple(value) if isinstance(value, list) else value


def environment_lines(data: dict) -> list[str]:
    env = data["environment"]
    commit = (env.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if env.get("dirty") else "")
    lines = [
        f"GPU {env.get('gpu') or 'none'} · driver {env.get('driver') or '—'} · CUDA {env.get('cuda') or '—'} · "
        f"torch {env.get('torch')} · triton {env.get('triton') or '—'} · Python {env.get('python')} · "
        f"commit `{commit}` · sources `{env.get('source_digest')}` · "
        f"default MLA design `{env.get('mla_default_design') or '—'}`"
        + (f" (`FASTGAIT_CONV_DESIGN={env['conv_design_override']}`)" if env.get("conv_design_override") else ""),
    ]
    for run in data["runs"]:
        ceilings = run.get("ceilings") or {}
        lines.append(
            f"Run {run['id']} (`{' '.join(run.get('argv') or [])}`, torch.compile backend {run.get('compile_backend')}): "
            f"bf16 matrix rate {fmt(ceilings.get('matmul_bf16_tflops'), '.0f')} TFLOP/s, "
            f"fp32/TF32 {fmt(ceilings.get('matmul_fp32_tflops'), '.0f')} TFLOP/s, "
            f"copy {fmt(ceilings.get('copy_gbps'), '.0f')} GB/s (measured)."
        )
    return [line + "  " for line in lines[:-1]] + lines[-1:]


def profile_section(data: dict) -> list[str]:
    """Where the step's time goes: the per-kernel profiles of ``bench/test_profile.py``."""
    lines = []
    for name, profile in (data.get("profiles") or {}).items():
        lines += [f"### Where the time goes: {name} ({profile['dtype']}), top {len(profile['kernels'])} "
                  f"{profile['unit']}", "",
                  f"`torch.profiler` over {profile['steps']} steps after warm-up: "
                  f"{fmt(profile['total_ms_per_step'])} ms of {profile['unit']} per step in all; "
                  "share = of that total.", ""]
        lines += table(["#", "kernel", "calls/step", "ms/step", "share"], (
            [str(i + 1), f"`{k['name'][:90]}`", fmt(k["calls_per_step"]), fmt(k["ms_per_step"]),
             fmt(100 * k["share"] if k["share"] is not None else None, ".1f", " %")]
            for i, k in enumerate(profile["kernels"])))
        lines.append("")
    return lines


def file_section(stem: str, data: dict, plot_links: list[str]) -> list[str]:
    env, rows = data["environment"], data["rows"]
    lines = [f"## {env.get('date')} · {env.get('gpu') or 'CPU'} (`{stem}.json`)", ""]
    if data["kind"] in KIND_NOTE:
        lines += [KIND_NOTE[data["kind"]], ""]
    lines += environment_lines(data) + ["", "### Targets", ""] + targets_table(rows) + [""]
    for op, title in OPS:
        lines += op_section(rows, op, title)
    lines += step_section(rows) + design_section(rows) + profile_section(data) + data_section(rows)
    lines += [f"![{Path(link).stem}]({link})" for link in plot_links]
    return lines + [""]


def render(results: list[tuple[str, dict]], plot_links: dict[str, list[str]]) -> str:
    """The whole page: ``results`` are ``(stem, data)``, newest first; ``plot_links`` per stem."""
    lines = [
        "# Performance",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json`: do not edit by hand. The targets "
        "are those of the performance design (performance.md §3); [profiling.md](profiling.md) shows one "
        "training step's NVTX ranges in Nsight Systems.",
        "",
        *HOW_TO_MEASURE,
        "",
    ]
    if not any(data["kind"] == "gpu" for _, data in results):
        lines += [
            "## No GPU results yet",
            "",
            "No benchmark has been run on a GPU yet, so this page holds no measurement. The harness and its CPU smoke "
            "(`python -m pytest bench`, tiny shapes, not a performance figure) are in place; these targets wait for "
            "`bash bench/run_gpu.sh` on an H100 or H200:",
            "",
            *targets_only(),
            "",
        ]
    if results:
        lines += [HOW_TO_READ, ""]
    for stem, data in results:
        lines += file_section(stem, data, plot_links.get(stem, []))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_names(stem: str) -> list[str]:
    return [f"{stem}-ops.png", f"{stem}-step.png"]


def _bars(ax, groups: list[str], series: dict[str, list[Optional[float]]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        positions = [g + i * width for g in range(len(groups))]
        ax.bar(positions, [float("nan") if v is None else v for v in values], width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def write_plots(stem: str, data: dict, folder: Path) -> list[Path]:
    """Fused ops' fwd+bwd speed-up over the eager reference, and step throughput; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = data["rows"]
    note = "" if data["kind"] == "gpu" else f" [{data['kind'].upper()}: not a measurement]"
    paths = [folder / name for name in plot_names(stem)]

    ops = ordered([r for r in rows if r["pass"] == "fwd+bwd" and r["provider"] != BASELINES["eager"]])
    groups = list(dict.fromkeys(f"{r['op']}\n{r['config']}" for r in ops))
    providers = sorted({r["provider"] for r in ops}, key=lambda p: provider_rank({"provider": p}))
    lookup = {(f"{r['op']}\n{r['config']}", r["provider"]): r.get("speedup_eager") for r in ops}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _bars(ax, groups, {p: [lookup.get((g, p)) for g in groups] for p in providers})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs eager reference (fwd+bwd, log)")
    ax.set_title(f"Fused ops, {data['environment'].get('gpu') or 'CPU'}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    steps = ordered([r for r in rows if r["op"] == "train_step"])
    models = list(dict.fromkeys(r["config"] for r in steps))
    providers = sorted({r["provider"] for r in steps}, key=lambda p: provider_rank({"provider": p}))
    lookup = {(r["config"], r["provider"]): r.get("throughput") for r in steps}
    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, models, {p: [lookup.get((m, p)) for m in models] for p in providers})
    ax.set_ylabel("sequences / s (training step)")
    ax.set_title(f"Whole training step, {data['environment'].get('gpu') or 'CPU'}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Synthetic results (to prove the pipeline before a GPU run)
# ---------------------------------------------------------------------------------------------


def synthetic_choices(config: str) -> list[dict]:
    """Made-up ``design_choices`` of a row: one MLA-A block shape, forward and backward."""
    block = {"op": "cut_conv3d", "x_shape": [128, 32, 10, 64, 44], "dtype": "bfloat16", "layout": "channels_last_3d",
             "c_out": 64, "has_global": True, "fuse": "add", "terms": "pair", "geometry": "band", "size": 25,
             "cut": True, "device": "Synthetic GPU", "how": "timed"}
    return [dict(block, direction="fwd", choice="gemm", timings_ms={"hybrid": 1.2, "gemm": 1.0}),
            dict(block, direction="bwd", choice="hybrid", timings_ms={"hybrid": 2.1, "gemm": 2.6})]


def synthetic_results() -> dict:
    """A results file with made-up, plausible numbers for every op, pass, provider, step and loader."""
    run = "synthetic-run"
    ceilings = {"matmul_bf16_tflops": 790.0, "matmul_fp32_tflops": 400.0, "copy_gbps": 3000.0}
    speed = {"reference-eager": 1.0, "reference-compiled": 1.2, "torch": 1.3, "triton-hybrid": 1.9,
             "triton-gemm": 1.6, "triton-auto": 2.0, "triton": 6.0, "fastgait-eager": 1.6, "fastgait": 2.4}
    rows = []

    def add(op, config, provider, pass_, base_ms, flops, **extra):
        median = base_ms / speed[provider]
        floor_ms = flops / (ceilings["matmul_bf16_tflops"] * 1e12) * 1e3
        rows.append({
            "run": run, "op": op, "config": config, "provider": provider, "pass": pass_, "dtype": "bfloat16",
            "performance_figure": False, "median_ms": median, "mean_ms": median * 1.01, "min_ms": median * 0.98,
            "max_ms": median * 1.05, "q1_ms": median * 0.99, "q3_ms": median * 1.02, "rounds": 20,
            "peak_mem_bytes": int(2**30 * base_ms / 10 / speed[provider] ** 2), "flops": flops,
            "flops_executed": flops, "bytes": 0.0, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / median,
            "tflops": flops / median / 1e9, "rel_error": 3e-3, **extra,
        })

    for op, configs, providers in (
        ("mla_conv3d", ("casia-b MLA-A 32-64 10x64x44", "casia-b MLA-B 128-128 10x32x22"),
         ("reference-eager", "reference-compiled", "torch", "triton-hybrid", "triton-gemm", "triton-auto")),
        ("gem_hpp", ("casia-b GaitMask 128x10x64x22",), ("reference-eager", "reference-compiled", "triton")),
        ("triplet_loss", ("casia-b 8x16 c128 p64", "32x8 c128 p64"), ("reference-eager", "reference-compiled", "triton")),
    ):
        for config in configs:
            for scale, pass_ in ((1, "fwd"), (2, "bwd"), (3, "fwd+bwd")):
                for provider in providers:
                    extra = {"design_choices": synthetic_choices(config)} if provider == "triton-auto" else {}
                    add(op, config, provider, pass_, 4.0 * scale, 1.2e12 * scale, **extra)
    for model in ("GaitMask casia-b", "ReverseMaskNet casia-b inception", "GaitGL casia-b"):
        for provider in ("reference-eager", "reference-compiled", "fastgait-eager", "fastgait"):
            fused = provider.startswith("fastgait") and model == "GaitMask casia-b"
            extra = {"design_choices": synthetic_choices(model)} if fused else {}
            add("train_step", model, provider, "step", 60.0, 9.7e12, throughput=128 / (0.06 / speed[provider]),
                **extra)
    for workers, rate in ((0, 900.0), (4, 3500.0), (8, 6000.0)):
        rows.append({"run": run, "op": "data_loader", "config": "casia-b 8x16", "provider": f"workers={workers}",
                     "pass": "load", "median_ms": 128e3 / rate, "throughput": rate})
    environment = {"date": "2000-01-01", "gpu": "Synthetic GPU", "driver": "0", "cuda": "0", "torch": "0",
                   "triton": "0", "python": "3", "commit": "0" * 40, "dirty": False, "source_digest": "synthetic"}
    data = {"schema": _results.SCHEMA, "kind": "synthetic", "environment": environment,
            "runs": [{"id": run, "argv": ["synthetic"], "compile_backend": "none", "ceilings": ceilings}],
            "rows": rows}
    _results.finalise(rows)
    return data


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def build(results_dir: Path, out: Path, plots_dir: Path) -> str:
    """Write ``out`` (and the plots) from every results file of ``results_dir``; returns the page."""
    results = [(path.stem, _results.load(path)) for path in _results.results_files(results_dir)]
    links: dict[str, list[str]] = {}
    for stem, data in results:
        try:
            paths = write_plots(stem, data, plots_dir)
        except ImportError:
            print("matplotlib is not installed: no plots", file=sys.stderr)
            break
        links[stem] = [Path(os.path.relpath(p, out.parent)).as_posix() for p in paths]
    page = render(results, links)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return page


def summary(data: dict) -> str:
    """Targets, then the steps: what a GPU run prints last."""
    env = data["environment"]
    lines = [f"{env.get('gpu')} · torch {env.get('torch')} · triton {env.get('triton')} · commit {(env.get('commit') or '?')[:12]}"]
    if data["kind"] in KIND_NOTE:
        lines.append(KIND_NOTE[data["kind"]].strip("*"))
    lines += targets_table(data["rows"], short=True) + [""] + step_section(data["rows"])[4:]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=_results.RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--out", type=Path, default=DOCS / "PERFORMANCE.md", help="the page to write")
    parser.add_argument("--plots", type=Path, default=DOCS / "performance", help="folder of the PNG plots")
    parser.add_argument("--summary", nargs="?", const="newest", metavar="FILE",
                        help="print a short table of one results file (default: the newest) and exit")
    parser.add_argument("--synthetic", type=Path, metavar="FILE", help="write a synthetic results file and exit")
    args = parser.parse_args(argv)
    if args.synthetic:
        _results.save(args.synthetic, synthetic_results())
        print(f"wrote {args.synthetic} (synthetic: not a measurement)")
        return 0
    if args.summary:
        files = _results.results_files(args.results) if args.summary == "newest" else [Path(args.summary)]
        if not files:
            print(f"no results in {args.results}")
            return 1
        print(summary(_results.load(files[0])))
        return 0
    build(args.results, args.out, args.plots)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
