"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), as gait real-scene benchmarks (GREW, HID, Gait3D) use it.

Given the distances between all ``N = n_probe + n_gallery`` items:

1. each column is divided by its maximum (so distances lie in [0, 1] per item);
2. ``R(i, k1)``: the k1-reciprocal neighbours of ``i`` (``j`` among ``i``'s ``k1 + 1`` nearest,
   and ``i`` among ``j``'s); it is expanded by every ``R(j, round(k1 / 2))`` of a member ``j``
   that shares more than two thirds of its items with ``R(i, k1)``;
3. ``V[i, j] = exp(-d(i, j))`` over the expanded set, normalised to sum 1 (zero elsewhere);
4. local query expansion: ``V[i]`` becomes the mean of ``V`` over ``i``'s ``k2`` nearest (``k2 > 1``);
5. Jaccard distance ``d_J(i, j) = 1 - sum_c min(V[i, c], V[j, c]) / sum_c max(V[i, c], V[j, c])``;
6. final ``= (1 - lambda) * d_J + lambda * d`` (the normalised distance), probe rows x gallery columns.

Ties in the neighbour lists keep index order (a stable sort).
"""
from __future__ import annotations

import numpy as np


def _reciprocal(ranking: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = ranking[i, : k + 1]
    backward = ranking[forward, : k + 1]
    return forward[(backward == i).any(1)]


def k_reciprocal_rerank(all_dist, n_probe: int, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked ``[n_probe, N - n_probe]`` distances from the ``[N, N]`` distances of probes then gallery."""
    dist = np.asarray(all_dist, dtype=np.float64)
    n = dist.shape[0]
    if dist.ndim != 2 or dist.shape[1] != n:
        raise ValueError(f"re-ranking needs the square distance matrix of probes and gallery, got {dist.shape}")
    if not 0 < n_probe < n:
        raise ValueError(f"need 0 < n_probe < {n}, got {n_probe}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got k1={k1}, k2={k2}, lambda={lambda_value}")
    scale = dist.max(0)
    scale[scale == 0] = 1.0
    dist = (dist / scale).T  # as the reference formulation: column-normalised, then transposed
    ranking = np.argsort(dist, axis=1, kind="stable")
    half = int(np.around(k1 / 2))
    V = np.zeros_like(dist)
    for i in range(n):
        members = _reciprocal(ranking, i, k1)
        expanded = members
        for j in members:
            candidate = _reciprocal(ranking, j, half)
            if len(np.intersect1d(candidate, members)) > 2 / 3 * len(candidate):
                expanded = np.append(expanded, candidate)
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])
        V[i, expanded] = weight / weight.sum()
    if k2 > 1:
        V = V[ranking[:, :k2]].mean(1)
    jaccard = np.empty((n_probe, n))
    for i in range(n_probe):
        used = np.flatnonzero(V[i])
        shared = np.minimum(V[i, used][None, :], V[:, used]).sum(1)
        total = V[i].sum() + V.sum(1) - shared  # sum of max = sum_i + sum_j - sum of min
        jaccard[i] = 1.0 - shared / np.where(total > 0, total, 1.0)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:n_probe]
    return final[:, n_probe:]
