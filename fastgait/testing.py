"""Test helpers shared by ``tests/`` and ``bench/``: comparisons that say where and how values differ."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch

from .ops import _alloc

# ‖out − ref‖ tolerances per compute dtype (rtol, atol) for element-wise comparisons.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


@contextmanager
def poisoned_outputs():
    """Inside this block, fused-op outputs start as NaN / int-min, so unwritten elements fail."""
    previous = _alloc.set_poison(True)
    try:
        yield
    finally:
        _alloc.set_poison(previous)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str = "tensor",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Element-wise ``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` (``atol`` scales with the
    tensor, since sums of many terms round at the scale of their largest terms); on failure,
    say how many, where, and NaN/inf counts."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    default_rtol, default_atol = TOLERANCES[dtype or actual.dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    inf_a = torch.isinf(a)
    diff = (a - e).abs()
    finite_e = e[torch.isfinite(e)]
    scale = max(1.0, float(finite_e.abs().max())) if finite_e.numel() else 1.0
    bad = ~(diff <= atol * scale + rtol * e.abs()) | (nan_a != nan_e)
    bad &= ~(nan_a & nan_e)
    if not bool(bad.any()):
        return
    where = bad.nonzero()
    first = tuple(where[0].tolist())
    finite = diff[~nan_a & ~nan_e & ~inf_a]
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
        f"max |diff| {float(finite.max()) if finite.numel() else float('nan'):.3e}; "
        f"NaN in actual: {int(nan_a.sum())} (expected: {int(nan_e.sum())}), inf in actual: {int(inf_a.sum())}; "
        f"first at {first}: actual {a[first].item():.6g}, expected {e[first].item():.6g}"
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN anywhere gives inf)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if torch.isnan(a).any() or torch.isinf(a).any():
        return float("inf")
    return float((a - e).norm() / e.norm().clamp(min=1e-30))


def assert_within_reference_error(
    names: tuple[str, ...],
    actual: tuple[torch.Tensor, ...],
    reference_low: tuple[torch.Tensor, ...],
    reference_f64: tuple[torch.Tensor, ...],
    *,
    factor: float = 1.5,
    floor: float = 1e-3,
) -> dict[str, tuple[float, float]]:
    """Low-precision parity: each fused result's relative error against float64 is at most
    ``factor`` times the plain reference's own error at the same precision, plus ``floor``.

    A fixed tolerance is wrong for bf16: the reference computed in bf16 is itself off by ~4e-2
    in a convolution's gradients. This bound passes for rounding as good as the reference's and
    fails for a wrong kernel (errors of order 1). Returns ``{name: (fused error, reference error)}``.
    """
    errors, failures = {}, []
    for name, a, low, exact in zip(names, actual, reference_low, reference_f64):
        fused, own = relative_error(a, exact), relative_error(low, exact)
        errors[name] = (fused, own)
        if not fused <= factor * own + floor:
            failures.append(f"{name}: relative error {fused:.3e} against float64, the reference's own "
                            f"{own:.3e} (bound {factor} x {own:.3e} + {floor:g} = {factor * own + floor:.3e})")
    if failures:
        raise AssertionError("; ".join(failures))
    return errors


def brute_force_triplet_parts(embeddings, labels, margin):
    """The batch-all triplet loss per part by plain loops (blocks.md §6), the oracle of the loss tests:
    float64 ``[parts]`` tensors ``(loss_avg, loss_num, hard_loss, mean_dist)`` with OpenGait's
    definitions (all pairs for mean_dist, diagonal included) and the self-distance exactly 0."""
    n, _, parts = embeddings.shape
    out = []
    for part in range(parts):
        e = embeddings[:, :, part].double()
        d = [[0.0 if i == j else math.sqrt(float((e[i] - e[j]).pow(2).sum())) for j in range(n)] for i in range(n)]
        total, active, hard = 0.0, 0, 0.0
        for i in range(n):
            for j in range(n):
                if labels[i] != labels[j]:
                    continue
                for k in range(n):
                    if labels[i] == labels[k]:
                        continue
                    hinge = max(d[i][j] - d[i][k] + margin, 0.0)
                    total += hinge
                    active += hinge > 0
                    hard = max(hard, hinge)
        out.append((total / active if active else 0.0, active, hard, sum(map(sum, d)) / n / n))
    return [torch.tensor([o[k] for o in out], dtype=torch.float64) for k in range(4)]
