"""Benchmark results as data: the row schema, ratios against the baselines, the targets of
performance.md §3, and reading/writing ``bench/results/*.json``.

Used by the harness (while measuring) and by ``bench/report.py`` (afterwards); nothing here
touches a GPU, so the report runs anywhere.

A results file::

    {"schema": 1, "kind": "gpu" | "dry-run" | "smoke" | "synthetic",
     "environment": {gpu, driver, cuda, torch, triton, python, commit, source_digest, date, ...},
     "runs": [{"id", "started", "argv", "compile_backend", "ceilings": {...}}],
     "rows": [row, ...]}

A row (one measurement; ``None`` where a field does not apply):

- identity: ``run``, ``op``, ``config`` (the paper shape's name), ``provider``, ``pass``
  (``fwd`` | ``bwd`` | ``fwd+bwd`` | ``step`` | ``load``), ``shape`` (dict), ``dtype``;
- time: ``median_ms`` (the figure), ``mean_ms``, ``min_ms``, ``max_ms``, ``q1_ms``, ``q3_ms``, ``rounds``;
- memory: ``peak_mem_bytes`` (peak above what was allocated before the call), ``peak_mem_total_bytes``;
- work: ``flops`` (the useful, band-aware count: the floor), ``flops_executed`` (what this
  provider computes), ``bytes`` (fewest bytes moved), ``floor_ms``, ``pct_floor``, ``tflops``
  (executed FLOPs over time), ``throughput`` (sequences/s, steps and loaders);
- checks: ``rel_error`` (against the reference, same inputs), ``compile_s``;
- ``design_choices`` (rows that ran the row-cut engine with ``design="auto"``, else None): one
  entry per block shape and direction: the key's fields (``direction``, ``x_shape``, ``dtype``,
  ``layout``, ``c_out``, ``has_global``, ``fuse``, ``terms``, ``geometry``, ``size``, ``cut``,
  ``device``), ``choice``, ``timings_ms`` (per design) and ``how`` (``timed``, ``cached``, ``env``,
  or why it was not timed);
- derived by :func:`finalise` against baselines of the same run: ``time_ratio_eager``,
  ``speedup_eager``, ``memory_ratio_eager`` (and ``*_compiled``), ``projected_80k_h``,
  ``loader_vs_step``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINES = {"eager": "reference-eager", "compiled": "reference-compiled"}
PASSES = ("fwd", "bwd", "fwd+bwd", "step", "load")

# The whole-step and loader figures the end-to-end target is judged on.
HEADLINE_STEP = ("GaitMask casia-b", "fastgait")
RECIPE_ITERATIONS = 80_000  # the CASIA-B recipe (configs/gaitmask_casia-b.yaml)


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def row_key(row: dict) -> tuple:
    return row.get("run"), row["op"], row["config"], row["provider"], row["pass"]


def _ratio(numerator, denominator) -> Optional[float]:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def finalise(rows: list[dict]) -> list[dict]:
    """Fill the derived fields of every row in place (idempotent); returns ``rows``.

    Ratios pair a row with the baseline of the same run, op, config and pass, so a ratio
    always compares two numbers taken side by side.
    """
    index = {row_key(row): row for row in rows}
    for row in rows:
        for name, provider in BASELINES.items():
            base = index.get((row.get("run"), row["op"], row["config"], provider, row["pass"]))
            base_ms = base and base.get("median_ms")
            row[f"time_ratio_{name}"] = _ratio(row.get("median_ms"), base_ms)
            row[f"speedup_{name}"] = _ratio(base_ms, row.get("median_ms"))
            row[f"memory_ratio_{name}"] = _ratio(row.get("peak_mem_bytes"), base and base.get("peak_mem_bytes"))
        if row["pass"] == "step" and row.get("median_ms"):
            row["projected_80k_h"] = RECIPE_ITERATIONS * row["median_ms"] / 3.6e6
    for row in rows:
        if row["pass"] == "load":
            step = index.get((row.get("run"), "train_step", *HEADLINE_STEP, "step"))
            row["loader_vs_step"] = _ratio(row.get("throughput"), step and step.get("throughput"))
    return rows


# ---------------------------------------------------------------------------------------------
# Targets (performance.md §3)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One line of performance.md §3: rows of ``op``/``pass``/``providers`` (configs starting
    with ``config_prefix``) must have ``field`` at most (``bound="max"``) or at least ``threshold``.
    ``label``: a few words for the summary a GPU run prints; ``text``: the target in full."""

    label: str
    text: str
    op: str
    pass_: str
    providers: tuple[str, ...]
    field: str
    bound: str
    threshold: float
    config_prefix: str = ""
    unit: str = "×"

    def matches(self, row: dict) -> bool:
        return (
            row["op"] == self.op
            and row["pass"] == self.pass_
            and row["provider"] in self.providers
            and row["config"].startswith(self.config_prefix)
        )

    def met(self, value: Optional[float]) -> Optional[bool]:
        if value is None or math.isnan(value):
            return None
        return value <= self.threshold if self.bound == "max" else value >= self.threshold

    @property
    def wanted(self) -> str:
        sign = "≤" if self.bound == "max" else "≥"
        return f"{sign} {self.threshold:g}{self.unit}"


MLA_DESIGNS = ("triton-hybrid", "triton-hybrid2d", "triton-gemm", "triton-auto")
TARGETS = (
    Target("MLA time / eager ref", "Fused MLA block, fwd+bwd, bf16, CASIA-B shapes: time vs reference eager "
           "(cuDNN, channels-last-3d, autocast bf16)", "mla_conv3d", "fwd+bwd", MLA_DESIGNS,
           "time_ratio_eager", "max", 0.6, "casia-b"),
    Target("MLA time / compiled ref", "Fused MLA block, fwd+bwd: time vs torch.compile'd reference", "mla_conv3d",
           "fwd+bwd", MLA_DESIGNS, "time_ratio_compiled", "max", 0.8, "casia-b"),
    Target("MLA memory / eager ref", "Fused MLA block, fwd+bwd: peak memory vs reference eager", "mla_conv3d",
           "fwd+bwd", MLA_DESIGNS, "memory_ratio_eager", "max", 0.5, "casia-b"),
    Target("GeM speed-up", "GeM over strips with temporal max, fwd+bwd: speed-up vs reference", "gem_hpp",
           "fwd+bwd", ("triton",), "speedup_eager", "min", 10.0),
    Target("GeM % memory floor", "GeM over strips with temporal max, fwd+bwd: share of its memory floor (input "
           "read once, gradient written once)", "gem_hpp", "fwd+bwd", ("triton",), "pct_floor", "min", 30.0,
           unit="%"),
    Target("triplet speed-up", "Batch-all triplet, fwd+bwd, 64 parts: speed-up vs reference", "triplet_loss",
           "fwd+bwd", ("triton",), "speedup_eager", "min", 5.0),
    Target("step vs eager ref", "Whole training step, GaitMask CASIA-B: fastgait throughput vs reference eager (AMP)",
           "train_step", "step", ("fastgait",), "speedup_eager", "min", 2.0, "GaitMask casia-b"),
    Target("step vs compiled ref", "Whole training step, GaitMask CASIA-B: fastgait throughput vs compiled "
           "reference (AMP)", "train_step", "step", ("fastgait",), "speedup_compiled", "min", 1.3, "GaitMask casia-b"),
    Target("step % FLOP floor", "Whole training step, GaitMask CASIA-B: share of the band-aware FLOP floor",
           "train_step", "step", ("fastgait",), "pct_floor", "min", 50.0, "GaitMask casia-b", unit="%"),
    Target("GaitGL step vs eager ref", "Whole training step, GaitGL CASIA-B: fastgait throughput vs reference "
           "eager (AMP)", "train_step", "step", ("fastgait",), "speedup_eager", "min", 1.5, "GaitGL casia-b"),
    Target("ReverseMaskNet step vs eager ref", "Whole training step, ReverseMaskNet CASIA-B: fastgait throughput "
           "vs reference eager (AMP)", "train_step", "step", ("fastgait",), "speedup_eager", "min", 1.5,
           "ReverseMaskNet casia-b"),
    Target("80k iterations", "End to end: 80k CASIA-B iterations (projected from the step time, data loading "
           "excluded)", "train_step", "step", ("fastgait",), "projected_80k_h", "max", 0.5, "GaitMask casia-b",
           unit=" h"),
    Target("loader / step", "End to end: the loader keeps up with the step (loader seq/s over fastgait step seq/s)",
           "data_loader", "load", ("workers=8",), "loader_vs_step", "min", 1.0, "casia-b"),
)


@dataclass(frozen=True)
class Evaluation:
    target: Target
    row: Optional[dict]
    value: Optional[float]
    met: Optional[bool]  # None: not measured


def evaluate(rows: Iterable[dict]) -> list[Evaluation]:
    """Every target against every matching row (a target no row matches: one 'not measured' line)."""
    rows = list(rows)
    out = []
    for target in TARGETS:
        matching = [row for row in rows if target.matches(row)]
        if not matching:
            out.append(Evaluation(target, None, None, None))
        for row in matching:
            value = row.get(target.field)
            out.append(Evaluation(target, row, value, target.met(value)))
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {data.get('schema')!r}, this report reads schema {SCHEMA}")
    finalise(data["rows"])
    return data


def save(path: Path, data: dict) -> None:
    """Write atomically: a run killed mid-write leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    finalise(data["rows"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def results_files(folder: Path = RESULTS_DIR) -> list[Path]:
    """The results files of ``folder``, newest date first."""
    return sorted(Path(folder).glob("*.json"), reverse=True)
