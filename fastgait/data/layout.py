"""The processed layout ``ROOT/<sid>/<type>/<view>/<file>`` and its partition JSON (data.md §1).

One leaf folder holds one sequence. OpenGait stacks several files of one folder as separate
modalities; fastgait reads silhouettes only and takes the first file in sorted order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .io import SEQUENCE_SUFFIXES, PathLike, atomic_write_bytes

GENERATE_HINT = "generate one with `python -m fastgait.data.synthetic OUT --preset small`"

# CASIA-B splits (blocks.md §7): the first N subjects train, the rest test.
CASIA_B_SPLITS = {"ST": 24, "MT": 62, "LT": 74}


@dataclass(frozen=True)
class SequenceEntry:
    """One sequence of the layout: its file and the three folder names above it."""

    path: Path
    subject: str
    type: str
    view: str


def natural_key(name: str):
    """Names sort numerically where they are numbers (``"018"`` before ``"090"``, ``"2"`` before ``"10"``), else as text."""
    return (0, float(name), name) if _is_number(name) else (1, 0.0, name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def scan_layout(root: PathLike, subjects: Optional[Iterable[str]] = None) -> list[SequenceEntry]:
    """Every sequence under ``root`` (``<sid>/<type>/<view>/*.pkl|npy|npz``), sorted by subject, type, view.

    ``subjects``: only these subject folders. Folders without a sequence file are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; {GENERATE_HINT}")
    wanted = None if subjects is None else set(subjects)
    entries = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and subject_dir.name not in wanted:
            continue
        for type_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            for view_dir in sorted((p for p in type_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
                files = sorted(p for p in view_dir.iterdir() if p.suffix in SEQUENCE_SUFFIXES and p.is_file())
                if files:
                    entries.append(SequenceEntry(files[0], subject_dir.name, type_dir.name, view_dir.name))
    return entries


def read_partition(path: PathLike) -> dict[str, list[str]]:
    """A partition JSON ``{"TRAIN_SET": [...], "TEST_SET": [...]}``; subject ids as strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partition file {path} does not exist; {GENERATE_HINT} (it writes OUT/partition.json)")
    try:
        partition = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid partition JSON ({err})") from None
    if not isinstance(partition, dict) or not {"TRAIN_SET", "TEST_SET"} <= set(partition):
        raise ValueError(f"{path}: a partition JSON needs the keys TRAIN_SET and TEST_SET")
    return {key: [str(sid) for sid in partition[key]] for key in ("TRAIN_SET", "TEST_SET")}


def write_partition(path: PathLike, train: Sequence[str], test: Sequence[str]) -> Path:
    """Write ``{"TRAIN_SET": train, "TEST_SET": test}`` atomically; returns the path."""
    path = Path(path)
    text = json.dumps({"TRAIN_SET": list(train), "TEST_SET": list(test)}, indent=1)
    atomic_write_bytes(path, (text + "\n").encode())
    return path


def casia_b_partition(subjects: Sequence[str], setting: str = "LT") -> dict[str, list[str]]:
    """CASIA-B split ``setting`` (``"ST"``, ``"MT"``, ``"LT"``): first 24/62/74 subjects train, the rest test.

    ``subjects`` are sorted (numerically where they are numbers) before splitting.
    """
    if setting not in CASIA_B_SPLITS:
        raise ValueError(f"setting must be one of {sorted(CASIA_B_SPLITS)}, got {setting!r}")
    ordered = sorted(subjects, key=natural_key)
    n_train = CASIA_B_SPLITS[setting]
    if len(ordered) <= n_train:
        raise ValueError(f"CASIA-B {setting} trains on {n_train} subjects; only {len(ordered)} given")
    return {"TRAIN_SET": ordered[:n_train], "TEST_SET": ordered[n_train:]}


def write_casia_b_partition(root: PathLike, setting: str = "LT", out: Optional[PathLike] = None) -> Path:
    """Write the CASIA-B ``setting`` split of the subjects under ``root`` to ``out`` (default ``ROOT/partition_<setting>.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    partition = casia_b_partition([p.name for p in root.iterdir() if p.is_dir()], setting)
    return write_partition(out or root / f"partition_{setting}.json", partition["TRAIN_SET"], partition["TEST_SET"])
