"""Checkpoints: written atomically, loaded with ``weights_only=True``, RNG states included.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load`` with
``weights_only=True`` reads it without unpickling arbitrary objects.
"""
from __future__ import annotations

import errno
import io
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"iter_(\d+)\.pt")


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


TMP_SUFFIX = ".tmp"


def _make_temp(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)


def save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to memory, then to a temporary file in the same folder, fsync, then rename
    over ``path``: a crash mid-write leaves the previous file whole. Serialising to memory first
    makes a full disk an ``OSError(ENOSPC)`` naming the file (torch's own writer reports only
    "enforce fail at inline_container.cc ... unexpected pos")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = _make_temp(path)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(error.errno, f"no space left on device writing {path} "
                              f"({buffer.getbuffer().nbytes / 2**20:.1f} MiB); free some space or choose another "
                              "--output", str(path)) from None
            raise
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed :func:`save_atomic` left (``.iter_*.pt.*.tmp``)."""
    removed = []
    for tmp in Path(folder).glob(f".iter_*.pt.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "iteration", "world_size", "config", "model_config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a fastgait checkpoint (the message names the file)."""


def load_checkpoint(path: Path, map_location="cpu", validate: bool = True) -> dict[str, Any]:
    """Read a fastgait checkpoint (``weights_only``); a :class:`CheckpointError` naming the file if
    it is truncated, corrupt, not a checkpoint, or misses a part. ``validate=False`` reads any
    weights-only file (an OpenGait checkpoint) and checks only that it is a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - name the file whatever went wrong
        message = " ".join(str(error).split())[:300]
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt: {message}); "
                              f"use an earlier checkpoint of the run (--resume PATH)") from None
    if not validate:
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's mapping")
        return state
    missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a fastgait training checkpoint (missing {', '.join(missing)}); "
                              "use a checkpoint written by python -m fastgait.train")
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path} is not a fastgait training checkpoint (bad config or model entry)")
    return state


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` holding NaN or inf."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"iter_{iteration:07d}.pt"


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the ``iter_*.pt`` files of ``folder``, oldest first."""
    return sorted(
        (int(m.group(1)), p) for p in Path(folder).glob("iter_*.pt") if (m := CHECKPOINT_PATTERN.fullmatch(p.name))
    )


def prune_checkpoints(folder: Path, keep: int, protect: Optional[Path] = None) -> None:
    """Delete all but the newest ``keep`` checkpoints; never ``protect`` (the one just written)."""
    found = list_checkpoints(folder)
    for _, path in found[:-keep] if keep > 0 else []:
        if protect is not None and Path(path) == Path(protect):
            continue
        path.unlink(missing_ok=True)
