"""The synthetic gait generator: layout, determinism, subjects that differ, conditions, presets."""
import json

import numpy as np
import pytest

from fastgait.data import GaitDataset, load_sequence, read_partition
from fastgait.data import synthetic
from fastgait.data.synthetic import PRESETS, draw_subject, generate, render_sequence, resolve_preset

TINY = dict(
    subjects=3,
    train_subjects=1,
    views=("000", "090"),
    train_types=("nm-01",),
    test_types=("nm-01", "nm-05", "bg-01", "cl-01"),
    min_cycles=1.0,
    extra_frames=2,
)


def arrays(root):
    return {p.relative_to(root).as_posix(): load_sequence(p) for p in sorted(root.rglob("*.pkl"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "a", "small", seed=0, workers=2, progress=False, **TINY)


def test_layout_and_partition(tiny):
    files = arrays(tiny)
    assert len(files) == 1 * 1 * 2 + 2 * 4 * 2
    assert "001/nm-01/090/090.pkl" in files and "003/cl-01/000/000.pkl" in files
    for sils in files.values():
        assert sils.dtype == np.uint8 and sils.shape[1:] == (64, 64) and sils.shape[0] >= 24
    assert read_partition(tiny / "partition.json") == {"TRAIN_SET": ["001"], "TEST_SET": ["002", "003"]}
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["preset"] == "small" and meta["config"]["subjects"] == 3
    test = GaitDataset(tiny, split="test", progress=False)
    assert test.num_ids == 2 and sorted(set(test.types)) == ["bg-01", "cl-01", "nm-01", "nm-05"]


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    again = generate(tmp_path / "b", "small", seed=0, workers=1, progress=False, **TINY)
    first, second = arrays(tiny), arrays(again)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_different_seed_differs(tiny, tmp_path):
    other = arrays(generate(tmp_path / "c", "small", seed=1, workers=1, progress=False, **TINY))
    first = arrays(tiny)
    assert all(first[k].shape != other[k].shape or not np.array_equal(first[k], other[k]) for k in first)


def test_different_subjects_differ():
    preset = PRESETS["small"]
    subjects = [draw_subject(np.random.default_rng([0, 0, i])) for i in range(2)]
    assert subjects[0].height != subjects[1].height and subjects[0].cycle_frames != subjects[1].cycle_frames
    # Same nuisance draw (same rng seed), different body: the mean silhouettes differ clearly.
    geis = [render_sequence(s, "nm-01", "090", np.random.default_rng(5), preset).mean(0) for s in subjects]
    assert np.abs(geis[0] - geis[1]).mean() > 2.0


def test_coat_and_bag_change_the_silhouette():
    subject = draw_subject(np.random.default_rng([3, 0, 0]))
    preset = PRESETS["small"]
    area = {}
    for condition in ("nm-01", "bg-01", "cl-01"):
        sils = render_sequence(subject, condition, "000", np.random.default_rng(11), preset)
        area[condition] = (sils > 127).mean()
    assert area["cl-01"] > 1.05 * area["nm-01"]  # a coat is wider than the body
    assert area["bg-01"] != area["nm-01"]


def test_finished_set_is_reused_and_a_different_one_refused(tiny, tmp_path):
    before = (tiny / "meta.json").stat().st_mtime_ns
    assert generate(tiny, "small", seed=0, progress=False, **TINY) == tiny
    assert (tiny / "meta.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="another synthetic set"):
        generate(tiny, "small", seed=1, progress=False, **TINY)


def test_interrupted_generation_completes(tmp_path, monkeypatch):
    out = tmp_path / "d"
    write_subject, calls = synthetic._write_subject, []

    def killed_after_one(job):
        if calls:
            raise KeyboardInterrupt
        calls.append(job)
        return write_subject(job)

    monkeypatch.setattr(synthetic, "_write_subject", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate(out, "small", seed=0, workers=1, progress=False, **TINY)
    monkeypatch.setattr(synthetic, "_write_subject", write_subject)
    assert not (out / "meta.json").exists() and (out / synthetic.MARKER).exists()
    done = {k: v for k, v in arrays(out).items()}
    assert done and all(k.startswith("001/") for k in done)
    generate(out, "small", seed=0, workers=1, progress=False, **TINY)
    assert len(arrays(out)) == 18
    for key, sils in done.items():
        np.testing.assert_array_equal(load_sequence(out / key), sils)


def test_a_users_folder_is_refused_untouched(tmp_path):
    """Issue 7: into a folder without our meta.json the generator replaced the user's partition.json."""
    out = tmp_path / "users_data"
    (out / "900" / "nm-01" / "000").mkdir(parents=True)
    (out / "partition.json").write_text('{"TRAIN_SET": ["900"], "TEST_SET": []}')
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=r"users_data is not empty and is not a synthetic set"):
        generate(out, "small", seed=0, workers=1, progress=False, **TINY)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "partition.json").read_text() == '{"TRAIN_SET": ["900"], "TEST_SET": []}'
    # an unfinished set of another seed is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / synthetic.MARKER).write_text('{"seed": 5}')
    with pytest.raises(FileExistsError, match="unfinished synthetic set of another preset or seed"):
        generate(other, "small", seed=0, workers=1, progress=False, **TINY)


def test_real_scene_preset_writes_a_probe_set(tmp_path):
    preset = dict(subjects=5, train_subjects=2, views=("000", "090"), min_cycles=1.0, extra_frames=1)
    out = generate(tmp_path / "rs", "real-scene", seed=0, workers=1, progress=False, **preset)
    partition = read_partition(out / "partition.json")
    assert partition["TEST_SET"] == ["003", "004", "005"]
    probes = partition["PROBE_SET"]
    assert len(probes) == 3 and sorted(k.split("-")[0] for k in probes) == ["003", "004", "005"]
    test = GaitDataset(out, split="test", progress=False)
    assert set(test.types) == {"00"} and test.probe_set == probes
    keys = {f"{s}-{t}-{v}" for s, t, v in zip(test.subject_ids, test.types, test.views)}
    assert set(probes) <= keys and len(keys) == 6
    assert PRESETS["real-scene"].probes_per_subject == 1 and len(PRESETS["real-scene"].test_types) == 1


def test_missing_sequences_like_oumvlp(tmp_path):
    preset = dict(TINY, test_types=("00", "01"), train_types=("00",), missing=0.5, views=("000", "015", "030"))
    out = generate(tmp_path / "e", "oumvlp", seed=0, workers=1, progress=False, **preset)
    test_files = [k for k in arrays(out) if not k.startswith("00001")]
    assert 0 < len(test_files) < 2 * 2 * 3
    assert all(k.split("/")[0] in ("00002", "00003") for k in test_files)  # five-digit ids


def test_presets():
    casia = PRESETS["casia-b"]
    assert casia.subjects == 124 and casia.train_subjects == 74
    assert casia.views == tuple(f"{v:03d}" for v in range(0, 181, 18))
    assert casia.test_types == ("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06", "bg-01", "bg-02", "cl-01", "cl-02")
    oumvlp = PRESETS["oumvlp"]
    assert oumvlp.test_types == ("00", "01") and len(oumvlp.views) == 14
    small = PRESETS["small"]
    assert {"nm-05", "nm-06"} <= set(small.test_types) and 5 <= len(small.views) <= 6
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("casia")
    with pytest.raises(ValueError, match="train_subjects"):
        resolve_preset("small", train_subjects=48)


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(synthetic.PRESETS, "small", resolve_preset("small", **TINY))
    synthetic.main([str(tmp_path / "cli"), "--preset", "small", "--seed", "3", "--workers", "1", "--no-progress"])
    assert "seed 3" in capsys.readouterr().out
    assert len(arrays(tmp_path / "cli")) == 18


@pytest.mark.slow
def test_small_preset_is_hard_in_the_right_way(tmp_path):
    """GEI nearest neighbour: high in the same view, low across views; BG and CL harder than NM."""
    from fastgait.evaluation import gei_baseline

    result = gei_baseline(generate(tmp_path / "small", "small", seed=0, progress=False))
    same_view = {c: np.nanmean(np.diagonal(r["matrix"])) for c, r in result.items()}
    assert same_view["NM"] >= 75 and result["NM"]["mean"] <= 40
    assert result["BG"]["mean"] < result["NM"]["mean"] and result["CL"]["mean"] < result["NM"]["mean"]
    assert same_view["BG"] < same_view["NM"] and same_view["CL"] < same_view["NM"]
