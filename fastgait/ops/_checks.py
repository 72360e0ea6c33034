"""Input checks at op boundaries: each error names the argument, what was wrong, and the fix."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    value,
    name: str,
    *,
    op: str,
    ndim: Optional[Iterable[int]] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {value.dtype}; expected one of {names}")
    if device is not None and value.device != device:
        raise ValueError(
            f"{op}: {name} is on {value.device} but the input is on {device}; move it with .to({str(device)!r})"
        )
    if value.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(value.shape)})")
    return value


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in dtypes.items())
        raise TypeError(f"{op}: inputs must share one dtype, got {listing}; cast them (or run under autocast)")
