"""Frame samplers: which frames of a sequence make a training clip (OpenGait's ``sample_type``).

A clip is a pure function of ``(clip_seed, frames_num)`` and the sequence length, and
``frames_num`` a pure function of ``(seed, iteration)``; ``clip_seed`` comes from the
:class:`~fastgait.data.TripletSampler` as a function of ``(seed, iteration, slot)``. So a batch
does not depend on the number of workers or ranks, and a resumed run sees the same clips.

``sample_type`` (``train.sample_type`` in a recipe):

- ``fixed_ordered`` (the default; GaitGL, GaitMask): ``frames_num_fixed`` frames in order. A
  window of ``frames_num_fixed + frames_skip_num`` consecutive frames starts at a random place
  (the sequence tiled whole first when it is shorter than the window); with
  ``frames_skip_num > 0``, ``frames_num_fixed`` frames of the window are kept, in order.
- ``fixed_unordered`` (GaitSet, GaitBase): ``frames_num_fixed`` frames drawn at random, without
  order; without repeats, unless the sequence is shorter than ``frames_num_fixed``.
- ``unfixed_ordered`` / ``unfixed_unordered``: as the fixed ones, with ``frames_num`` drawn
  uniformly from ``frames_num_min..frames_num_max`` per *batch* (OpenGait draws it per sequence
  and concatenates the batch along time; fastgait's models take ``[n, T, H, W]``, so one batch
  shares one length).

At test time every frame is used, in order; ``eval.frames_all_limit`` (OpenGait's
``frames_all_limit``) keeps only the first that many (``-1``: all).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

SAMPLE_TYPES = ("fixed_ordered", "fixed_unordered", "unfixed_ordered", "unfixed_unordered")
_UNFIXED_STREAM = 0x6672616D  # separates the per-batch length draw from the sampler's own stream


@dataclass(frozen=True)
class FrameSampler:
    """How a training clip is drawn from a sequence (see the module docstring)."""

    sample_type: str = "fixed_ordered"
    frames_num_fixed: int = 30
    frames_num_min: int = 25
    frames_num_max: int = 35
    frames_skip_num: int = 0

    def __post_init__(self):
        if self.sample_type not in SAMPLE_TYPES:
            raise ValueError(f"train.sample_type must be one of {', '.join(SAMPLE_TYPES)}; got {self.sample_type!r}")
        for name in ("frames_num_fixed", "frames_num_min", "frames_num_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.frames_num_min > self.frames_num_max:
            raise ValueError(
                f"frames_num_min={self.frames_num_min} is above frames_num_max={self.frames_num_max}; swap them"
            )
        skip = self.frames_skip_num
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
            raise ValueError(f"frames_skip_num must be an integer >= 0, got {skip!r}")
        if skip and not self.ordered:
            raise ValueError(f"frames_skip_num applies to the ordered samplers only, not {self.sample_type}")

    @property
    def fixed(self) -> bool:
        return self.sample_type.startswith("fixed")

    @property
    def ordered(self) -> bool:
        return self.sample_type.endswith("_ordered")

    def batch_frames(self, seed: int, iteration: int) -> int:
        """The clip length of global batch ``iteration``: fixed, or drawn from ``(seed, iteration)``."""
        if self.fixed:
            return int(self.frames_num_fixed)
        rng = np.random.default_rng([seed, iteration, _UNFIXED_STREAM])
        return int(rng.integers(self.frames_num_min, self.frames_num_max + 1))

    def indices(self, seq_len: int, clip_seed: int, frames_num: Optional[int] = None) -> np.ndarray:
        """Frame indices (into a sequence of ``seq_len`` frames) of the clip ``clip_seed`` picks."""
        if seq_len < 1:
            raise ValueError("cannot sample frames from an empty sequence")
        frames_num = int(self.frames_num_fixed if frames_num is None else frames_num)
        rng = np.random.default_rng(clip_seed)
        if not self.ordered:
            return rng.choice(seq_len, frames_num, replace=seq_len < frames_num)
        window = frames_num + self.frames_skip_num
        tiled = seq_len * -(-window // seq_len) if seq_len < window else seq_len
        start = int(rng.integers(0, tiled - window + 1))
        if self.frames_skip_num:
            kept = np.sort(rng.choice(window, frames_num, replace=False))
        else:
            kept = np.arange(frames_num)
        return (start + kept) % seq_len

    def clip(self, sils: np.ndarray, clip_seed: int, frames_num: Optional[int] = None) -> np.ndarray:
        """The clip ``sils[indices]`` (``sils`` is ``[T, ...]``)."""
        return sils[self.indices(len(sils), clip_seed, frames_num)]

    @classmethod
    def from_config(cls, train_cfg: dict) -> "FrameSampler":
        """From a recipe's ``train`` section: ``clip_len`` (frames_num_fixed), ``sample_type``,
        ``frames_num_min``, ``frames_num_max``, ``frames_skip_num`` (absent keys: the defaults)."""
        defaults = cls()
        return cls(
            sample_type=train_cfg.get("sample_type", defaults.sample_type),
            frames_num_fixed=train_cfg.get("clip_len", defaults.frames_num_fixed),
            frames_num_min=train_cfg.get("frames_num_min", defaults.frames_num_min),
            frames_num_max=train_cfg.get("frames_num_max", defaults.frames_num_max),
            frames_skip_num=train_cfg.get("frames_skip_num", defaults.frames_skip_num),
        )


def limit_frames(sils: np.ndarray, frames_all_limit: int = -1) -> np.ndarray:
    """The first ``frames_all_limit`` frames of a test sequence (``-1``: all), as OpenGait's ``all_ordered``."""
    if isinstance(frames_all_limit, bool) or not isinstance(frames_all_limit, (int, np.integer)) or (
        frames_all_limit < 1 and frames_all_limit != -1
    ):
        raise ValueError(f"eval.frames_all_limit must be -1 (all frames) or an integer >= 1, got {frames_all_limit!r}")
    return sils if frames_all_limit == -1 else sils[:frames_all_limit]


class FrameBatchSampler(torch.utils.data.Sampler):
    """Wraps a batch sampler of ``(sequence_index, clip_seed)`` elements (``TripletSampler``) and
    adds each batch's clip length: elements become ``(sequence_index, clip_seed, frames_num)``.

    ``frames_num`` is :meth:`FrameSampler.batch_frames` of ``(seed, iteration)``, the same on
    every rank, counting iterations from ``start_iteration`` as the wrapped sampler does.
    """

    def __init__(self, batch_sampler, frames: FrameSampler, seed: int = 0, start_iteration: int = 0):
        self.batch_sampler = batch_sampler
        self.frames = frames
        self.seed = seed
        self.start_iteration = start_iteration

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for iteration, batch in zip(itertools.count(self.start_iteration), self.batch_sampler):
            frames_num = self.frames.batch_frames(self.seed, iteration)
            yield [(int(index), int(clip_seed), frames_num) for index, clip_seed in batch]
