"""Data: the processed layout, safe loading, pretreatment, synthetic gait, sampling and loaders.

- ``load_sequence(path)``: one ``.pkl``/``.npy``/``.npz`` file as uint8 ``[T, 64, 64]`` (pickles
  through a numpy-only unpickler); ``save_sequence(path, sils)`` writes one atomically.
- ``GaitDataset(root, partition, split, cache, on_error)``: one split of ``ROOT/<sid>/<type>/<view>/``.
- ``TripletSampler``, ``make_train_loader``, ``make_test_loader``: P x K clips for training,
  whole sequences for testing; ``FrameSampler`` (``frames.py``): which frames make a clip
  (OpenGait's fixed/unfixed, ordered/unordered ``sample_type``).
- ``python -m fastgait.data.synthetic OUT --preset small`` (``synthetic.generate``) and
  ``python -m fastgait.data.pretreat RAW OUT`` write the layout.
"""
from .dataset import GaitDataset
from .frames import SAMPLE_TYPES, FrameBatchSampler, FrameSampler, limit_frames
from .io import SequenceFileError, UnsafePickleError, load_sequence, save_sequence
from .layout import CasiaBSplit, casia_b_partition, normalize_in_use, read_partition, scan_layout, write_casia_b_partition, write_partition
from .loader import collate_clips, make_test_loader, make_train_loader, random_clip
from .sampler import TripletSampler

__all__ = [
    "GaitDataset",
    "SequenceFileError",
    "UnsafePickleError",
    "load_sequence",
    "save_sequence",
    "scan_layout",
    "read_partition",
    "write_partition",
    "casia_b_partition",
    "write_casia_b_partition",
    "TripletSampler",
    "FrameSampler",
    "FrameBatchSampler",
    "SAMPLE_TYPES",
    "limit_frames",
    "CasiaBSplit",
    "normalize_in_use",
    "make_train_loader",
    "make_test_loader",
    "collate_clips",
    "random_clip",
]
