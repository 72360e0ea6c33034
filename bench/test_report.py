"""``bench/report.py`` on a synthetic results file: the pipeline works before any GPU run."""
from __future__ import annotations

import json

import pytest
import torch

from bench import _harness as h
from bench import _results, report
from bench._results import TARGETS


def test_report_from_synthetic_results(tmp_path):
    results, out, plots = tmp_path / "results", tmp_path / "docs" / "PERFORMANCE.md", tmp_path / "docs" / "perf"
    assert report.main(["--synthetic", str(results / "2000-01-01-synthetic-gpu.json")]) == 0
    assert report.main(["--results", str(results), "--out", str(out), "--plots", str(plots)]) == 0

    page = out.read_text()
    assert "SYNTHETIC" in page and "No GPU results yet" in page  # a synthetic file is no GPU result
    for target in TARGETS:
        assert target.text in page
    assert "**not met**" in page and "| met |" in page
    for section in ("### Fused MLA block", "### GeM", "### Batch-all triplet", "### Whole training step",
                    "### Design chosen per shape", "### Data loading"):
        assert section in page
    assert "| GaitMask casia-b | fastgait-eager, fastgait | fwd | 128×32×10×64×44 | 64 | band 25, add, pair |" in page
    assert "**gemm** | 1.2 | 1 | timed |" in page and "**hybrid** | 2.1 | 2.6 | timed |" in page
    for name in report.plot_names("2000-01-01-synthetic-gpu"):
        assert (plots / name).stat().st_size > 0
        assert f"(perf/{name})" in page


def test_ratios_pair_rows_of_the_same_run():
    data = report.synthetic_results()
    rows = {(r["op"], r["config"], r["provider"], r["pass"]): r for r in data["rows"]}
    fused = rows[("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "triton-hybrid", "fwd+bwd")]
    base = rows[("mla_conv3d", "casia-b MLA-A 32-64 10x64x44", "reference-eager", "fwd+bwd")]
    assert fused["time_ratio_eager"] == fused["median_ms"] / base["median_ms"]
    assert fused["speedup_eager"] * fused["time_ratio_eager"] == pytest.approx(1.0)
    other_run = dict(fused, run="another run", provider="triton-gemm")
    _results.finalise([base, other_run])
    assert other_run["time_ratio_eager"] is None  # no baseline in that run


def test_summary_of_a_results_file(tmp_path, capsys):
    path = tmp_path / "r.json"
    _results.save(path, report.synthetic_results())
    assert json.loads(path.read_text())["kind"] == "synthetic"
    assert report.main(["--summary", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Synthetic GPU" in printed and "GaitMask casia-b" in printed


def test_docs_page_is_what_the_report_makes_of_bench_results():
    """docs/PERFORMANCE.md is generated: regenerate it with `python -m bench.report`."""
    results = [(path.stem, _results.load(path)) for path in _results.results_files()]
    links = {stem: [f"performance/{name}" for name in report.plot_names(stem)] for stem, _ in results}
    assert (report.DOCS / "PERFORMANCE.md").read_text() == report.render(results, links)


def test_results_file_is_extended_by_the_same_code_only(tmp_path):
    mode = h.Mode(benchmark=True, paper_shapes=True, device=torch.device("cpu"), compile_backend="inductor")
    env = {"date": "2000-01-01", "gpu": "Synthetic GPU", "source_digest": "abc"}
    path = tmp_path / "2000-01-01-synthetic-gpu.json"
    row = {"op": "gem_hpp", "config": "c", "provider": "triton", "pass": "fwd", "median_ms": 1.0}

    first = h.Recorder(mode, path, {"id": "run 1"}, env)
    first.add(dict(row, run="run 1"))
    first.add(dict(row, run="run 1", provider="reference-eager", median_ms=3.0))
    second = h.Recorder(mode, path, {"id": "run 2"}, env)
    assert second.path == path
    second.add(dict(row, run="run 2", median_ms=2.0))  # replaces run 1's triton row
    data = _results.load(path)
    assert [r["run"] for r in data["rows"]] == ["run 1", "run 2"] and len(data["runs"]) == 2
    assert data["rows"][1]["speedup_eager"] is None  # its baseline is another run's

    other = h.Recorder(mode, path, {"id": "run 3"}, dict(env, source_digest="def"))
    assert other.path == tmp_path / "2000-01-01-synthetic-gpu-2.json"
