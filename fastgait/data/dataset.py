"""``GaitDataset``: the sequences of one split of a processed layout, with labels and an in-memory cache."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io import PathLike, SequenceFileError, load_sequence
from .layout import (
    GENERATE_HINT, CasiaBSplit, InUse, SequenceEntry, _subject_list, check_partition, natural_key, read_partition, scan_layout,
)

SPLITS = ("train", "test", "all")
ON_ERROR = ("raise", "skip")


class GaitDataset(torch.utils.data.Dataset):
    """Sequences of ``ROOT/<sid>/<type>/<view>/<file>`` for one split; ``dataset[i]`` is uint8 ``[T, 64, 64]``.

    Args:
        root: the dataset folder.
        partition: a partition JSON (``TRAIN_SET``/``TEST_SET``), such a dict, or a
            :class:`~fastgait.data.layout.CasiaBSplit` (made from the root's subject folders, nothing
            written); ``None`` uses ``ROOT/partition.json``. ``split="all"`` ignores it.
        split: ``"train"``, ``"test"`` or ``"all"`` (every subject folder).
        cache: load every sequence once, now, and keep it in memory. Loaders built by
            ``make_train_loader``/``make_test_loader`` fork their workers after this, so the
            workers share the cache copy-on-write instead of each loading their own.
        on_error: ``"raise"`` (a bad file stops with an error naming it) or ``"skip"`` (bad files
            are left out and listed in ``skipped``). Skipping needs every file read now, so
            ``on_error="skip"`` reads them even with ``cache=False``.
        progress: show a progress bar while loading.
        in_use: which file of a sequence folder holding several (OpenGait's ``data_in_use``: a
            list of booleans, one per file in sorted order, or an index); ``None`` requires one file
            per folder. See :func:`fastgait.data.layout.select_file`.

    Attributes: ``labels`` (int64, contiguous ``0..num_ids-1`` over the split's subjects in sorted
    order), ``subject_ids``, ``types``, ``views`` (str arrays), ``paths``, ``num_ids``,
    ``skipped`` (list of ``(path, problem)``), ``num_skipped``, ``probe_set`` (the partition's
    ``PROBE_SET`` of ``<id>-<type>-<view>`` keys, as Gait3D's JSON has it; ``None`` without).
    """

    def __init__(
        self,
        root: PathLike,
        partition: Optional[PathLike] = None,
        split: str = "train",
        cache: bool = True,
        on_error: str = "raise",
        progress: bool = True,
        in_use: InUse = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder; {GENERATE_HINT}")
        self.probe_set: Optional[list[str]] = None  # a partition's PROBE_SET (Gait3D's probe keys), if any
        subjects = self._split_subjects(partition)
        entries = scan_layout(self.root, subjects, in_use)
        if subjects is not None:
            found = {e.subject for e in entries}
            missing = [s for s in subjects if s not in found]
            if missing:
                warnings.warn(f"{self.root}: {len(missing)} subjects of the {split} split have no sequence ({missing[:5]}...)")
        if not entries:
            raise FileNotFoundError(
                f"no sequence files (*.pkl, *.npy, *.npz in <sid>/<type>/<view>/) for split {split!r} under "
                f"{self.root}; {GENERATE_HINT}"
            )
        self.skipped: list[tuple[Path, str]] = []
        entries = self._drop_unreadable_paths(entries, on_error)
        self._cache: Optional[list[np.ndarray]] = None
        if entries and (cache or on_error == "skip"):
            entries, arrays = self._load_all(entries, on_error, progress)
            self._cache = arrays if cache else None
        if not entries:
            first_path, first_problem = self.skipped[0]
            raise FileNotFoundError(
                f"every one of the {len(self.skipped)} sequence files of split {split!r} under {self.root} was "
                f"unreadable (on_error='skip' left them all out); the first: {first_path}: {first_problem}"
            )
        if self.skipped:
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped)} unreadable sequence files of split {split!r} "
                f"(see dataset.skipped); the first: {self.skipped[0][0]}: {self.skipped[0][1]}"
            )
        self._set_entries(entries)

    def _drop_unreadable_paths(self, entries: list[SequenceEntry], on_error: str) -> list[SequenceEntry]:
        """Paths that are not regular files (dangling symlinks, folders, FIFOs): raise, or skip and count."""
        kept = []
        for entry in entries:
            if entry.problem is None:
                kept.append(entry)
            elif on_error == "raise":
                raise SequenceFileError(entry.path, entry.problem + " (or set data.on_error=skip to leave it out)")
            else:
                self.skipped.append((entry.path, entry.problem))
        return kept

    def _split_subjects(self, partition: Optional[PathLike]) -> Optional[list[str]]:
        if self.split == "all":
            return None
        if partition is None:
            partition = self.root / "partition.json"
            if not partition.is_file():
                raise FileNotFoundError(
                    f"split {self.split!r} needs a partition JSON and {partition} does not exist; pass "
                    "partition=PATH, or split='all' to use every subject"
                )
        if isinstance(partition, CasiaBSplit):
            partition = partition.resolve(self.root)
        if isinstance(partition, dict):
            missing = {"TRAIN_SET", "TEST_SET"} - set(partition)
            if missing:
                raise ValueError(f"a partition needs the keys TRAIN_SET and TEST_SET; {sorted(missing)} missing")
            partition = check_partition({k: _subject_list(v, k, "partition") for k, v in partition.items()
                                         if k in ("TRAIN_SET", "TEST_SET", "PROBE_SET")})
        else:
            partition = read_partition(partition)
        self.probe_set = partition.get("PROBE_SET")
        return partition["TRAIN_SET" if self.split == "train" else "TEST_SET"]

    def _load_all(self, entries: list[SequenceEntry], on_error: str, progress: bool):
        from tqdm import tqdm

        def load(entry: SequenceEntry):
            try:
                return load_sequence(entry.path)
            except SequenceFileError as err:
                if on_error == "raise":
                    raise
                return err

        threads = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(threads) as pool:
            loaded = list(
                tqdm(pool.map(load, entries), total=len(entries), desc="loading sequences", unit="seq", disable=not progress)
            )
        kept_entries, arrays = [], []
        for entry, item in zip(entries, loaded):
            if isinstance(item, SequenceFileError):
                self.skipped.append((entry.path, item.problem))
            else:
                kept_entries.append(entry)
                arrays.append(item)
        return kept_entries, arrays

    def _set_entries(self, entries: list[SequenceEntry]) -> None:
        self.paths = [e.path for e in entries]
        self.subject_ids = np.array([e.subject for e in entries])
        self.types = np.array([e.type for e in entries])
        self.views = np.array([e.view for e in entries])
        ids = sorted(set(self.subject_ids.tolist()), key=natural_key)
        index = {sid: i for i, sid in enumerate(ids)}
        self.labels = np.array([index[s] for s in self.subject_ids], dtype=np.int64)
        self.num_ids = len(ids)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index]
        return load_sequence(self.paths[index])

    def __repr__(self) -> str:
        return (
            f"GaitDataset({str(self.root)!r}, split={self.split!r}: {len(self)} sequences, {self.num_ids} subjects, "
            f"{len(set(self.views.tolist()))} views, {self.num_skipped} skipped, cached={self.cached})"
        )
