"""Pretreatment of raw PNG frames: drop, crop, resize to height 64, median-column centring, padding, resume."""
import numpy as np
import pytest
from PIL import Image

from fastgait.data import load_sequence
from fastgait.data.pretreat import find_raw_sequences, pretreat_dataset, pretreat_frame, pretreat_frames


def person(top=40, height=160, left=100, width=40, frame=(240, 320)):
    """A raw frame with a white rectangle 'person' (greyscale 320x240 as CASIA-B)."""
    image = np.zeros(frame, np.uint8)
    image[top : top + height, left : left + width] = 255
    return image


def test_crop_and_resize_to_height_64():
    out = pretreat_frame(person(top=40, height=160, left=100, width=40))
    assert out.shape == (64, 64) and out.dtype == np.uint8
    rows = np.flatnonzero(out.any(1))
    assert rows[0] == 0 and rows[-1] == 63  # cropped to the person, then scaled to fill the height
    columns = np.flatnonzero(out.max(0) > 128)
    assert 15 <= len(columns) <= 17  # 40 wide x 64/160 = 16 columns, aspect ratio kept


def test_median_column_is_the_centre_not_the_mean():
    # A tall narrow body plus a long thin arm to the right: the mean column is pulled right,
    # the median column (half the mass on each side) stays in the body.
    frame = person(top=40, height=160, left=100, width=20)
    frame[100:104, 120:220] = 255
    out = pretreat_frame(frame).astype(np.int64)
    mass = out.sum(0).cumsum()
    centre = int(np.argmax(mass > mass[-1] / 2))
    assert centre == 32
    body = np.flatnonzero(out[10] > 128)  # a row above the arm: the body alone
    assert body[0] <= 32 <= body[-1] + 1


def test_edge_padding_with_zero_columns():
    # A person at the left edge of a narrow frame: the window runs off the left edge.
    frame = np.zeros((200, 60), np.uint8)
    frame[20:180, 0:30] = 255
    out = pretreat_frame(frame)
    assert out.shape == (64, 64)
    filled = np.flatnonzero(out.max(0) > 0)
    assert filled[0] > 10 and filled[-1] < 54  # zero columns on both sides of the centred body
    assert abs((filled[0] + filled[-1]) / 2 - 32) <= 1.5


def test_wide_frames_are_cut_to_64():
    frame = np.zeros((100, 400), np.uint8)
    frame[10:90, 20:380] = 255  # wider than tall: 64 high is ~288 wide
    out = pretreat_frame(frame)
    assert out.shape == (64, 64) and out.min() == 255


def test_nearly_empty_frames_are_dropped():
    assert pretreat_frame(np.zeros((240, 320), np.uint8)) is None
    specks = np.zeros((240, 320), np.uint8)
    specks[100, 100:139] = 255  # pixel sum 9945 <= 10000
    assert pretreat_frame(specks) is None
    specks[100, 139] = 255  # 10200 > 10000: kept
    assert pretreat_frame(specks) is not None
    sils = pretreat_frames([person(), np.zeros((240, 320), np.uint8), person(left=10)])
    assert sils.shape == (2, 64, 64)
    assert pretreat_frames([np.zeros((240, 320), np.uint8)]).shape == (0, 64, 64)


def write_png(path, frame):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)


@pytest.fixture
def raw_casia(tmp_path):
    raw = tmp_path / "raw"
    for sid in ("001", "002"):
        for cond in ("nm-01", "bg-01"):
            for view in ("000", "090"):
                folder = raw / sid / cond / view
                # frame numbers need not start at 001; one blank frame is dropped
                for k, n in enumerate(range(7, 15)):
                    frame = person(left=60 + 10 * k, height=150 + k) if n != 9 else np.zeros((240, 320), np.uint8)
                    write_png(folder / f"{sid}-{cond}-{view}-{n:03d}.png", frame)
    short = raw / "002" / "cl-01" / "090"
    for n in range(3):
        write_png(short / f"002-cl-01-090-{n:03d}.png", person())
    for n in range(4):
        write_png(raw / "002" / "cl-02" / "090" / f"{n:03d}.png", np.zeros((240, 320), np.uint8))
    return raw


def test_pretreat_dataset_writes_the_layout_and_resumes(raw_casia, tmp_path, capsys):
    out = tmp_path / "out"
    counts = pretreat_dataset(raw_casia, out, "casia-b", workers=2, progress=False)
    assert counts == {"written": 9, "existing": 0, "empty": 1, "short": 1}
    err = capsys.readouterr().err
    assert "002/cl-01/090: only 3 frames" in err and "002/cl-02/090: every frame was dropped" in err
    sils = load_sequence(out / "001" / "nm-01" / "090" / "090.pkl")
    assert sils.shape == (7, 64, 64)
    expected = pretreat_frame(person(left=60, height=150))
    np.testing.assert_array_equal(sils[0], expected)
    assert not list(out.rglob("*.tmp"))

    (out / "002" / "bg-01" / "000" / "000.pkl").unlink()
    again = pretreat_dataset(raw_casia, out, "casia-b", workers=1, progress=False)
    assert again == {"written": 1, "existing": 8, "empty": 1, "short": 0}


def test_oumvlp_layout(tmp_path):
    raw = tmp_path / "raw"
    for view, seq in (("000", "00"), ("015", "01")):
        for n in range(1, 7):
            write_png(raw / f"Silhouette_{view}-{seq}" / "00042" / f"{n:04d}.png", person(left=50 + n))
    (found,) = [s for s in find_raw_sequences(raw, "oumvlp") if s.view == "000"]
    assert (found.subject, found.type, found.view, len(found.frames)) == ("00042", "00", "000", 6)
    pretreat_dataset(raw, tmp_path / "out", "oumvlp", workers=1, progress=False)
    assert load_sequence(tmp_path / "out" / "00042" / "01" / "015" / "015.pkl").shape == (6, 64, 64)


def test_missing_or_empty_raw_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pretreat_dataset(tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no raw frames"):
        pretreat_dataset(tmp_path, tmp_path / "out", progress=False)
