"""Evaluation: the CASIA-B and OU-MVLP rank-1 protocols, their rendering, and the GEI baseline.

- ``evaluate(embeddings [n, c, p], labels, types, views, protocol, metric)`` -> ``{condition: {...}}``.
- ``to_markdown``, ``matrix_markdown``, ``to_csv``, ``to_json``, ``save_heatmap``, ``write_report``, ``summary``.
- ``gei_baseline(dataset_or_root, partition, protocol)``: gait energy image + nearest neighbour.
- CASIA-B splits ST/MT/LT: ``casia_b_partition``, ``write_casia_b_partition`` (from ``fastgait.data``).
"""
from ..data.layout import CASIA_B_SPLITS, casia_b_partition, write_casia_b_partition
from .protocols import PROTOCOLS, detect_protocol, evaluate
from .render import matrix_markdown, save_heatmap, summary, to_csv, to_json, to_markdown, write_report

__all__ = [
    "evaluate",
    "detect_protocol",
    "PROTOCOLS",
    "gei_baseline",
    "gait_energy_images",
    "to_markdown",
    "matrix_markdown",
    "to_csv",
    "to_json",
    "save_heatmap",
    "write_report",
    "summary",
    "CASIA_B_SPLITS",
    "casia_b_partition",
    "write_casia_b_partition",
]


def __getattr__(name: str):
    # Imported lazily so that `python -m fastgait.evaluation.gei` does not import itself twice.
    if name in ("gei_baseline", "gait_energy_images"):
        from . import gei

        return getattr(gei, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
