"""Rank-1 protocols of CASIA-B and OU-MVLP (blocks.md §7).

For each probe view and gallery view, every probe is matched against the gallery restricted to
that view (distance per part, averaged over parts: ``fastgait.ops.part_distance``). A probe
view's score is the mean over the *other* gallery views; a condition's score is the mean over
probe views. Views are those present in the data, so a set with fewer views works too.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch

from ..data.layout import natural_key

PROTOCOLS = ("casia-b", "oumvlp")
CASIA_B_GALLERY = ("nm-01", "nm-02", "nm-03", "nm-04")
CASIA_B_PROBES = {"NM": ("nm-05", "nm-06"), "BG": ("bg-",), "CL": ("cl-",)}
OUMVLP_GALLERY, OUMVLP_PROBE = "01", "00"


def detect_protocol(types: Sequence[str]) -> str:
    """``"oumvlp"`` when every type is ``"00"`` or ``"01"``, else ``"casia-b"``."""
    return "oumvlp" if set(map(str, types)) <= {OUMVLP_GALLERY, OUMVLP_PROBE} else "casia-b"


def _probe_sets(types: np.ndarray, protocol: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The gallery mask and, per condition, the probe mask."""
    if protocol == "oumvlp":
        return types == OUMVLP_GALLERY, {"NM": types == OUMVLP_PROBE}
    gallery = np.isin(types, CASIA_B_GALLERY)
    probes = {
        name: np.array([t.startswith(prefixes) if name != "NM" else t in prefixes for t in types], dtype=bool)
        for name, prefixes in CASIA_B_PROBES.items()
    }
    return gallery, probes


def _score_cell(dist: torch.Tensor, probe_labels: np.ndarray, gallery_labels: np.ndarray):
    """Per probe: rank-1 hit (bool), average precision (nan without a positive), has-a-positive (bool)."""
    nearest = dist.argmin(1).cpu().numpy()
    hits = gallery_labels[nearest] == probe_labels
    order = dist.argsort(1).cpu().numpy()
    relevant = gallery_labels[order] == probe_labels[:, None]  # [n_probe, n_gallery], by rank
    n_relevant = relevant.sum(1)
    precision = relevant.cumsum(1) / np.arange(1, relevant.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * relevant).sum(1) / n_relevant
    return hits, ap, n_relevant > 0


def _summary(matrix: np.ndarray, ap_matrix: np.ndarray, views: list[str]) -> dict:
    off_diagonal = ~np.eye(len(views), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row is a legitimate NaN result
        per_view = np.array([np.nanmean(row[mask]) for row, mask in zip(matrix, off_diagonal)])
        mean = float(np.nanmean(per_view))
        mean_ap = float(np.nanmean(ap_matrix[off_diagonal]))
    return {"matrix": matrix, "per_view": per_view, "mean": mean, "mAP": mean_ap, "views": list(views)}


def evaluate(
    embeddings: Union[torch.Tensor, np.ndarray],
    labels: Sequence[int],
    types: Sequence[str],
    views: Sequence[str],
    protocol: str = "casia-b",
    metric: str = "euc",
) -> dict[str, dict]:
    """Rank-1 tables of embeddings ``[n, c, p]`` under ``protocol`` (``"casia-b"``, ``"oumvlp"`` or ``"auto"``).

    CASIA-B: gallery nm-01..04; conditions NM (probes nm-05, nm-06), BG (bg-*), CL (cl-*).
    OU-MVLP: gallery type ``"01"``, probes ``"00"``; condition ``"NM"`` counts every probe
    (a probe whose subject has no gallery sequence in that view is a miss) and ``"NM-valid"``
    leaves those invalid probes out.

    Returns ``{condition: {"matrix": [V, V] rank-1 % (probe view x gallery view, NaN where a
    view has no probe or gallery), "per_view": [V] % (mean over the other gallery views),
    "mean": % (mean over probe views), "mAP": % (mean over off-diagonal cells), "views": [V]}}``
    for every condition that has probes. Distances: ``fastgait.ops.part_distance(metric)``.
    """
    from ..ops import part_distance

    if protocol == "auto":
        protocol = detect_protocol(types)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} or 'auto', got {protocol!r}")
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [n, c, p], got shape {tuple(embeddings.shape)}")
    labels, types, views = np.asarray(labels), np.asarray(types, dtype=str), np.asarray(views, dtype=str)
    if not len(labels) == len(types) == len(views) == embeddings.shape[0]:
        raise ValueError(
            f"{embeddings.shape[0]} embeddings but {len(labels)} labels, {len(types)} types, {len(views)} views"
        )
    embeddings = embeddings.float()
    view_list = sorted(set(views.tolist()), key=natural_key)
    gallery, probe_sets = _probe_sets(types, protocol)
    variants = ("", "-valid") if protocol == "oumvlp" else ("",)
    result = {}
    for condition, probe_mask in probe_sets.items():
        if not probe_mask.any():
            continue
        shape = (len(view_list), len(view_list))
        rank1 = {v: np.full(shape, np.nan) for v in variants}
        ap = {v: np.full(shape, np.nan) for v in variants}
        for i, probe_view in enumerate(view_list):
            probes = np.flatnonzero(probe_mask & (views == probe_view))
            for j, gallery_view in enumerate(view_list):
                gallery_idx = np.flatnonzero(gallery & (views == gallery_view))
                if probes.size == 0 or gallery_idx.size == 0:
                    continue
                dist = part_distance(embeddings[probes], embeddings[gallery_idx], metric)
                hits, precision, valid = _score_cell(dist, labels[probes], labels[gallery_idx])
                for variant in variants:
                    keep = valid if variant else np.ones_like(valid)
                    if keep.any():
                        rank1[variant][i, j] = 100.0 * hits[keep].mean()
                    if valid.any():
                        ap[variant][i, j] = 100.0 * np.nanmean(precision[valid])
        for variant in variants:
            result[condition + variant] = _summary(rank1[variant], ap[variant], view_list)
    if not result:
        raise ValueError(f"no probe sequences for protocol {protocol!r} among types {sorted(set(types.tolist()))}")
    return result
