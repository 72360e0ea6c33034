"""Dataset hygiene: what a user's folder can hold that must not pass in silence.

Non-regular sequence paths, partitions that leak or are malformed, the synthetic generator and
a user's folder, data.split writing into the dataset, probes without gallery, no gallery at all,
and the evaluate CLI on the real-scene preset.
"""
import json
import os
import pickle
import warnings

import numpy as np
import pytest

from fastgait.data import GaitDataset, SequenceFileError, save_sequence, write_partition
from fastgait.data.synthetic import generate

SUBJECTS = ["001", "002", "003", "004"]


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for s in SUBJECTS:
        for t in ("nm-01", "nm-02"):
            for v in ("000", "090"):
                save_sequence(root / s / t / v / f"{v}.pkl", (rng.random((6, 64, 64)) > 0.5).astype(np.uint8) * 255)
    write_partition(root / "partition.json", SUBJECTS[:2], SUBJECTS[2:])
    return root


def make_dangling(path):
    path.unlink()
    os.symlink(path.parent / "gone.pkl", path)


def make_fifo(path):
    path.unlink()
    os.mkfifo(path)


def make_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("make, problem", [
    (make_dangling, "dangling symlink"),
    (make_fifo, "FIFO"),
    (make_folder, "is a folder"),
])
@pytest.mark.parametrize("cache", [True, False])
def test_non_regular_sequence_paths_raise_or_are_counted(layout, make, problem, cache):
    """Issue 10: these were dropped without a word, even with on_error=raise."""
    bad = layout / "002" / "nm-02" / "090" / "090.pkl"
    make(bad)
    with pytest.raises(SequenceFileError, match=problem) as info:
        GaitDataset(layout, split="train", cache=cache, progress=False)
    assert str(bad) in str(info.value) and "on_error=skip" in str(info.value)
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable sequence files.*{problem}"):
        data = GaitDataset(layout, split="train", cache=cache, on_error="skip", progress=False)
    assert data.num_skipped == 1 and data.skipped[0][0] == bad and len(data) == 7


def test_all_unreadable_names_the_first_problem(layout):
    for path in layout.rglob("*.pkl"):
        path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"every one of the 8 sequence files.*001/nm-01/000/000.pkl: file is empty"):
        GaitDataset(layout, split="train", on_error="skip", progress=False)


def test_train_test_overlap_is_warned(layout):
    write_partition(layout / "leak.json", ["001", "002", "003"], ["003", "004"])
    with pytest.warns(UserWarning, match=r"1 subjects are in both TRAIN_SET and TEST_SET \(\['003'\]\).*inflated"):
        GaitDataset(layout, layout / "leak.json", split="train", progress=False)
    with pytest.warns(UserWarning, match="in both TRAIN_SET and TEST_SET"):
        GaitDataset(layout, {"TRAIN_SET": ["001", "004"], "TEST_SET": ["004"]}, split="test", progress=False)


def test_a_string_id_is_one_subject_and_null_is_a_clear_error(layout):
    (layout / "one.json").write_text('{"TRAIN_SET": "001", "TEST_SET": ["003", "004"]}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "subjects have no sequence" for '0', '0', '1'
        data = GaitDataset(layout, layout / "one.json", split="train", progress=False)
    assert set(data.subject_ids) == {"001"} and data.num_ids == 1
    (layout / "null.json").write_text('{"TRAIN_SET": null, "TEST_SET": ["003"]}')
    with pytest.raises(ValueError, match=r"null.json: TRAIN_SET is null; it must be a list of subject ids"):
        GaitDataset(layout, layout / "null.json", split="train", progress=False)
    (layout / "nested.json").write_text('{"TRAIN_SET": [["001"]], "TEST_SET": ["003"]}')
    with pytest.raises(ValueError, match="subject ids must be strings"):
        GaitDataset(layout, layout / "nested.json", split="train", progress=False)


def test_formats_once_refused_load_with_on_error_skip(tmp_path):
    """Issue 14: a frame list, 64x44, 128x128 and float arrays each ended in 'every sequence file was unreadable'."""
    rng = np.random.default_rng(1)
    frames = {
        "001": [f for f in (rng.random((5, 64, 64)) > 0.5).astype(np.uint8) * 255],
        "002": (rng.random((5, 64, 44)) > 0.5).astype(np.uint8) * 255,
        "003": (rng.random((5, 128, 128)) > 0.5).astype(np.uint8) * 255,
        "004": (rng.random((5, 64, 64)) > 0.5).astype(np.float32) * 255,
    }
    for s, content in frames.items():
        (tmp_path / s / "00" / "000").mkdir(parents=True)
        (tmp_path / s / "00" / "000" / "000.pkl").write_bytes(pickle.dumps(content))
    data = GaitDataset(tmp_path, split="all", on_error="skip", progress=False)
    assert len(data) == 4 and data.num_skipped == 0


def test_synthetic_generator_refuses_a_users_folder(tmp_path):
    """Issue 7: into a folder without meta.json it replaced the user's partition.json and added subjects."""
    out = tmp_path / "mine"
    save_sequence(out / "777" / "nm-01" / "000" / "000.pkl", np.zeros((3, 64, 64), np.uint8))
    (out / "partition.json").write_text('{"TRAIN_SET": ["777"], "TEST_SET": []}')
    with pytest.raises(FileExistsError, match="is not empty and is not a synthetic set of this preset and seed"):
        generate(out, "small", seed=0, workers=1, progress=False, subjects=3, train_subjects=1)
    assert (out / "partition.json").read_text() == '{"TRAIN_SET": ["777"], "TEST_SET": []}'
    assert sorted(p.name for p in out.iterdir()) == ["777", "partition.json"]


def test_data_split_does_not_write_into_the_dataset(layout):
    """data.split with no partition wrote partition_<SPLIT>.json into the user's dataset root."""
    from fastgait.config import load_config
    from fastgait.engine.trainer import data_paths

    ids = [f"{i:03d}" for i in range(5, 80)]
    for s in ids:
        save_sequence(layout / s / "nm-01" / "000" / "000.pkl", np.full((3, 64, 64), 255, np.uint8))
    before = sorted(p.name for p in layout.iterdir())
    config = load_config("demo_cpu", [f"data.root={layout}", "data.split=lt"])
    root, partition = data_paths(config["data"])
    train = GaitDataset(root, partition, split="train", progress=False)
    test = GaitDataset(root, partition, split="test", progress=False)
    assert train.num_ids == 74 and test.num_ids == len(SUBJECTS) + len(ids) - 74
    assert sorted(p.name for p in layout.iterdir()) == before


def test_evaluate_cli_on_the_real_scene_preset(tmp_path, capsys):
    """Train 2 iterations on a tiny real-scene synthetic set; `python -m fastgait.evaluate` prints its table."""
    from fastgait.config import load_config
    from fastgait.engine import checkpoint as ckpt
    from fastgait.engine.trainer import Trainer
    from fastgait.evaluate import main as evaluate_main

    root = generate(tmp_path / "rs", "real-scene", seed=0, workers=1, progress=False, subjects=7, train_subjects=3,
                    views=("000", "090"), min_cycles=0.6, extra_frames=0)
    before = sorted(str(p) for p in root.rglob("*"))
    overrides = {"iterations": 2, "P": 2, "K": 2, "clip_len": 8, "log_every": 1, "checkpoint_every": 2,
                 "compile": False, "amp": "fp32", "sample_type": "fixed_unordered"}
    config = load_config("demo_cpu", [f"data.root={root}", "data.protocol=gait3d", "data.workers=0", "eval.workers=0", "eval.baseline=false",
                                      *[f"train.{k}={v}" for k, v in overrides.items()]])
    trainer = Trainer(config, tmp_path / "run", progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    checkpoint = ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 2)
    capsys.readouterr()
    code = evaluate_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |" in out and "| model |" in out and "| GEI+NN |" in out
    report = json.loads((tmp_path / "eval" / "scores_iter_0000002.json").read_text())
    assert report["protocol"] == "gait3d" and report["probes"] == 4 and report["gallery"] == 4
    assert all(0 <= report[k] <= 100 for k in ("rank-1", "rank-5", "rank-10", "rank-20", "mAP", "mINP"))
    # no gallery at all (every test sequence a probe): a clear error and exit 2, not a table of '-'
    probe_all = tmp_path / "all.json"
    probe_all.write_text(json.dumps([f"{s:03d}-00-{v}" for s in range(4, 8) for v in ("000", "090")]))
    assert evaluate_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval2"),
                          "--probe", str(probe_all), "--no-baseline"]) == 2
    assert "no gallery sequences" in capsys.readouterr().err
    assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written into the dataset
