"""NVTX ranges (visible in Nsight Systems); a no-op when the nvtx package is missing."""
from contextlib import nullcontext

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None


def nvtx_range(name: str):
    if _nvtx is None:
        return nullcontext()
    return _nvtx.annotate(name, domain="fastgait")
