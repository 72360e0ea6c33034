"""Reading and writing one sequence file (data.md §3): ``.pkl`` (OpenGait), ``.npy`` and ``.npz``.

A ``.pkl`` is unpickled by :class:`NumpyOnlyUnpickler`, which admits only the globals a pickled
numpy array refers to and refuses everything else *before* anything is called, so a hostile
file raises :class:`UnsafePickleError` (naming the file and the global) and runs nothing.
"""
from __future__ import annotations

import io
import os
import pickle
import stat
import tempfile
from pathlib import Path
from typing import Optional, Union

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


CUT_WIDTH = 44  # OpenGait's model input: 64 x 64 with 10 columns cut off each side


def _stack_frames(frames: Union[list, tuple], path: PathLike) -> np.ndarray:
    """A pickled list (or tuple) of 2-D frames as one ``[T, H, W]`` array; frames must agree in shape."""
    if len(frames) == 0:
        raise SequenceFileError(path, "sequence has no frames (an empty list)")
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise SequenceFileError(path, f"frame {i} of the list is a {type(frame).__name__}, expected a numpy array")
        if frame.ndim != 2 or frame.shape != frames[0].shape:
            raise SequenceFileError(
                path, f"frame {i} of the list has shape {list(frame.shape)}, frame 0 {list(frames[0].shape)}: "
                "a list of frames must hold 2-D frames of one size"
            )
    return np.stack(frames)


def _to_0_255(array: np.ndarray, path: PathLike) -> np.ndarray:
    """Silhouette values on the 0..255 scale (uint8 untouched; float32 otherwise), or an error saying why not.

    - uint8: as is (OpenGait's format). bool: 0/255.
    - other integers: 0..255 as is; an array holding only 0 and 1 is a binary mask (x255).
    - floats: finite, >= 0; max <= 1 is read as [0, 1] (x255), max <= 255 as [0, 255];
      anything else is refused.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    fix = "re-save the silhouettes as uint8 0..255 (or floats in [0, 1] or [0, 255])"
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise SequenceFileError(path, f"integer silhouettes must lie in 0..255, found {low}..{high} ({array.dtype}); {fix}")
        return array.astype(np.uint8) * np.uint8(255) if high <= 1 else array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise SequenceFileError(path, f"float silhouettes hold NaN or inf ({array.dtype}); {fix}")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise SequenceFileError(
                path, f"float silhouettes must lie in [0, 1] or [0, 255], found {low:g}..{high:g} ({array.dtype}); {fix}"
            )
        return array.astype(np.float32) * np.float32(255.0 if high <= 1.0 else 1.0)
    raise SequenceFileError(path, f"expected silhouettes of a numeric dtype, found dtype {array.dtype}; {fix}")


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[T, H, W]`` (0..255) resized to ``[T, height, width]`` float32 by area averaging (PIL's BOX filter)."""
    from PIL import Image

    box = getattr(Image, "Resampling", Image).BOX
    frames = np.ascontiguousarray(frames, dtype=np.float32)  # float32 2-D arrays become PIL "F" images
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), box)) for f in frames])


def check_sequence(array: object, path: PathLike) -> np.ndarray:
    """``array`` as uint8 ``[T, 64, 64]`` with ``T >= 1``, or :class:`SequenceFileError` saying why not.

    Accepted, each converted explicitly (``docs/DATA.md``, "What is read"):

    - an ndarray ``[T, H, W]`` or a list/tuple of ``T`` 2-D frames (stacked);
    - ``64 x 64`` (OpenGait's pretreated size): as is;
    - ``64 x 44`` (already cut, as CASIA-B* and Gait3D hold them): 10 zero columns are put back on
      each side, so the loader's 64 -> 44 cut returns exactly the stored frames;
    - any other square size (e.g. ``128 x 128``) is resized to ``64 x 64``, any other size with
      the 64:44 aspect (e.g. ``128 x 88``) to ``64 x 44`` (area averaging); other sizes are refused;
    - dtypes as :func:`_to_0_255` (uint8 untouched; bool; integers 0..255; floats in [0, 1] or [0, 255]).
    """
    if isinstance(array, (list, tuple)):
        array = _stack_frames(array, path)
    if not isinstance(array, np.ndarray):
        raise SequenceFileError(
            path, f"expected a numpy array (or a list of 2-D frames), found {type(array).__name__}"
        )
    if array.ndim != 3:
        raise SequenceFileError(path, f"expected silhouettes [T, H, W], found shape {list(array.shape)}")
    if array.shape[0] == 0:
        raise SequenceFileError(path, f"sequence has no frames (shape {list(array.shape)})")
    height, width = array.shape[1:]
    if (height, width) == FRAME_SHAPE and array.dtype == np.uint8:
        return array  # the common case: no copy
    if (height, width) == FRAME_SHAPE or (height, width) == (64, CUT_WIDTH):
        target = None
    elif height == width:
        target = FRAME_SHAPE
    elif height * CUT_WIDTH == width * 64:
        target = (64, CUT_WIDTH)
    else:
        raise SequenceFileError(
            path, f"frames of {height}x{width} pixels: expected 64x64 (OpenGait's pretreatment), 64x44 (already cut), "
            "another square size or another size of aspect 64:44 (resized); pretreat the raw frames with "
            "`python -m fastgait.data.pretreat`"
        )
    array = _to_0_255(array, path)
    if target is not None:
        array = _resize(array, *target)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.shape[2] == CUT_WIDTH:
        padded = np.zeros((*array.shape[:2], FRAME_SHAPE[1]), dtype=np.uint8)
        side = (FRAME_SHAPE[1] - CUT_WIDTH) // 2
        padded[:, :, side : side + CUT_WIDTH] = array
        array = padded
    return array


def not_a_regular_file(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be read as a sequence file (missing, a dangling symlink, a folder, a FIFO,
    a device ...), or ``None`` for a regular file (or a symlink to one). Never opens the file, so a
    FIFO does not block."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symlink (points to {os.readlink(path)}, which does not exist); fix or remove the link"
        return "no such file"
    except OSError as err:
        return f"cannot be read ({err.strerror}); check the path and its permissions"
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
    return f"is {kind}, not a sequence file; remove or rename it"


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
    problem = not_a_regular_file(path)
    if problem:
        raise SequenceFileError(path, problem)
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
    if not isinstance(sils, np.ndarray) or sils.ndim != 3 or sils.shape[1:] != FRAME_SHAPE:
        shape = list(sils.shape) if isinstance(sils, np.ndarray) else type(sils).__name__
        raise SequenceFileError(path, f"save_sequence writes uint8 silhouettes of shape [T, 64, 64], got {shape}")
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
