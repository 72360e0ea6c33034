"""Gait recognition protocols: the indoor rank-1 tables (CASIA-B, OU-MVLP) and the real-scene
retrieval metrics (GREW, Gait3D, any probe/gallery split).

Indoor (blocks.md §7): for each probe view and gallery view, every probe is matched against the
gallery restricted to that view (distance per part, averaged over parts:
``fastgait.ops.part_distance``). A probe view's score is the mean over the *other* gallery
views; a condition's score is the mean over probe views. Views are those present in the data,
so a set with fewer views works too. ``cross_view_gallery=True`` is instead OpenGait's
cross-view-gallery evaluation (one gallery of every view, less the probe subject's sequences
in the probe's own view).

Real scene: one gallery, one probe set, and rank-1/5/10/20, mAP and mINP
(:mod:`fastgait.evaluation.ranking`), optionally after k-reciprocal re-ranking.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..data.layout import natural_key
from .ranking import RANKS, rank_metrics
from .rerank import k_reciprocal_rerank

INDOOR_PROTOCOLS = ("casia-b", "oumvlp")
REAL_SCENE_PROTOCOLS = ("grew", "gait3d", "real-scene")
PROTOCOLS = INDOOR_PROTOCOLS + REAL_SCENE_PROTOCOLS
CASIA_B_GALLERY = ("nm-01", "nm-02", "nm-03", "nm-04")
CASIA_B_PROBES = {"NM": ("nm-05", "nm-06"), "BG": ("bg-",), "CL": ("cl-",)}
OUMVLP_GALLERY, OUMVLP_PROBE = "01", "00"
# OpenGait's cross-view-gallery evaluation: one probe and one gallery sequence per condition.
CROSS_VIEW_GALLERY = {
    "casia-b": (("nm-02", "bg-02", "cl-02"), {"NM": ("nm-01",), "BG": ("bg-01",), "CL": ("cl-01",)}),
    "oumvlp": ((OUMVLP_GALLERY,), {"NM": (OUMVLP_PROBE,)}),
}
GREW_GALLERY, GREW_PROBE = ("01", "02"), ("03",)
REAL_SCENE_KEYS = tuple(f"rank-{k}" for k in RANKS) + ("mAP", "mINP")
RERANK_DEFAULTS = {"k1": 20, "k2": 6, "lambda_value": 0.3}


def is_real_scene(result: dict) -> bool:
    """Whether ``result`` is a real-scene result (flat metrics) rather than indoor tables."""
    return "rank-1" in result


def detect_protocol(types: Sequence[str], probe=None) -> str:
    """With a ``probe`` set: ``"real-scene"`` for a boolean mask, else ``"gait3d"``. Without:
    ``"oumvlp"`` when every type is ``"00"`` or ``"01"``, ``"grew"`` when they are ``01``/``02``/``03``
    with some ``03``, else ``"casia-b"``."""
    if probe is not None:
        return "real-scene" if np.asarray(probe).dtype == np.bool_ else "gait3d"
    present = set(map(str, types))
    if present <= {OUMVLP_GALLERY, OUMVLP_PROBE}:
        return "oumvlp"
    if present <= set(GREW_GALLERY + GREW_PROBE) and GREW_PROBE[0] in present:
        return "grew"
    return "casia-b"


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
    order = np.argsort(dist.cpu().numpy(), axis=1, kind="stable")
    relevant = gallery_labels[order] == probe_labels[:, None]  # [n_probe, n_gallery], by rank
    hits = relevant[:, 0]
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


def load_probe_keys(probe: Union[str, Path, Sequence[str]]) -> list[str]:
    """Gait3D-style probe keys ``<id>-<type>-<view>``: a list, or a JSON file holding a list or a
    dict with ``PROBE_SET`` (as Gait3D's ``Gait3D.json``)."""
    if isinstance(probe, (str, Path)) and (Path(probe).suffix == ".json" or Path(probe).is_file()):
        path = Path(probe)
        if not path.is_file():
            raise FileNotFoundError(f"probe set file {path} does not exist (a JSON list of <id>-<type>-<view> keys)")
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if isinstance(content, dict):
            if "PROBE_SET" not in content:
                raise ValueError(f"{path}: a probe set JSON is a list of keys or a dict with PROBE_SET")
            content = content["PROBE_SET"]
        if not isinstance(content, list):
            raise ValueError(f"{path}: PROBE_SET must be a list of <id>-<type>-<view> keys")
        return [str(k) for k in content]
    if isinstance(probe, str):
        raise ValueError(f"probe set {probe!r}: give a JSON file (.json) or a list of <id>-<type>-<view> keys")
    return [str(k) for k in probe]


def _real_scene_masks(protocol, labels, types, views, probe) -> tuple[np.ndarray, np.ndarray]:
    """(probe mask, gallery mask) of a real-scene protocol."""
    n = len(types)
    if protocol == "grew":
        return np.isin(types, GREW_PROBE), np.isin(types, GREW_GALLERY)
    if protocol == "gait3d":
        if probe is None:
            raise ValueError(
                "protocol 'gait3d' needs its probe set: eval.probe (a JSON file, e.g. Gait3D.json with PROBE_SET, "
                "or a list of <id>-<type>-<view> keys), or PROBE_SET in the partition JSON"
            )
        keys = set(load_probe_keys(probe))
        mask = np.array([f"{s}-{t}-{v}" in keys for s, t, v in zip(labels, types, views)], dtype=bool)
        if not mask.any():
            example = f"{labels[0]}-{types[0]}-{views[0]}" if n else "-"
            raise ValueError(
                f"none of the {len(keys)} probe keys names a test sequence (keys are <id>-<type>-<view>, "
                f"e.g. {example}; ids are the subject folder names, as the loader's subject_ids)"
            )
        return mask, ~mask
    # generic real scene: a boolean mask, or the probe types
    if probe is None:
        raise ValueError("protocol 'real-scene' needs probe=: a boolean mask over the sequences, or a list of probe types")
    probe_arr = np.asarray(probe)
    if probe_arr.dtype == np.bool_:
        if probe_arr.shape != (n,):
            raise ValueError(f"the probe mask has shape {probe_arr.shape}; it needs one boolean per sequence ({n})")
        return probe_arr, ~probe_arr
    mask = np.isin(types, probe_arr.astype(str))
    return mask, ~mask


def _distances(embeddings: torch.Tensor, probe_mask: np.ndarray, gallery_mask: np.ndarray, metric: str,
               rerank: Union[bool, dict]) -> np.ndarray:
    from ..ops import part_distance

    probe_x = embeddings[torch.from_numpy(np.flatnonzero(probe_mask))]
    gallery_x = embeddings[torch.from_numpy(np.flatnonzero(gallery_mask))]
    if not rerank:
        return part_distance(probe_x, gallery_x, metric).cpu().numpy()
    params = dict(RERANK_DEFAULTS, **(rerank if isinstance(rerank, dict) else {}))
    both = torch.cat([probe_x, gallery_x])
    full = part_distance(both, both, metric).cpu().numpy()
    return k_reciprocal_rerank(full, len(probe_x), **params)


def _warn_without_gallery(count: int, total: int, what: str) -> None:
    if count:
        warnings.warn(
            f"{count} of {total} {what} have no sequence of their subject in the gallery: they cannot be matched "
            "and are left out of the means (counted in 'probes_without_gallery')",
            stacklevel=3,
        )


def evaluate_real_scene(
    embeddings: torch.Tensor, labels: np.ndarray, types: np.ndarray, views: np.ndarray, protocol: str,
    metric: str = "euc", probe=None, rerank: Union[bool, dict] = False,
) -> dict:
    """Rank-1/5/10/20, mAP, mINP (%) of one probe set against one gallery (see :func:`evaluate`)."""
    probe_mask, gallery_mask = _real_scene_masks(protocol, labels, types, views, probe)
    present = sorted(set(types.tolist()), key=natural_key)
    if not gallery_mask.any():
        raise ValueError(f"protocol {protocol!r}: no gallery sequences among the test sequences (types {present})")
    if not probe_mask.any():
        raise ValueError(f"protocol {protocol!r}: no probe sequences among the test sequences (types {present})")
    dist = _distances(embeddings, probe_mask, gallery_mask, metric, rerank)
    result = {"protocol": protocol, "metric": metric, "reranked": bool(rerank)}
    result.update(rank_metrics(dist, labels[probe_mask], labels[gallery_mask]))
    _warn_without_gallery(result["probes_without_gallery"], result["probes"], "probes")
    return result


def _cross_view_gallery(embeddings, labels, types, views, protocol, metric) -> dict:
    """OpenGait's cross-view-gallery evaluation: per probe view, rank-1 and mAP against every gallery
    sequence but the probe subject's own in the probe's view."""
    from ..ops import part_distance

    gallery_types, probe_types = CROSS_VIEW_GALLERY[protocol]
    gallery = np.flatnonzero(np.isin(types, gallery_types))
    if gallery.size == 0:
        raise ValueError(f"no gallery sequences (types {list(gallery_types)}) for the cross-view-gallery evaluation")
    view_list = sorted(set(views.tolist()), key=natural_key)
    result = {}
    for condition, probe_type in probe_types.items():
        per_view = np.full(len(view_list), np.nan)
        per_view_ap = np.full(len(view_list), np.nan)
        without = 0
        for i, view in enumerate(view_list):
            probes = np.flatnonzero(np.isin(types, probe_type) & (views == view))
            if probes.size == 0:
                continue
            dist = part_distance(embeddings[probes], embeddings[gallery], metric).cpu().numpy()
            # leave out the gallery sequences of the probe's subject in the probe's view
            excluded = (labels[gallery][None, :] == labels[probes][:, None]) & (views[gallery] == view)[None, :]
            dist = np.where(excluded, np.inf, dist)
            order = np.argsort(dist, axis=1, kind="stable")
            relevant = (labels[gallery][order] == labels[probes][:, None]) & ~np.take_along_axis(excluded, order, 1)
            valid = relevant.any(1)
            without += int((~valid).sum())
            per_view[i] = 100.0 * relevant[:, 0].mean()
            if valid.any():
                r = relevant[valid].astype(np.float64)
                precision = np.cumsum(r, 1) / np.arange(1, r.shape[1] + 1)
                per_view_ap[i] = 100.0 * float(((precision * r).sum(1) / r.sum(1)).mean())
        if np.isnan(per_view).all():
            continue
        result[condition] = {
            "matrix": None, "per_view": per_view, "mean": float(np.nanmean(per_view)), "per_view_mAP": per_view_ap,
            "mAP": float(np.nanmean(per_view_ap)) if not np.isnan(per_view_ap).all() else float("nan"),
            "views": view_list, "gallery": "cross-view", "probes_without_gallery": without,
        }
    return result


def check_protocol(labels, types, views, protocol: str, probe=None) -> None:
    """Raise the error :func:`evaluate` would raise for a missing gallery or probe set, before any
    embedding is computed (so a long embedding pass does not end in it)."""
    labels, types, views = np.asarray(labels), np.asarray(types, dtype=str), np.asarray(views, dtype=str)
    if protocol == "auto":
        protocol = detect_protocol(types, probe)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} or 'auto', got {protocol!r}")
    present = sorted(set(types.tolist()), key=natural_key)
    if protocol in REAL_SCENE_PROTOCOLS:
        probe_mask, gallery_mask = _real_scene_masks(protocol, labels, types, views, probe)
        if not gallery_mask.any():
            raise ValueError(f"protocol {protocol!r}: no gallery sequences among the test sequences (types {present})")
        if not probe_mask.any():
            raise ValueError(f"protocol {protocol!r}: no probe sequences among the test sequences (types {present})")
        return
    gallery, probe_sets = _probe_sets(types, protocol)
    if not gallery.any():
        expected = list(CASIA_B_GALLERY) if protocol == "casia-b" else [OUMVLP_GALLERY]
        raise ValueError(
            f"protocol {protocol!r}: no gallery sequences (types {expected}) among the test sequences (types {present}); "
            "check the test split, or choose the protocol that matches the data"
        )
    if not any(mask.any() for mask in probe_sets.values()):
        raise ValueError(f"no probe sequences for protocol {protocol!r} among types {present}")


def evaluate(
    embeddings: Union[torch.Tensor, np.ndarray],
    labels: Sequence,
    types: Sequence[str],
    views: Sequence[str],
    protocol: str = "casia-b",
    metric: str = "euc",
    *,
    probe=None,
    rerank: Union[bool, dict] = False,
    cross_view_gallery: bool = False,
) -> dict:
    """Scores of embeddings ``[n, c, p]`` under ``protocol``; ``labels`` are subject ids (any comparable type).

    Indoor protocols (``"casia-b"``, ``"oumvlp"``, ``"auto"``) return ``{condition: {...}}``:
    CASIA-B: gallery nm-01..04; conditions NM (probes nm-05, nm-06), BG (bg-*), CL (cl-*).
    OU-MVLP: gallery type ``"01"``, probes ``"00"``; condition ``"NM"`` counts every probe
    (a probe whose subject has no gallery sequence in that view is a miss) and ``"NM-valid"``
    leaves those invalid probes out. Each condition: ``"matrix"`` [V, V] rank-1 % (probe view x
    gallery view, NaN where a view has no probe or gallery), ``"per_view"`` [V] % (mean over the
    other gallery views), ``"mean"`` %, ``"mAP"`` % (mean over off-diagonal cells), ``"views"``,
    ``"probes_without_gallery"`` (probe x gallery-view pairs, off the diagonal, whose subject has
    no sequence in that gallery view; warned about). ``cross_view_gallery=True``: OpenGait's
    cross-view-gallery evaluation instead (``"matrix"`` is ``None``, ``"per_view_mAP"`` added).

    Real-scene protocols return ``{"rank-1", "rank-5", "rank-10", "rank-20", "mAP", "mINP"}`` (%)
    plus ``"probes"``, ``"gallery"``, ``"probes_without_gallery"``, ``"protocol"``, ``"metric"``,
    ``"reranked"``:

    - ``"grew"``: gallery types ``01``, ``02``; probes ``03`` (OpenGait's GREW split);
    - ``"gait3d"``: ``probe`` is the probe set, a list of ``<id>-<type>-<view>`` keys or a JSON file
      of them (a list, or a dict with ``PROBE_SET``); every other sequence is gallery;
    - ``"real-scene"``: ``probe`` is a boolean mask over the sequences (or a list of probe types);
      the rest is gallery.

    ``rerank``: k-reciprocal re-ranking (``True``, or a dict of ``k1``, ``k2``, ``lambda_value``;
    defaults 20, 6, 0.3) before scoring (real-scene protocols). Distances:
    ``fastgait.ops.part_distance(metric)`` (per part, averaged over parts).
    """
    from ..ops import part_distance

    if protocol == "auto":
        protocol = detect_protocol(types, probe)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} or 'auto', got {protocol!r}")
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [n, c, p], got shape {tuple(embeddings.shape)}")
    labels, types, views = np.asarray(labels), np.asarray(types, dtype=str), np.asarray(views, dtype=str)
    if not len(labels) == len(types) == len(views) == embeddings.shape[0]:
        raise ValueError(
            f"{embeddings.shape[0]} embeddings but {len(labels)} labels, {len(types)} types, {len(views)} views"
        )
    embeddings = embeddings.float()
    if protocol in REAL_SCENE_PROTOCOLS:
        if cross_view_gallery:
            raise ValueError(f"cross_view_gallery applies to {INDOOR_PROTOCOLS}, not {protocol!r}")
        return evaluate_real_scene(embeddings, labels, types, views, protocol, metric, probe, rerank)
    if rerank:
        raise ValueError(f"re-ranking applies to the real-scene protocols {REAL_SCENE_PROTOCOLS}, not {protocol!r}")
    if cross_view_gallery:
        result = _cross_view_gallery(embeddings, labels, types, views, protocol, metric)
        if not result:
            raise ValueError(f"no probe sequences for the cross-view-gallery evaluation among types {sorted(set(types.tolist()))}")
        _warn_without_gallery(sum(r["probes_without_gallery"] for r in result.values()),
                              sum(int(np.isin(types, CROSS_VIEW_GALLERY[protocol][1][c]).sum()) for c in result), "probes")
        return result
    view_list = sorted(set(views.tolist()), key=natural_key)
    gallery, probe_sets = _probe_sets(types, protocol)
    present = sorted(set(types.tolist()), key=natural_key)
    if not gallery.any():
        expected = list(CASIA_B_GALLERY) if protocol == "casia-b" else [OUMVLP_GALLERY]
        raise ValueError(
            f"protocol {protocol!r}: no gallery sequences (types {expected}) among the test sequences (types {present}); "
            "check the test split, or choose the protocol that matches the data"
        )
    variants = ("", "-valid") if protocol == "oumvlp" else ("",)
    result = {}
    pairs_without = total_pairs = 0
    for condition, probe_mask in probe_sets.items():
        if not probe_mask.any():
            continue
        shape = (len(view_list), len(view_list))
        rank1 = {v: np.full(shape, np.nan) for v in variants}
        ap = {v: np.full(shape, np.nan) for v in variants}
        without = 0
        for i, probe_view in enumerate(view_list):
            probes = np.flatnonzero(probe_mask & (views == probe_view))
            for j, gallery_view in enumerate(view_list):
                gallery_idx = np.flatnonzero(gallery & (views == gallery_view))
                if probes.size == 0 or gallery_idx.size == 0:
                    continue
                dist = part_distance(embeddings[probes], embeddings[gallery_idx], metric)
                hits, precision, valid = _score_cell(dist, labels[probes], labels[gallery_idx])
                if i != j:
                    without += int((~valid).sum())
                    total_pairs += valid.size
                for variant in variants:
                    keep = valid if variant else np.ones_like(valid)
                    if keep.any():
                        rank1[variant][i, j] = 100.0 * hits[keep].mean()
                    if valid.any():
                        ap[variant][i, j] = 100.0 * np.nanmean(precision[valid])
        pairs_without += without
        for variant in variants:
            result[condition + variant] = _summary(rank1[variant], ap[variant], view_list)
            result[condition + variant]["probes_without_gallery"] = without
    if not result:
        raise ValueError(f"no probe sequences for protocol {protocol!r} among types {present}")
    if pairs_without:
        warnings.warn(
            f"{pairs_without} of {total_pairs} (probe, gallery view) pairs have no sequence of the probe's subject in "
            "that gallery view: they count as misses in the rank-1 tables"
            + (" (the NM-valid rows leave them out)" if protocol == "oumvlp" else "")
            + " (reported as 'probes_without_gallery')",
            stacklevel=2,
        )
    return result
