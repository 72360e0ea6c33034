"""Retrieval metrics of a probe x gallery distance matrix: CMC (rank-k), AP and INP, as the field computes them.

Per probe, the gallery is sorted by distance (ascending; ties keep gallery order) and
``matches[r]`` says whether the gallery item at rank ``r`` (0-based) has the probe's label.
For a probe with at least one match:

- CMC at rank k: 1 when a match is among the first k, else 0;
- AP: the mean, over the matches, of the precision at each match's rank
  (``(#matches up to rank r) / (r + 1)``);
- INP (inverse negative penalty): ``#matches / (rank of the last match + 1)``, i.e. the
  precision at the hardest match.

A probe without any match in the gallery is left out of every mean (as OpenGait's
``evaluate_rank`` and the re-id code it follows do) and counted in ``probes_without_gallery``.
A rank k above the gallery size is scored at the gallery size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

RANKS = (1, 5, 10, 20)


CHUNK = 1024  # probes per step: bounds memory at CHUNK x n_gallery (GREW-sized sets fit)


def _numpy(dist) -> np.ndarray:
    return dist.detach().cpu().numpy() if isinstance(dist, torch.Tensor) else np.asarray(dist)


def match_matrix(dist, probe_labels, gallery_labels) -> np.ndarray:
    """``[n_probe, n_gallery]`` bool: ``matches[i, r]`` is whether probe ``i``'s rank-``r`` gallery item shares its label."""
    order = np.argsort(_numpy(dist), axis=1, kind="stable")
    return np.asarray(gallery_labels)[order] == np.asarray(probe_labels)[:, None]


def rank_metrics(dist, probe_labels, gallery_labels, ranks: Sequence[int] = RANKS) -> dict:
    """``{"rank-k": %, ..., "mAP": %, "mINP": %, "probes": n, "gallery": m, "probes_without_gallery": k}``.

    ``dist`` ``[n, m]`` (numpy or torch), labels of any comparable type. Percentages are NaN
    when no probe has a match. Probes are scored ``CHUNK`` at a time.
    """
    dist = _numpy(dist)
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    n_probe, n_gallery = dist.shape
    if n_gallery == 0:
        raise ValueError("the gallery is empty: no distances to rank")
    columns = [min(k, n_gallery) - 1 for k in ranks]
    cmc_hits = np.zeros(len(ranks))
    ap_sum = inp_sum = 0.0
    n_valid = 0
    for start in range(0, n_probe, CHUNK):
        matches = match_matrix(dist[start : start + CHUNK], probe_labels[start : start + CHUNK], gallery_labels)
        m = matches[matches.any(1)].astype(np.float64)
        if not m.shape[0]:
            continue
        hits = np.cumsum(m, 1)  # matches up to each rank
        cmc_hits += (hits[:, columns] > 0).sum(0)
        precision = hits / np.arange(1, n_gallery + 1)
        ap_sum += float(((precision * m).sum(1) / m.sum(1)).sum())
        last = n_gallery - 1 - np.argmax(m[:, ::-1], axis=1)  # rank of the hardest match
        inp_sum += float((m.sum(1) / (last + 1)).sum())
        n_valid += m.shape[0]
    result = {}
    if n_valid:
        result.update({f"rank-{k}": 100.0 * float(c) / n_valid for k, c in zip(ranks, cmc_hits)})
        result.update(mAP=100.0 * ap_sum / n_valid, mINP=100.0 * inp_sum / n_valid)
    else:
        result.update({f"rank-{k}": float("nan") for k in ranks})
        result.update(mAP=float("nan"), mINP=float("nan"))
    result.update(probes=int(n_probe), gallery=int(n_gallery), probes_without_gallery=int(n_probe - n_valid))
    return result


def top_k(dist, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest gallery items of each probe, nearest first (ties: gallery order)."""
    dist = _numpy(dist)
    return np.concatenate(
        [np.argsort(dist[s : s + CHUNK], axis=1, kind="stable")[:, :k] for s in range(0, len(dist), CHUNK)]
    ) if len(dist) else np.zeros((0, k), np.int64)
