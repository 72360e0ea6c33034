"""NVTX ranges (visible in Nsight Systems), in the domain "fastgait".

Uses the ``nvtx`` package; where it is missing (e.g. a GPU image without it), PyTorch's
``torch.cuda.nvtx`` with names prefixed ``fastgait/``; a no-op without either.
"""
from contextlib import nullcontext

import torch

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None


def nvtx_range(name: str):
    if _nvtx is not None:
        return _nvtx.annotate(name, domain="fastgait")
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(f"fastgait/{name}")
    return nullcontext()
