"""Reading and writing one sequence file (data.md §3): ``.pkl`` (OpenGait), ``.npy`` and ``.npz``.

A ``.pkl`` is unpickled by :class:`NumpyOnlyUnpickler`, which admits only the globals a pickled
numpy array refers to and refuses everything else *before* anything is called, so a hostile
file raises :class:`UnsafePickleError` (naming the file and the global) and runs nothing.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

SEQUENCE_SUFFIXES = (".pkl", ".npy", ".npz")
FRAME_SHAPE = (64, 64)


class SequenceFileError(ValueError):
    """A sequence file is missing, corrupt, empty, unsafe or of the wrong shape; ``path`` names it."""

    def __init__(self, path: PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(SequenceFileError):
    """A ``.pkl`` refers to a global that a numpy array does not need (it could run code)."""


def _numpy_module(name: str):
    """``numpy._core.<name>`` (numpy 2) or ``numpy.core.<name>`` (numpy 1), whichever is installed."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and no other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"refusing codec {encoding!r} in a pickle")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_module("multiarray")._reconstruct
    frombuffer = _numpy_module("numeric")._frombuffer
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # numpy 1.x pickles name ``numpy.core``, numpy 2.x ``numpy._core``: both map to the installed one.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct  # protocols 2-4
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer  # protocol 5
    # Protocol 2 pickles bytes as ``_codecs.encode(str, "latin1")``.
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numeric numpy arrays and nothing else."""

    _allowed = None

    def __init__(self, file, *, source: PathLike = "<pickle>"):
        super().__init__(file)
        self._source = source
        if NumpyOnlyUnpickler._allowed is None:
            NumpyOnlyUnpickler._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self._source,
                f"refusing to unpickle global {module}.{name}: only numpy arrays are loaded "
                "(the file may be hostile; re-save it with numpy.save if it is yours)",
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(self._source, "refusing a pickle with persistent ids: only numpy arrays are loaded")


def _read_pkl(path: Path) -> object:
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise SequenceFileError(path, "file is empty (0 bytes)")
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), source=path).load()
    except SequenceFileError:
        raise
    except Exception as err:  # truncated or garbage bytes surface as many exception types
        raise SequenceFileError(path, f"corrupt pickle ({type(err).__name__}: {err})") from None


def _read_npy(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise SequenceFileError(path, "file is empty (0 bytes)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if path.suffix != ".npz":
            return loaded
        with loaded:
            keys = sorted(loaded.files)
            if "sils" in keys:
                return loaded["sils"]
            if len(keys) != 1:
                raise SequenceFileError(path, f"expected one array (or one named 'sils'), found {keys}")
            return loaded[keys[0]]
    except SequenceFileError:
        raise
    except Exception as err:
        raise SequenceFileError(path, f"corrupt {path.suffix} file ({type(err).__name__}: {err})") from None


def check_sequence(array: object, path: PathLike) -> np.ndarray:
    """``array`` as uint8 ``[T, 64, 64]`` with ``T >= 1``, or :class:`SequenceFileError` saying why not."""
    if not isinstance(array, np.ndarray):
        raise SequenceFileError(path, f"expected a numpy array, found {type(array).__name__}")
    if array.ndim != 3 or array.shape[1:] != FRAME_SHAPE:
        raise SequenceFileError(path, f"expected shape [T, 64, 64], found {list(array.shape)}")
    if array.shape[0] == 0:
        raise SequenceFileError(path, "sequence has no frames (shape [0, 64, 64])")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise SequenceFileError(path, f"expected uint8 silhouettes (0..255), found dtype {array.dtype}")


def load_sequence(path: PathLike) -> np.ndarray:
    """Load one sequence file as a C-contiguous uint8 array ``[T, 64, 64]``.

    ``.pkl`` goes through :class:`NumpyOnlyUnpickler`; ``.npy``/``.npz`` through ``numpy.load``
    with ``allow_pickle=False`` (an ``.npz`` holds one array, or one named ``sils``).
    Raises :class:`SequenceFileError` naming the file for a missing, empty, corrupt, unsafe
    (:class:`UnsafePickleError`) or wrongly shaped file.
    """
    path = Path(path)
    if path.suffix not in SEQUENCE_SUFFIXES:
        raise SequenceFileError(path, f"unknown sequence format {path.suffix!r} (expected one of {SEQUENCE_SUFFIXES})")
    if not path.is_file():
        raise SequenceFileError(path, "no such file")
    array = _read_pkl(path) if path.suffix == ".pkl" else _read_npy(path)
    return np.ascontiguousarray(check_sequence(array, path))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A reader (or a resumed run) never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sequence(path: PathLike, sils: np.ndarray) -> Path:
    """Write uint8 ``[T, 64, 64]`` silhouettes atomically, in the format the suffix names.

    ``.pkl`` is a plain pickled ndarray (the OpenGait layout), ``.npy``/``.npz`` numpy's own.
    """
    path = Path(path)
    sils = np.ascontiguousarray(check_sequence(sils, path))
    if path.suffix == ".pkl":
        data = pickle.dumps(sils, protocol=4)
    elif path.suffix in (".npy", ".npz"):
        buffer = io.BytesIO()
        if path.suffix == ".npy":
            np.save(buffer, sils, allow_pickle=False)
        else:
            np.savez(buffer, sils=sils)
        data = buffer.getvalue()
    else:
        raise SequenceFileError(path, f"unknown sequence format {path.suffix!r} (expected one of {SEQUENCE_SUFFIXES})")
    atomic_write_bytes(path, data)
    return path
