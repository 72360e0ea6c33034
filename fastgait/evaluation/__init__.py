"""Evaluation: the CASIA-B and OU-MVLP rank-1 protocols, the real-scene protocols (GREW, Gait3D,
any probe/gallery split: rank-1/5/10/20, mAP, mINP), re-ranking, submissions, rendering, and the
GEI baseline.

- ``evaluate(embeddings [n, c, p], labels, types, views, protocol, metric, probe=, rerank=,
  cross_view_gallery=)`` -> ``{condition: {...}}`` (indoor) or ``{"rank-1": ..., "mINP": ...}`` (real scene).
- ``rank_metrics(dist, probe_labels, gallery_labels)``, ``k_reciprocal_rerank(all_dist, n_probe)``.
- ``grew_submission``, ``hid_submission``: challenge CSVs.
- ``to_markdown``, ``matrix_markdown``, ``to_csv``, ``to_json``, ``save_heatmap``, ``write_report``, ``summary``.
- ``gei_baseline(dataset_or_root, partition, protocol)``: gait energy image + nearest neighbour.
- CASIA-B splits ST/MT/LT: ``casia_b_partition``, ``write_casia_b_partition`` (from ``fastgait.data``).
"""
from ..data.layout import CASIA_B_SPLITS, casia_b_partition, write_casia_b_partition
from .protocols import (
    INDOOR_PROTOCOLS, PROTOCOLS, REAL_SCENE_KEYS, REAL_SCENE_PROTOCOLS, detect_protocol, evaluate, is_real_scene,
    load_probe_keys,
)
from .ranking import rank_metrics
from .render import matrix_markdown, save_heatmap, summary, to_csv, to_json, to_markdown, write_report
from .rerank import k_reciprocal_rerank
from .submission import grew_submission, hid_submission

__all__ = [
    "evaluate",
    "detect_protocol",
    "PROTOCOLS",
    "INDOOR_PROTOCOLS",
    "REAL_SCENE_PROTOCOLS",
    "REAL_SCENE_KEYS",
    "is_real_scene",
    "load_probe_keys",
    "rank_metrics",
    "k_reciprocal_rerank",
    "grew_submission",
    "hid_submission",
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
