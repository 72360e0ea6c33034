"""Safe loading of sequence files: formats, hostile pickles, corrupt and wrongly shaped files."""
import pickle

import numpy as np
import pytest

from fastgait.data import SequenceFileError, UnsafePickleError, load_sequence, save_sequence


def sils(frames=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(frames, 64, 64), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".npz"])
def test_round_trip(tmp_path, suffix):
    expected = sils()
    path = save_sequence(tmp_path / "a" / f"seq{suffix}", expected)
    loaded = load_sequence(path)
    assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, expected)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickles_of_every_protocol_load(tmp_path, protocol):
    expected = sils()
    path = tmp_path / "seq.pkl"
    path.write_bytes(pickle.dumps(expected, protocol=protocol))
    np.testing.assert_array_equal(load_sequence(path), expected)


@pytest.mark.parametrize("written_by, read_as", [("numpy._core", "numpy.core"), ("numpy.core", "numpy._core")])
def test_pickles_of_either_numpy_major_load(tmp_path, written_by, read_as):
    """numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both load under either."""
    expected = sils()
    data = pickle.dumps(expected, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if read_as == "numpy.core" else data
    path = tmp_path / "seq.pkl"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_sequence(path), expected)


def test_protocol2_bytes_admit_only_the_latin1_codec(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(pickle.dumps(sils(), protocol=2).replace(b"latin1", b"utf_16"))
    with pytest.raises(SequenceFileError, match=r"codec.pkl.*refusing codec 'utf_16'"):
        load_sequence(path)


def test_bool_and_small_integer_arrays_become_uint8(tmp_path):
    mask = sils() > 128
    np.save(tmp_path / "b.npy", mask)
    np.testing.assert_array_equal(load_sequence(tmp_path / "b.npy"), mask.astype(np.uint8) * 255)
    np.save(tmp_path / "i.npy", sils().astype(np.int32))
    np.testing.assert_array_equal(load_sequence(tmp_path / "i.npy"), sils())


class CreatesFile:
    """Unpickling this would create ``marker``: the classic code-execution payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: CreatesFile(marker),
        lambda marker: [sils(), CreatesFile(marker)],
        lambda marker: np.array([CreatesFile(marker)], dtype=object),
    ],
    ids=["reduce", "inside-a-list", "object-array"],
)
def test_hostile_pickle_raises_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pickle.dumps(payload(marker)))
    with pytest.raises(UnsafePickleError, match="hostile.pkl") as info:
        load_sequence(path)
    assert info.value.path == path
    assert not marker.exists()


def test_pickled_function_reference_is_refused(tmp_path):
    path = tmp_path / "function.pkl"
    path.write_bytes(pickle.dumps(np.load))
    with pytest.raises(UnsafePickleError, match=r"function.pkl.*numpy.*load"):
        load_sequence(path)


def write_bad(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(content))
    elif name.endswith(".npz"):
        np.savez(path, **content)
    else:
        np.save(path, content)
    return path


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.pkl", b"", "empty"),
        ("empty.npy", b"", "empty"),
        ("truncated.pkl", pickle.dumps(sils())[:500], "corrupt"),
        ("garbage.pkl", b"\x00not a pickle at all", "corrupt"),
        ("garbage.npy", b"\x93NUMPY garbage", "corrupt"),
        ("odd.pkl", sils()[:, :, 10:50], r"frames of 64x40 pixels.*pretreat"),
        ("flat.npy", np.zeros((64, 64), np.uint8), r"expected silhouettes \[T, H, W\], found shape \[64, 64\]"),
        ("noframes.npy", np.zeros((0, 64, 64), np.uint8), "no frames"),
        ("float.npy", np.full((3, 64, 64), 300.0, np.float32), r"\[0, 1\] or \[0, 255\], found 300\.\.300"),
        ("negative.npy", np.full((3, 64, 64), -1.0, np.float64), r"found -1\.\.-1"),
        ("nan.npy", np.full((3, 64, 64), np.nan, np.float32), "NaN"),
        ("int16.npy", np.full((3, 64, 64), 256, np.int16), r"0\.\.255, found 256"),
        ("complex.npy", np.zeros((3, 64, 64), np.complex64), "numeric dtype"),
        ("dict.pkl", {"sils": 1}, "expected a numpy array \\(or a list of 2-D frames\\), found dict"),
        ("emptylist.pkl", [], "empty list"),
        ("ragged.pkl", [np.zeros((64, 64), np.uint8), np.zeros((64, 44), np.uint8)], "frame 1 of the list"),
        ("notframes.pkl", [np.zeros((64, 64), np.uint8), 3], "frame 1 of the list is a int"),
        ("two.npz", {"a": sils(), "b": sils()}, "expected one array"),
        ("seq.txt", b"hello", "unknown sequence format"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, name, content, problem):
    path = write_bad(tmp_path, name, content)
    with pytest.raises(SequenceFileError, match=problem) as info:
        load_sequence(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(SequenceFileError, match="no such file") as info:
        load_sequence(tmp_path / "nope.pkl")
    assert "nope.pkl" in str(info.value)


def test_save_refuses_wrong_shapes(tmp_path):
    with pytest.raises(SequenceFileError, match="shape"):
        save_sequence(tmp_path / "x.pkl", np.zeros((3, 64, 44), np.uint8))
    assert not (tmp_path / "x.pkl").exists()
