"""Frame samplers (OpenGait's sample_type): composition, determinism per (seed, iteration), short
sequences, the DDP split, resume, and the test-time frame limit."""
from itertools import islice

import numpy as np
import pytest
import torch

from fastgait.data import FrameBatchSampler, FrameSampler, TripletSampler, limit_frames, random_clip
from fastgait.data import loader
from fastgait.data.loader import TrainClips

SEEDS = range(40)


@pytest.mark.parametrize("seq_len", [1, 7, 29, 30, 31, 90])
def test_fixed_ordered_is_todays_contiguous_window(seq_len):
    sampler = FrameSampler("fixed_ordered", frames_num_fixed=30)
    sils = np.arange(seq_len)
    for seed in SEEDS:
        clip = sampler.clip(sils, seed)
        np.testing.assert_array_equal(clip, random_clip(sils, 30, seed))  # identical to the pre-sampler clips
        assert len(clip) == 30 and np.all(np.diff(clip) % seq_len == 1 % seq_len)


@pytest.mark.parametrize("seq_len", [5, 30, 80])
def test_fixed_ordered_with_skip_keeps_order_inside_a_window(seq_len):
    sampler = FrameSampler("fixed_ordered", frames_num_fixed=10, frames_skip_num=6)
    starts = set()
    for seed in SEEDS:
        idx = sampler.indices(seq_len, seed)
        assert len(idx) == 10 and idx.min() >= 0 and idx.max() < seq_len
        if seq_len >= 16:  # no wrap-around inside a window: increasing, spanning at most 16 frames
            assert np.all(np.diff(idx) >= 1) and idx[-1] - idx[0] <= 15
        else:  # tiled: the shortest increasing unrolling of the picks fits in one 16-frame window
            steps = np.diff(idx) % seq_len
            steps[steps == 0] = seq_len
            assert steps.sum() <= 15, idx
        starts.add(int(idx[0]))
    assert len(starts) > 3 if seq_len > 20 else True


def test_fixed_unordered_draws_without_repeats_unless_short():
    sampler = FrameSampler("fixed_unordered", frames_num_fixed=30)
    orders = set()
    for seed in SEEDS:
        long = sampler.indices(50, seed)
        assert len(long) == 30 and len(set(long.tolist())) == 30 and long.max() < 50
        orders.add(bool(np.all(np.diff(long) > 0)))
        short = sampler.indices(12, seed)
        assert len(short) == 30 and short.max() < 12 and len(set(short.tolist())) <= 12  # repeats
    assert False in orders  # not ordered


def test_unfixed_length_is_per_batch_and_within_bounds():
    sampler = FrameSampler("unfixed_unordered", frames_num_min=20, frames_num_max=24)
    lengths = [sampler.batch_frames(3, i) for i in range(200)]
    assert set(lengths) == set(range(20, 25))
    assert lengths == [sampler.batch_frames(3, i) for i in range(200)]  # pure function of (seed, iteration)
    assert lengths != [sampler.batch_frames(4, i) for i in range(200)]
    ordered = FrameSampler("unfixed_ordered", frames_num_min=8, frames_num_max=8)
    idx = ordered.indices(40, 1, ordered.batch_frames(0, 0))
    assert len(idx) == 8 and np.all(np.diff(idx) == 1)


def test_every_sampler_is_a_pure_function_of_the_clip_seed():
    for kind in ("fixed_ordered", "fixed_unordered", "unfixed_ordered", "unfixed_unordered"):
        sampler = FrameSampler(kind, frames_num_fixed=9)
        for seed in SEEDS:
            np.testing.assert_array_equal(sampler.indices(23, seed, 9), sampler.indices(23, seed, 9))
        assert len({tuple(sampler.indices(23, s, 9)) for s in SEEDS}) > 10


LABELS = np.repeat(np.arange(6), 4)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batches_split_across_ranks_and_resume_exactly(world_size):
    frames = FrameSampler("unfixed_unordered", frames_num_min=3, frames_num_max=9)
    single = list(islice(FrameBatchSampler(TripletSampler(LABELS, 4, 2, seed=7), frames, seed=7), 12))
    for iteration, batch in enumerate(single):
        assert {n for _, _, n in batch} == {frames.batch_frames(7, iteration)}
    ranks = [
        list(islice(FrameBatchSampler(TripletSampler(LABELS, 4, 2, seed=7, rank=r, world_size=world_size),
                                      frames, seed=7), 12))
        for r in range(world_size)
    ]
    for iteration in range(12):  # OpenGait's split: rank r takes global[r::world_size]
        for r in range(world_size):
            assert ranks[r][iteration] == single[iteration][r::world_size]
    resumed = list(islice(FrameBatchSampler(TripletSampler(LABELS, 4, 2, seed=7, start_iteration=5), frames,
                                            seed=7, start_iteration=5), 7))
    assert resumed == single[5:]


class Sequences:
    """A stand-in dataset: sequence i has 3 + i frames whose pixels hold the frame number."""

    def __init__(self, n=6):
        self.items = [np.broadcast_to(np.arange(3 + i, dtype=np.uint8)[:, None, None], (3 + i, 64, 64)) for i in range(n)]
        self.labels = np.arange(n)
        self.types = np.array(["00"] * n)
        self.views = np.array(["000"] * n)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_train_clips_apply_the_sampler_and_cut_to_64x44():
    data = Sequences()
    clips = TrainClips(data, frames=FrameSampler("fixed_unordered", frames_num_fixed=10))
    clip, label = clips[(2, 11, 10)]
    assert clip.shape == (10, 64, 44) and label == 2
    np.testing.assert_array_equal(clip[:, 0, 0], FrameSampler("fixed_unordered").indices(5, 11, 10))
    clip, _ = TrainClips(data, clip_len=4)[(5, 3)]  # (index, clip_seed) elements: fixed_ordered windows
    np.testing.assert_array_equal(clip[:, 0, 0], random_clip(np.arange(8), 4, 3))


def test_frames_all_limit_keeps_the_first_frames():
    data = Sequences()
    sils, *_ = loader.TestSequences(data, frames_all_limit=4)[5]
    assert sils.shape == (1, 4, 64, 44)
    np.testing.assert_allclose(sils[0, :, 0, 0].numpy() * 255, np.arange(4))
    assert loader.TestSequences(data)[5][0].shape == (1, 8, 64, 44)
    assert limit_frames(np.arange(3), 10).tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_type": "fixed"}, "fixed_ordered, fixed_unordered"),
    ({"sample_type": "unfixed"}, "must be one of"),
    ({"frames_num_fixed": 0}, "frames_num_fixed must be an integer >= 1"),
    ({"frames_num_min": 9, "frames_num_max": 4}, "swap them"),
    ({"frames_skip_num": -1}, "frames_skip_num"),
    ({"sample_type": "fixed_unordered", "frames_skip_num": 2}, "ordered samplers only"),
])
def test_bad_options_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrameSampler(**kwargs)
    with pytest.raises(ValueError, match="frames_all_limit"):
        limit_frames(np.arange(3), 0)


def test_recipe_options():
    sampler = FrameSampler.from_config({"clip_len": 30, "sample_type": "fixed_unordered"})
    assert sampler == FrameSampler("fixed_unordered", frames_num_fixed=30)
    from fastgait.config import load_config

    config = load_config("demo_cpu", ["train.sample_type=unfixed_ordered", "train.frames_num_min=10",
                                      "train.frames_num_max=12", "eval.frames_all_limit=720"])
    sampler = FrameSampler.from_config(config["train"])
    assert sampler.sample_type == "unfixed_ordered" and (sampler.frames_num_min, sampler.frames_num_max) == (10, 12)
    assert config["eval"]["frames_all_limit"] == 720
    assert torch.is_tensor(torch.zeros(1))
