"""GaitDataset over the processed layout, partitions, clear errors, and the train/test loaders."""
import numpy as np
import pytest
import torch

from fastgait.data import (
    GaitDataset,
    SequenceFileError,
    TripletSampler,
    casia_b_partition,
    load_sequence,
    make_test_loader,
    make_train_loader,
    random_clip,
    read_partition,
    save_sequence,
    write_casia_b_partition,
    write_partition,
)

SUBJECTS = ["001", "002", "003", "010"]
TYPES = ["nm-01", "nm-02", "bg-01"]
VIEWS = ["000", "090", "180"]


def sequence_for(subject, type_name, view):
    """Distinct, recognisable content per sequence: every pixel encodes the sequence."""
    frames = 20 + SUBJECTS.index(subject) * 5 + VIEWS.index(view)
    value = 10 * SUBJECTS.index(subject) + 3 * TYPES.index(type_name) + VIEWS.index(view) + 1
    sils = np.full((frames, 64, 64), value, np.uint8)
    sils[:, :, :10] = 255  # the columns cut at load time
    sils[np.arange(frames), 0, 32] = np.arange(frames)  # frame order is visible
    return sils


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    for s in SUBJECTS:
        for t in TYPES:
            for v in VIEWS:
                suffix = ".npy" if (s, v) == ("002", "090") else ".pkl"
                save_sequence(root / s / t / v / f"{v}{suffix}", sequence_for(s, t, v))
    write_partition(root / "partition.json", ["001", "003"], ["002", "010"])
    return root


def test_round_trip_of_the_layout(layout):
    data = GaitDataset(layout, split="all", progress=False)
    assert len(data) == len(SUBJECTS) * len(TYPES) * len(VIEWS)
    assert data.num_ids == 4 and data.num_skipped == 0 and data.cached
    assert data.labels.dtype == np.int64
    for i in range(len(data)):
        s, t, v = data.subject_ids[i], data.types[i], data.views[i]
        np.testing.assert_array_equal(data[i], sequence_for(s, t, v))
        assert data.labels[i] == SUBJECTS.index(s)


@pytest.mark.parametrize("cache", [True, False])
def test_splits_have_contiguous_labels(layout, cache):
    train = GaitDataset(layout, split="train", cache=cache, progress=False)
    test = GaitDataset(layout, layout / "partition.json", split="test", cache=cache, progress=False)
    assert set(train.subject_ids) == {"001", "003"} and set(test.subject_ids) == {"002", "010"}
    for data in (train, test):
        assert data.cached is cache
        assert sorted(set(data.labels.tolist())) == [0, 1] and data.num_ids == 2
        np.testing.assert_array_equal(data[0], load_sequence(data.paths[0]))
    assert test.labels[test.subject_ids == "010"][0] == 1  # natural order: 002 before 010


def test_a_folder_of_several_files_needs_in_use(layout):
    folder = layout / "001" / "nm-01" / "000"
    save_sequence(folder / "zz-second.pkl", np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(SequenceFileError, match=r"000: holds 2 sequence files \['000.pkl', 'zz-second.pkl'\].*data.in_use"):
        GaitDataset(layout, split="all", progress=False)


def corrupt_one(layout):
    bad = layout / "003" / "bg-01" / "090" / "090.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    return bad


def test_bad_file_raises_naming_it(layout):
    bad = corrupt_one(layout)
    with pytest.raises(SequenceFileError, match="corrupt") as info:
        GaitDataset(layout, split="train", progress=False)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("cache", [True, False])
def test_bad_files_can_be_skipped_and_counted(layout, cache):
    bad = corrupt_one(layout)
    (layout / "001" / "nm-02" / "180" / "180.pkl").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2"):
        data = GaitDataset(layout, split="train", cache=cache, on_error="skip", progress=False)
    assert data.num_skipped == 2 and len(data) == 2 * len(TYPES) * len(VIEWS) - 2
    assert bad in [path for path, _ in data.skipped] and bad not in data.paths
    assert {problem.split(" ")[0] for _, problem in data.skipped} == {"corrupt", "file"}


def test_missing_root_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m fastgait.data.synthetic"):
        GaitDataset(tmp_path / "nowhere")


def test_missing_partition_names_the_path(layout):
    (layout / "partition.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"partition.json.*split='all'"):
        GaitDataset(layout, split="train")
    with pytest.raises(FileNotFoundError, match="other.json"):
        GaitDataset(layout, layout / "other.json", split="train")
    assert len(GaitDataset(layout, split="all", progress=False)) > 0


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "001" / "nm-01" / "000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no sequence files.*synthetic"):
        GaitDataset(tmp_path, split="all")


def test_bad_arguments(layout):
    with pytest.raises(ValueError, match="split"):
        GaitDataset(layout, split="val")
    with pytest.raises(ValueError, match="on_error"):
        GaitDataset(layout, on_error="ignore")
    (layout / "bad.json").write_text('{"TRAIN": []}')
    with pytest.raises(ValueError, match="TRAIN_SET and TEST_SET"):
        GaitDataset(layout, layout / "bad.json")


def test_casia_b_split_presets(tmp_path):
    ids = [f"{i:03d}" for i in range(1, 125)]
    for setting, n_train in [("ST", 24), ("MT", 62), ("LT", 74)]:
        partition = casia_b_partition(list(reversed(ids)), setting)
        assert partition["TRAIN_SET"] == ids[:n_train] and partition["TEST_SET"] == ids[n_train:]
    for sid in ids[:30]:
        (tmp_path / sid).mkdir()
    path = write_casia_b_partition(tmp_path, "ST")
    assert read_partition(path) == {"TRAIN_SET": ids[:24], "TEST_SET": ids[24:30]}
    with pytest.raises(ValueError, match="setting"):
        casia_b_partition(ids, "XL")


def test_random_clip_is_contiguous_and_tiles_short_sequences():
    sils = np.arange(12, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    clip = random_clip(sils, 5, clip_seed=3)
    assert np.all(np.diff(clip[:, 0, 0].astype(int)) == 1)
    np.testing.assert_array_equal(clip, random_clip(sils, 5, clip_seed=3))
    starts = {int(random_clip(sils, 5, seed)[0, 0, 0]) for seed in range(200)}
    assert starts == set(range(8))  # every window is reachable
    short = random_clip(sils[:4], 10, clip_seed=0)[:, 0, 0].tolist()
    assert len(short) == 10 and all((b - a) % 4 == 1 for a, b in zip(short, short[1:]))


def expected_batch(data, elements, clip_len):
    clips = [random_clip(data[i], clip_len, seed)[:, :, 10:54] for i, seed in elements]
    return torch.from_numpy(np.stack(clips)).float() / 255, torch.tensor([data.labels[i] for i, _ in elements])


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_batches(layout, workers):
    data = GaitDataset(layout, split="all", progress=False)
    loader = make_train_loader(data, 2, 3, clip_len=24, workers=workers, seed=7, start_iteration=4)
    sampler = TripletSampler(data.labels, 2, 3, seed=7)
    for iteration, (sils, labels) in zip(range(4, 7), loader):
        assert sils.shape == (6, 24, 64, 44) and sils.dtype == torch.float32
        assert labels.dtype == torch.int64
        expected_sils, expected_labels = expected_batch(data, sampler.batch(iteration), 24)
        torch.testing.assert_close(sils, expected_sils)
        torch.testing.assert_close(labels, expected_labels)
        assert 0.0 <= sils.min() and sils.max() < 1.0  # the 255 columns were cut


def test_train_loader_rank_slices(layout):
    data = GaitDataset(layout, split="all", progress=False)
    full = next(iter(make_train_loader(data, 2, 4, workers=0, seed=1)))
    parts = [next(iter(make_train_loader(data, 2, 4, workers=0, seed=1, rank=r, world_size=2))) for r in (0, 1)]
    # OpenGait's split: rank r takes every world_size-th sample of the global batch, from r
    for r, part in enumerate(parts):
        torch.testing.assert_close(part[0], full[0][r::2])
        torch.testing.assert_close(part[1], full[1][r::2])


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_gives_whole_ordered_sequences(layout, workers):
    data = GaitDataset(layout, split="test", progress=False)
    items = list(make_test_loader(data, workers=workers))
    assert len(items) == len(data)
    for i, (sils, label, type_name, view) in enumerate(items):
        expected = sequence_for(data.subject_ids[i], type_name, view)
        assert sils.shape == (1, len(expected), 64, 44) and sils.dtype == torch.float32
        torch.testing.assert_close(sils[0], torch.from_numpy(expected[:, :, 10:54]).float() / 255)
        assert label == data.labels[i] and type_name == data.types[i] and view == data.views[i]
