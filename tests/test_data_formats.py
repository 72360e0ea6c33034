"""Every layout and dtype a gait user holds, read in the train and the test split, with the model
input each must give (the 64x44 float frames OpenGait's transforms give for the standard format).

Conversions (docs/DATA.md, "What is read"): lists of frames stacked; 64x44 taken as already cut;
other square sizes / 64:44 sizes resized by area averaging; floats in [0, 1] or [0, 255] scaled;
several files in a sequence folder selected by data.in_use.
"""
import pickle
import zlib

import numpy as np
import pytest
import torch

from fastgait.data import GaitDataset, SequenceFileError, load_sequence, make_test_loader, make_train_loader
from fastgait.data.layout import write_partition

SUBJECTS = ["001", "002", "003", "004"]  # 001, 002 train; 003, 004 test
VIEWS = ["000", "090"]


def silhouettes(key, frames, height, width):
    """Distinct random 0/255 frames per sequence (a bit of grey too)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    sils = (rng.random((frames, height, width)) > 0.6).astype(np.uint8) * 255
    sils[:, 0, 0] = rng.integers(0, 256, frames)
    return sils


def opengait_input(stored_uint8_64x64):
    """What OpenGait's BaseSilCuttingTransform feeds the model for a 64x64 uint8 sequence."""
    return stored_uint8_64x64[..., 10:-10].astype(np.float32) / 255.0


def block_mean(sils, factor):
    t, h, w = sils.shape
    return sils.astype(np.float64).reshape(t, h // factor, factor, w // factor, factor).mean((2, 4))


def build(root, write):
    """``write(folder, key)`` writes one sequence's file(s) and returns the expected model input [T, 64, 44]."""
    expected = {}
    for s in SUBJECTS:
        for v in VIEWS:
            key = f"{s}-00-{v}"
            expected[key] = write(root / s / "00" / v, key, v)
    write_partition(root / "partition.json", SUBJECTS[:2], SUBJECTS[2:])
    return expected


def standard(folder, key, view):
    sils = silhouettes(key, 12, 64, 64)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps(sils))
    return opengait_input(sils)


def frame_list(folder, key, view):
    sils = silhouettes(key, 12, 64, 64)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps([frame for frame in sils]))
    return opengait_input(sils)


def already_cut(folder, key, view):
    sils = silhouettes(key, 12, 64, 44)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps(sils))
    return sils.astype(np.float32) / 255.0  # OpenGait's BaseSilTransform on pre-cut data: no cut


def size_128(folder, key, view):
    sils = silhouettes(key, 12, 128, 128)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps(sils))
    return (np.rint(block_mean(sils, 2))[..., 10:-10] / 255.0).astype(np.float32)


def size_128x88(folder, key, view):
    sils = silhouettes(key, 12, 128, 88)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps(sils))
    return (np.rint(block_mean(sils, 2)) / 255.0).astype(np.float32)


def float_0_255(folder, key, view):
    sils = silhouettes(key, 12, 64, 64)
    folder.mkdir(parents=True)
    (folder / f"{view}.pkl").write_bytes(pickle.dumps(sils.astype(np.float32)))
    return opengait_input(sils)


def float_0_1(folder, key, view):
    sils = silhouettes(key, 12, 64, 64)
    folder.mkdir(parents=True)
    np.save(folder / f"{view}.npy", sils.astype(np.float64) / 255.0)
    return opengait_input(sils)


def casia_b_star(folder, key, view):
    """CASIA-B*: <view>-aligned-sils.pkl (64x44) beside ratios, rgbs and raw sils."""
    aligned = silhouettes(key, 12, 64, 44)
    folder.mkdir(parents=True)
    (folder / f"{view}-aligned-sils.pkl").write_bytes(pickle.dumps(aligned))
    (folder / f"{view}-ratios.pkl").write_bytes(pickle.dumps(np.linspace(0.5, 1, 12)))
    (folder / f"{view}-rgbs.pkl").write_bytes(pickle.dumps(np.zeros((12, 3, 64, 64), np.uint8)))
    (folder / f"{view}-sils.pkl").write_bytes(pickle.dumps(silhouettes(key + "raw", 12, 128, 128)))
    return aligned.astype(np.float32) / 255.0


def gait3d(folder, key, view):
    """Gait3D: <view>-sils.pkl (64x44) beside <view>-smpls.pkl (T x 85 floats)."""
    sils = silhouettes(key, 12, 64, 44)
    folder.mkdir(parents=True)
    (folder / f"{view}-sils.pkl").write_bytes(pickle.dumps(sils))
    (folder / f"{view}-smpls.pkl").write_bytes(pickle.dumps(np.ones((12, 85), np.float32)))
    return sils.astype(np.float32) / 255.0


def multi_modal(folder, key, view):
    """Silhouettes + parsing + SMPL, silhouettes second in sorted order."""
    sils = silhouettes(key, 12, 64, 64)
    folder.mkdir(parents=True)
    (folder / "0-parsing.pkl").write_bytes(pickle.dumps(np.full((12, 64, 64), 7, np.uint8)))
    (folder / "1-sils.pkl").write_bytes(pickle.dumps(sils))
    (folder / "2-smpl.pkl").write_bytes(pickle.dumps(np.ones((12, 85), np.float32)))
    return opengait_input(sils)


LAYOUTS = {
    "standard": (standard, None),
    "frame_list": (frame_list, None),
    "already_cut_64x44": (already_cut, None),
    "size_128x128": (size_128, None),
    "size_128x88": (size_128x88, None),
    "float32_0_255": (float_0_255, None),
    "float64_0_1_npy": (float_0_1, None),
    "casia_b_star": (casia_b_star, [True, False, False, False]),
    "gait3d_sils_smpls": (gait3d, [True, False]),
    "multi_modal_index": (multi_modal, [1]),
    "multi_modal_bools": (multi_modal, [False, True, False]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_each_layout_round_trips_in_each_split(tmp_path, name, split):
    write, in_use = LAYOUTS[name]
    expected = build(tmp_path, write)
    data = GaitDataset(tmp_path, split=split, in_use=in_use, progress=False, on_error="skip")
    assert data.num_skipped == 0 and len(data) == 4
    assert set(data.subject_ids) == set(SUBJECTS[:2] if split == "train" else SUBJECTS[2:])
    if split == "test":
        for sils, label, type_, view in make_test_loader(data, workers=0):
            key = f"{data.subject_ids[data.labels == label][0]}-{type_}-{view}"
            assert sils.shape == (1, 12, 64, 44) and sils.dtype == torch.float32
            np.testing.assert_allclose(sils[0].numpy(), expected[key], atol=1e-6, err_msg=key)
    else:
        sils, labels = next(iter(make_train_loader(data, 2, 2, clip_len=12, workers=0, seed=3)))
        assert sils.shape == (4, 12, 64, 44)
        for clip, label in zip(sils.numpy(), labels.tolist()):
            subject = SUBJECTS[label]
            # clip_len = T: a whole sequence in its order, rotated by the random start
            candidates = [np.roll(expected[f"{subject}-00-{v}"], -s, axis=0) for v in VIEWS for s in range(12)]
            assert any(np.allclose(clip, c, atol=1e-6) for c in candidates), (name, subject)


def test_several_files_without_in_use_is_refused_naming_folder_and_fix(tmp_path):
    build(tmp_path, gait3d)
    with pytest.raises(SequenceFileError, match=r"001/00/000: holds 2 sequence files \['000-sils.pkl', "
                       r"'000-smpls.pkl'\].*data.in_use=\[true, false\]"):
        GaitDataset(tmp_path, split="train", progress=False)
    # never a silent choice, not even with on_error=skip
    with pytest.raises(SequenceFileError, match="data.in_use"):
        GaitDataset(tmp_path, split="train", progress=False, on_error="skip")


def test_in_use_count_differing_between_folders_is_a_clear_error(tmp_path):
    build(tmp_path, gait3d)
    (tmp_path / "002" / "00" / "090" / "090-extra.pkl").write_bytes(pickle.dumps(np.zeros((3, 64, 44), np.uint8)))
    with pytest.raises(SequenceFileError, match=r"002/00/090: holds 3 sequence files .* data.in_use has 2 entries"):
        GaitDataset(tmp_path, split="train", in_use=[True, False], progress=False)
    with pytest.raises(SequenceFileError, match="index 5, which it lacks"):
        GaitDataset(tmp_path, split="train", in_use=5, progress=False)


@pytest.mark.parametrize("in_use, message", [
    ([True, True], "selects 2 files"),
    ([False, False], "selects 0 files"),
    ("sils", "list of booleans"),
    ([0, 1], "one index"),
    (True, "list of booleans"),
])
def test_bad_in_use_values(tmp_path, in_use, message):
    build(tmp_path, gait3d)
    with pytest.raises(ValueError, match=message):
        GaitDataset(tmp_path, split="train", in_use=in_use, progress=False)


def test_selected_modality_must_be_silhouettes(tmp_path):
    """Selecting the SMPL file of Gait3D is refused with the file named (T x 85 is no silhouette)."""
    build(tmp_path, gait3d)
    with pytest.raises(SequenceFileError, match=r"000-smpls.pkl: expected silhouettes \[T, H, W\]"):
        GaitDataset(tmp_path, split="test", in_use=[False, True], progress=False)


def test_conversions_are_exact_where_they_should_be(tmp_path):
    sils = silhouettes("x", 5, 64, 64)
    for name, array in {
        "f32.npy": sils.astype(np.float32), "f01.npy": sils / 255.0, "list.pkl": list(sils),
        "tuple.pkl": tuple(sils), "i64.npy": sils.astype(np.int64), "mask.npy": (sils > 0).astype(np.int32),
    }.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(array)) if name.endswith(".pkl") else np.save(path, array)
        loaded = load_sequence(path)
        expected = (sils > 0).astype(np.uint8) * 255 if name == "mask.npy" else sils
        assert loaded.dtype == np.uint8 and loaded.shape == (5, 64, 64)
        np.testing.assert_array_equal(loaded, expected, err_msg=name)
    cut = silhouettes("y", 5, 64, 44)
    np.save(tmp_path / "cut.npy", cut)
    padded = load_sequence(tmp_path / "cut.npy")
    np.testing.assert_array_equal(padded[..., 10:54], cut)
    assert not padded[..., :10].any() and not padded[..., 54:].any()
