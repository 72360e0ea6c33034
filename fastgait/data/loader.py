"""Training clips and test sequences as torch DataLoaders (data.md §4).

Training: ``TripletSampler`` picks ``(sequence_index, clip_seed)``; the worker cuts a random
contiguous ``clip_len`` window (the sequence tiled first when shorter) chosen by ``clip_seed``,
so batches do not depend on the number of workers. Testing: whole sequences, frames in order.
Frames are cut to 64x44 (10 columns off each side) and scaled to [0, 1] float32.

Workers: the dataset's cache is filled in the main process before the workers start, and on
platforms that have ``fork`` the workers are forked, so they share it copy-on-write (no copy,
no reload). Elsewhere the dataset is pickled to each worker.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Optional

import numpy as np
import torch

from .frames import FrameBatchSampler, FrameSampler, limit_frames
from .sampler import TripletSampler

CUT = 10  # columns dropped on each side: 64 -> 44


def cut_frames(sils: np.ndarray) -> np.ndarray:
    """``[..., 64, 64]`` -> ``[..., 64, 44]`` (a view)."""
    return sils[..., CUT : sils.shape[-1] - CUT]


def to_float(sils: np.ndarray) -> torch.Tensor:
    """uint8 silhouettes to a float32 tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(sils)).float().div_(255.0)


def random_clip(sils: np.ndarray, clip_len: int, clip_seed: int) -> np.ndarray:
    """A contiguous ``clip_len``-frame window of ``sils [T, ...]``, its start drawn from ``clip_seed``.

    Sequences shorter than ``clip_len`` are tiled (repeated whole) first.
    """
    if len(sils) < clip_len:
        sils = np.concatenate([sils] * -(-clip_len // len(sils)))
    start = int(np.random.default_rng(clip_seed).integers(0, len(sils) - clip_len + 1))
    return sils[start : start + clip_len]


class TrainClips(torch.utils.data.Dataset):
    """``clips[(index, clip_seed[, frames_num])]`` -> ``(uint8 clip [frames_num, 64, 44], label)`` of a ``GaitDataset``.

    ``frames``: the :class:`FrameSampler` (default: ``fixed_ordered`` windows of ``clip_len``).
    """

    def __init__(self, dataset, clip_len: int = 30, frames: Optional[FrameSampler] = None):
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.dataset = dataset
        self.frames = frames or FrameSampler("fixed_ordered", frames_num_fixed=clip_len)
        self.clip_len = self.frames.frames_num_fixed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple) -> tuple[np.ndarray, int]:
        index, clip_seed, *rest = item
        clip = self.frames.clip(self.dataset[index], clip_seed, rest[0] if rest else None)
        return cut_frames(clip), int(self.dataset.labels[index])


def collate_clips(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips to ``(sils float32 [n, clip_len, 64, 44] in [0, 1], labels int64 [n])``."""
    clips, labels = zip(*batch)
    return to_float(np.stack(clips)), torch.tensor(labels, dtype=torch.int64)


class TestSequences(torch.utils.data.Dataset):
    """``sequences[i]`` -> ``(sils float32 [1, T, 64, 44], label, type, view)``: the whole sequence in order
    (its first ``frames_all_limit`` frames when that is not -1)."""

    def __init__(self, dataset, frames_all_limit: int = -1):
        limit_frames(np.zeros(1), frames_all_limit)  # validates
        self.dataset = dataset
        self.frames_all_limit = frames_all_limit

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, str]:
        d = self.dataset
        sils = limit_frames(d[index], self.frames_all_limit)
        return to_float(cut_frames(sils))[None], int(d.labels[index]), str(d.types[index]), str(d.views[index])


def default_workers() -> int:
    """Loader processes by default: one per CPU but one (kept for the training loop), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _loader_options(workers: Optional[int], pin_memory: Optional[bool]) -> dict:
    workers = default_workers() if workers is None else workers
    options = {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
    if workers > 0:
        options["persistent_workers"] = True
        options["prefetch_factor"] = 4
        if "fork" in multiprocessing.get_all_start_methods():
            options["multiprocessing_context"] = "fork"
    return options


def make_train_loader(
    dataset,
    P: int,
    K: int,
    *,
    clip_len: int = 30,
    workers: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_iteration: int = 0,
    pin_memory: Optional[bool] = None,
    frames: Optional[FrameSampler] = None,
) -> torch.utils.data.DataLoader:
    """An infinite loader of ``(sils float32 [P*K/world_size, frames_num, 64, 44], labels int64)`` batches.

    Batches come from :class:`TripletSampler` (``seed``, ``start_iteration``, ``rank``,
    ``world_size`` as there); clips from ``frames`` (a :class:`~fastgait.data.frames.FrameSampler`;
    default ``fixed_ordered`` windows of ``clip_len`` frames). ``workers``: loader processes (0:
    load in this process; default :func:`default_workers`). ``pin_memory``: default on when CUDA
    is available.
    """
    frames = frames or FrameSampler("fixed_ordered", frames_num_fixed=clip_len)
    sampler = TripletSampler(
        dataset.labels, P, K, rank=rank, world_size=world_size, seed=seed, start_iteration=start_iteration
    )
    sampler = FrameBatchSampler(sampler, frames, seed=seed, start_iteration=start_iteration)
    return torch.utils.data.DataLoader(
        TrainClips(dataset, frames=frames),
        batch_sampler=sampler,
        collate_fn=collate_clips,
        **_loader_options(workers, pin_memory),
    )


def make_test_loader(
    dataset, workers: Optional[int] = None, pin_memory: Optional[bool] = None, frames_all_limit: int = -1
) -> torch.utils.data.DataLoader:
    """One item per sequence, in dataset order: ``(sils float32 [1, T, 64, 44], label, type, view)``;
    ``frames_all_limit``: keep only the first that many frames (-1: all)."""
    return torch.utils.data.DataLoader(
        TestSequences(dataset, frames_all_limit), batch_size=None, shuffle=False, **_loader_options(workers, pin_memory)
    )
