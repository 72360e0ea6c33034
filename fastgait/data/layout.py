"""The processed layout ``ROOT/<sid>/<type>/<view>/<file>`` and its partition JSON (data.md §1).

One leaf folder holds one sequence. Where a folder holds several sequence files (OpenGait
stacks them as modalities: silhouettes, parsing, SMPL ...), ``in_use`` (OpenGait's
``data_in_use``) says which one, by position in sorted order; fastgait never picks one itself.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .io import SEQUENCE_SUFFIXES, PathLike, SequenceFileError, atomic_write_bytes, not_a_regular_file

GENERATE_HINT = "generate one with `python -m fastgait.data.synthetic OUT --preset small`"

# CASIA-B splits (blocks.md §7): the first N subjects train, the rest test.
CASIA_B_SPLITS = {"ST": 24, "MT": 62, "LT": 74}


@dataclass(frozen=True)
class SequenceEntry:
    """One sequence of the layout: its file, the three folder names above it, and why it cannot be
    read (``problem``; ``None`` when it looks readable)."""

    path: Path
    subject: str
    type: str
    view: str
    problem: Optional[str] = None


InUse = Union[None, int, Sequence[Union[bool, int]]]


def normalize_in_use(in_use: InUse) -> Union[None, int, tuple[bool, ...]]:
    """``data.in_use`` as ``None``, an index, or a tuple of booleans selecting exactly one file.

    Accepted (as OpenGait's ``data_in_use``): a list of booleans, one per file of a sequence folder
    in sorted order (``[true, false]``), or a list of one index (``[0]``), or a bare index.
    """
    if in_use is None:
        return None
    if isinstance(in_use, bool):
        raise ValueError(f"data.in_use must be a list of booleans (one per file) or an index, got {in_use!r}")
    if isinstance(in_use, int):
        if in_use < 0:
            raise ValueError(f"data.in_use index must be >= 0, got {in_use}")
        return in_use
    if isinstance(in_use, (str, bytes)) or not isinstance(in_use, Sequence):
        raise ValueError(f"data.in_use must be a list of booleans (one per file) or an index, got {in_use!r}")
    items = list(in_use)
    if items and all(isinstance(x, bool) for x in items):
        if sum(items) != 1:
            raise ValueError(
                f"data.in_use={items} selects {sum(items)} files: fastgait's models read one silhouette input, "
                "so select exactly one (e.g. [true, false])"
            )
        return tuple(items)
    if len(items) == 1 and isinstance(items[0], int) and not isinstance(items[0], bool) and items[0] >= 0:
        return items[0]
    raise ValueError(
        f"data.in_use={items!r}: give a list of booleans with one true (one entry per file of a sequence "
        "folder, in sorted order) or one index, e.g. [true, false] or [0]"
    )


def sequence_files(view_dir: Path) -> list[Path]:
    """The candidate sequence files of a leaf folder (``*.pkl``, ``*.npy``, ``*.npz``, not hidden), sorted by name."""
    return sorted(p for p in view_dir.iterdir() if p.suffix in SEQUENCE_SUFFIXES and not p.name.startswith("."))


def select_file(view_dir: Path, files: list[Path], in_use: Union[None, int, tuple[bool, ...]]) -> Path:
    """The one file of a sequence folder that ``in_use`` selects; an error naming the folder otherwise."""
    names = [p.name for p in files]
    if in_use is None:
        if len(files) == 1:
            return files[0]
        raise SequenceFileError(
            view_dir,
            f"holds {len(files)} sequence files {names}: fastgait reads one silhouette file per sequence and "
            f"does not guess which; set data.in_use (OpenGait's data_in_use), one boolean per file in this "
            f"sorted order, e.g. data.in_use=[{', '.join(['true'] + ['false'] * (len(files) - 1))}] for {names[0]}",
        )
    if isinstance(in_use, int):
        if in_use >= len(files):
            raise SequenceFileError(
                view_dir, f"holds {len(files)} sequence files {names}; data.in_use selects index {in_use}, which it lacks"
            )
        return files[in_use]
    if len(in_use) != len(files):
        raise SequenceFileError(
            view_dir,
            f"holds {len(files)} sequence files {names} but data.in_use has {len(in_use)} entries "
            f"{list(in_use)}: every sequence folder must hold the same files (as OpenGait's data_in_use requires); "
            "fix this folder or data.in_use",
        )
    return files[in_use.index(True)]


def natural_key(name: str):
    """Names sort numerically where they are numbers (``"018"`` before ``"090"``, ``"2"`` before ``"10"``), else as text."""
    return (0, float(name), name) if _is_number(name) else (1, 0.0, name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def scan_layout(root: PathLike, subjects: Optional[Iterable[str]] = None, in_use: InUse = None) -> list[SequenceEntry]:
    """Every sequence under ``root`` (``<sid>/<type>/<view>/*.pkl|npy|npz``), sorted by subject, type, view.

    ``subjects``: only these subject folders. Folders without a sequence file are ignored. A
    folder with several files needs ``in_use`` (:func:`select_file`; an error otherwise). A
    selected path that is not a regular file (a dangling symlink, a folder named ``x.pkl``, a
    FIFO) is returned with its ``problem`` set, never dropped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; {GENERATE_HINT}")
    in_use = normalize_in_use(in_use)
    wanted = None if subjects is None else set(subjects)
    entries = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and subject_dir.name not in wanted:
            continue
        for type_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            for view_dir in sorted((p for p in type_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
                files = sequence_files(view_dir)
                if files:
                    path = select_file(view_dir, files, in_use)
                    entries.append(
                        SequenceEntry(path, subject_dir.name, type_dir.name, view_dir.name, not_a_regular_file(path))
                    )
    return entries


def _subject_list(value: object, key: str, path: Path) -> list[str]:
    """A partition's id list as strings: a bare string is one id; ``null`` and non-lists are errors."""
    if isinstance(value, str):
        return [value]  # "TRAIN_SET": "001" means the one subject 001, not the characters 0, 0, 1
    if value is None or not isinstance(value, list):
        raise ValueError(
            f"{path}: {key} is {json.dumps(value)}; it must be a list of subject ids, "
            f'e.g. "{key}": ["001", "002"]'
        )
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (str, int))]
    if bad:
        raise ValueError(f"{path}: {key} holds {bad[:3]}; subject ids must be strings (folder names) or integers")
    return [str(sid) for sid in value]


def read_partition(path: PathLike) -> dict[str, list[str]]:
    """A partition JSON ``{"TRAIN_SET": [...], "TEST_SET": [...]}`` (and ``PROBE_SET`` when it has one,
    as Gait3D's); subject ids as strings.

    A subject in both sets is leakage: it is warned about (the test scores would be inflated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partition file {path} does not exist; {GENERATE_HINT} (it writes OUT/partition.json)")
    try:
        partition = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid partition JSON ({err})") from None
    if not isinstance(partition, dict) or not {"TRAIN_SET", "TEST_SET"} <= set(partition):
        raise ValueError(f"{path}: a partition JSON needs the keys TRAIN_SET and TEST_SET")
    result = {key: _subject_list(partition[key], key, path) for key in ("TRAIN_SET", "TEST_SET")}
    if "PROBE_SET" in partition:  # Gait3D's JSON: the probe keys <id>-<type>-<view> of the test set
        result["PROBE_SET"] = _subject_list(partition["PROBE_SET"], "PROBE_SET", path)
    return check_partition(result, path)


def check_partition(partition: dict[str, list[str]], source: object = "partition") -> dict[str, list[str]]:
    """Warn when TRAIN_SET and TEST_SET share subjects (leakage); returns ``partition``."""
    shared = sorted(set(partition["TRAIN_SET"]) & set(partition["TEST_SET"]), key=natural_key)
    if shared:
        warnings.warn(
            f"{source}: {len(shared)} subjects are in both TRAIN_SET and TEST_SET ({shared[:5]}"
            f"{' ...' if len(shared) > 5 else ''}): the model is tested on subjects it trained on, so the "
            "scores are inflated; remove them from one set",
            stacklevel=3,
        )
    return partition


@dataclass(frozen=True)
class CasiaBSplit:
    """The CASIA-B split ``setting`` (ST/MT/LT) of a root's subjects, made when a dataset is read:
    no file is written into the user's dataset folder."""

    setting: str

    def resolve(self, root: PathLike) -> dict[str, list[str]]:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
        return casia_b_partition([p.name for p in root.iterdir() if p.is_dir()], self.setting.upper())

    def __str__(self) -> str:
        return f"CASIA-B {self.setting.upper()} split"


def write_partition(path: PathLike, train: Sequence[str], test: Sequence[str],
                    probe: Optional[Sequence[str]] = None) -> Path:
    """Write ``{"TRAIN_SET": train, "TEST_SET": test}`` (and ``"PROBE_SET": probe``) atomically; returns the path."""
    path = Path(path)
    content = {"TRAIN_SET": list(train), "TEST_SET": list(test)}
    if probe is not None:
        content["PROBE_SET"] = list(probe)
    text = json.dumps(content, indent=1)
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
