"""TripletSampler: P x K composition, the DDP split, and exact resume."""
from itertools import islice

import numpy as np
import pytest

from fastgait.data import TripletSampler

# 6 identities with 1..6 sequences each, interleaved.
LABELS = np.array([i for n in range(6) for i in range(n, 6)])
rng = np.random.default_rng(0)
LABELS = LABELS[rng.permutation(len(LABELS))] * 10  # labels need not be contiguous


def test_composition():
    sampler = TripletSampler(LABELS, 4, 3, seed=0)
    for batch in islice(iter(sampler), 50):
        assert len(batch) == 12
        labels = LABELS[[i for i, _ in batch]].reshape(4, 3)
        assert len(set(labels[:, 0])) == 4  # P distinct identities
        assert np.all(labels == labels[:, :1])  # K sequences of each, grouped by identity


def test_without_replacement_when_enough_and_with_replacement_when_not():
    sampler = TripletSampler(LABELS, 6, 4, seed=0)
    counts = np.bincount(LABELS // 10)
    repeated_small = False
    for iteration in range(20):
        indices = np.array([i for i, _ in sampler.global_batch(iteration)]).reshape(6, 4)
        for group in indices:
            identity = LABELS[group[0]] // 10
            if counts[identity] >= 4:
                assert len(set(group)) == 4
            else:
                assert set(group) <= set(np.flatnonzero(LABELS // 10 == identity))
                repeated_small = True
    assert repeated_small


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_ranks_split_the_single_process_batch(world_size):
    single = TripletSampler(LABELS, 4, 3, seed=5)
    ranks = [TripletSampler(LABELS, 4, 3, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for iteration in range(10):
        slices = [r.batch(iteration) for r in ranks]
        assert all(len(s) == 12 // world_size for s in slices)
        # OpenGait's split: rank r holds global[r::world_size]
        assert [s[i] for i in range(12 // world_size) for s in slices] == single.batch(iteration)


def test_resume_reproduces_exactly():
    uninterrupted = list(islice(iter(TripletSampler(LABELS, 3, 2, seed=9)), 12))
    resumed = list(islice(iter(TripletSampler(LABELS, 3, 2, seed=9, start_iteration=7)), 5))
    assert resumed == uninterrupted[7:]
    assert list(islice(iter(TripletSampler(LABELS, 3, 2, seed=10)), 12)) != uninterrupted


def test_clip_seeds_are_per_slot():
    batch = TripletSampler(LABELS, 4, 3, seed=0).batch(0)
    seeds = [s for _, s in batch]
    assert len(set(seeds)) == len(seeds) and all(isinstance(s, int) and s >= 0 for s in seeds)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"P": 7, "K": 2}, "only 6"),
        ({"P": 3, "K": 3, "world_size": 2}, "divisible"),
        ({"P": 2, "K": 2, "rank": 2, "world_size": 2}, "rank"),
        ({"P": 0, "K": 2}, ">= 1"),
        ({"P": 2, "K": 2, "seed": -1}, ">= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    P, K = kwargs.pop("P"), kwargs.pop("K")
    with pytest.raises(ValueError, match=message):
        TripletSampler(LABELS, P, K, **kwargs)
