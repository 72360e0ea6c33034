"""``TripletSampler``: P identities x K sequences per global batch, split across DDP ranks (data.md §4)."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

SEED_LIMIT = 2**63 - 1


class TripletSampler(torch.utils.data.Sampler):
    """An infinite stream of local batches for ``DataLoader(batch_sampler=...)``.

    Global batch ``i`` holds ``P`` distinct identities with ``K`` sequences each (drawn with
    replacement when an identity has fewer than ``K``), identity by identity. It is a pure
    function of ``(seed, i)`` (``numpy.random.default_rng([seed, i])``), so a run resumed at
    ``start_iteration`` sees exactly the batches it would have seen, whatever the number of
    workers or ranks. Rank ``r`` of ``world_size`` gets every ``world_size``-th element starting at
    ``r`` (``global[r::world_size]``, ``P * K / world_size`` of them), as OpenGait's sampler splits:
    with ``K >= world_size`` every rank holds every identity of the batch, so a BatchNorm that is not
    synchronised still normalises over all identities (a contiguous split would give a rank whole
    identities: one identity per GPU with P = 8 on 8 GPUs).

    Each element is ``(sequence_index, clip_seed)``: ``clip_seed`` (an int drawn from the same
    generator, so a function of ``(seed, i, slot)``) picks the sequence's random clip window.
    """

    def __init__(
        self,
        labels: Sequence[int],
        P: int,
        K: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_iteration: int = 0,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("labels must be a non-empty 1-D sequence")
        self.identities, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        if P > len(self.identities):
            raise ValueError(f"P={P} identities per batch, but the labels hold only {len(self.identities)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if (P * K) % world_size:
            raise ValueError(f"the global batch P*K={P * K} must be divisible by world_size={world_size}")
        if seed < 0 or start_iteration < 0:
            raise ValueError("seed and start_iteration must be >= 0")
        self.P, self.K = P, K
        self.rank, self.world_size = rank, world_size
        self.seed, self.start_iteration = seed, start_iteration

    @property
    def local_batch_size(self) -> int:
        return self.P * self.K // self.world_size

    def global_batch(self, iteration: int) -> list[tuple[int, int]]:
        """All ``P * K`` elements ``(sequence_index, clip_seed)`` of batch ``iteration``."""
        rng = np.random.default_rng([self.seed, iteration])
        indices = []
        for identity in rng.choice(len(self.identities), self.P, replace=False):
            members = self.members[identity]
            indices.append(rng.choice(members, self.K, replace=len(members) < self.K))
        clip_seeds = rng.integers(0, SEED_LIMIT, size=self.P * self.K)
        return [(int(i), int(s)) for i, s in zip(np.concatenate(indices), clip_seeds)]

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's slice of batch ``iteration``."""
        return self.global_batch(iteration)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iteration
        while True:
            yield self.batch(iteration)
            iteration += 1
