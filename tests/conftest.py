"""Fixtures shared by the test modules."""
import numpy as np
import pytest

from fastgait.data import save_sequence, write_partition


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """6 subjects x 7 sequences x 2 views of random blobs, 10-14 frames; 4 train / 2 test subjects
    (a fresh copy per test module: some modules damage files in it)."""
    root = tmp_path_factory.mktemp("tiny_gait")
    rng = np.random.default_rng(0)
    subjects = [f"{i:03d}" for i in range(1, 7)]
    for subject in subjects:
        for seq in ("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "bg-01", "cl-01"):
            for view in ("000", "090"):
                sils = (rng.random((int(rng.integers(10, 15)), 64, 64)) > 0.7).astype(np.uint8) * 255
                save_sequence(root / subject / seq / view / f"{view}.pkl", sils)
    write_partition(root / "partition.json", subjects[:4], subjects[4:])
    return root
