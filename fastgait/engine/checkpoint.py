"""Checkpoints: written atomically, loaded with ``weights_only=True``, RNG states included.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load`` with
``weights_only=True`` reads it without unpickling arbitrary objects.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"iter_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash mid-write leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - name the file whatever went wrong
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"iter_{iteration:07d}.pt"


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).glob("iter_*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))
    )
    return found[-1][1] if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(folder).glob("iter_*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))
    )
    for _, path in found[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
