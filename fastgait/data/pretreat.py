"""Raw silhouette frames to the processed layout (data.md §2).

    python -m fastgait.data.pretreat --dataset casia-b RAW OUT [--workers N]

Per frame: drop it when its pixel sum is <= 10000; crop to the rows with foreground; resize
to height 64 keeping the aspect ratio (cubic); centre on the median column (where the
cumulative column mass first exceeds half the total); cut a 64-wide window there, padding
with zero columns. Frames are stacked to uint8 ``[T, 64, 64]`` and written as
``OUT/<sid>/<type>/<view>/<view>.pkl``. Parallel over sequences, resumable (sequences already
written are skipped; every file is written to a temporary name and renamed).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from ._parallel import parallel_map
from .io import PathLike, save_sequence

MIN_FRAME_SUM = 10000
SIZE = 64
MIN_FRAMES = 5
RAW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def pretreat_frame(frame: np.ndarray) -> Optional[np.ndarray]:
    """One greyscale frame ``[H, W]`` (uint8) to uint8 ``[64, 64]``, or ``None`` when it is dropped."""
    if int(frame.sum(dtype=np.int64)) <= MIN_FRAME_SUM:
        return None
    rows = np.flatnonzero(frame.any(axis=1))
    frame = frame[rows[0] : rows[-1] + 1]
    height, width = frame.shape
    new_width = max(1, int(width * SIZE / height))
    frame = np.asarray(Image.fromarray(frame).resize((new_width, SIZE), Image.BICUBIC))
    column_mass = frame.sum(axis=0, dtype=np.int64).cumsum()
    if column_mass[-1] == 0:
        return None
    centre = int(np.argmax(column_mass > column_mass[-1] / 2))
    # The window is columns [centre - 32, centre + 32) of the frame, zero where it runs off the edges.
    left = centre - SIZE // 2
    first, last = max(left, 0), min(left + SIZE, new_width)
    out = np.zeros((SIZE, SIZE), np.uint8)
    out[:, first - left : last - left] = frame[:, first:last]
    return out


def pretreat_frames(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Greyscale frames to the stacked uint8 ``[T, 64, 64]`` (``T`` may be 0: every frame dropped)."""
    kept = [out for out in map(pretreat_frame, frames) if out is not None]
    if not kept:
        return np.zeros((0, SIZE, SIZE), np.uint8)
    return np.stack(kept)


def read_frame(path: PathLike) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


@dataclass(frozen=True)
class RawSequence:
    """The frame files of one raw sequence and the layout folders it goes to."""

    frames: tuple[Path, ...]
    subject: str
    type: str
    view: str

    def output(self, out: Path, suffix: str = ".pkl") -> Path:
        return out / self.subject / self.type / self.view / f"{self.view}{suffix}"


def _frame_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in RAW_SUFFIXES))


def _three_level(raw: Path) -> list[RawSequence]:
    """``RAW/<sid>/<type>/<view>/*.png`` (CASIA-B; OU-MVLP rearranged as ``<sid>/<seq>/<view>``)."""
    found = []
    for view_dir in sorted(raw.glob("*/*/*")):
        if view_dir.is_dir() and (frames := _frame_files(view_dir)):
            found.append(RawSequence(frames, view_dir.parent.parent.name, view_dir.parent.name, view_dir.name))
    return found


def _oumvlp(raw: Path) -> list[RawSequence]:
    """``RAW/Silhouette_<view>-<seq>/<sid>/*.png`` (OU-MVLP as distributed)."""
    found = []
    for top in sorted(raw.glob("Silhouette_*-*")):
        view, _, seq = top.name[len("Silhouette_") :].partition("-")
        for subject_dir in sorted(p for p in top.iterdir() if p.is_dir()):
            if frames := _frame_files(subject_dir):
                found.append(RawSequence(frames, subject_dir.name, seq, view))
    return found


def find_raw_sequences(raw: PathLike, dataset: str) -> list[RawSequence]:
    """The raw sequences of ``dataset`` (``"casia-b"`` or ``"oumvlp"``) under ``raw``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw frame folder {raw} does not exist or is not a folder")
    if dataset == "casia-b":
        found = _three_level(raw)
    elif dataset == "oumvlp":
        found = _oumvlp(raw) if any(raw.glob("Silhouette_*-*")) else _three_level(raw)
    else:
        raise ValueError(f"dataset must be 'casia-b' or 'oumvlp', got {dataset!r}")
    if not found:
        raise FileNotFoundError(f"no raw frames found under {raw} in the {dataset} layout (see docs of fastgait.data.pretreat)")
    return found


def _pretreat_one(job: tuple[RawSequence, Path]) -> tuple[str, RawSequence, int]:
    sequence, target = job
    sils = pretreat_frames(read_frame(p) for p in sequence.frames)
    if len(sils) == 0:
        return "empty", sequence, 0
    save_sequence(target, sils)
    return "written", sequence, len(sils)


def pretreat_dataset(
    raw: PathLike, out: PathLike, dataset: str = "casia-b", workers: Optional[int] = None, progress: bool = True
) -> dict[str, int]:
    """Pretreat every raw sequence under ``raw`` into the layout under ``out``.

    Sequences whose output file exists are skipped (resume). Returns counts: ``written``,
    ``existing`` (skipped), ``empty`` (every frame dropped; nothing written), ``short``
    (written with fewer than 5 frames; each is warned about on stderr).
    """
    from tqdm import tqdm

    out = Path(out)
    sequences = find_raw_sequences(raw, dataset)
    jobs = [(s, s.output(out)) for s in sequences if not s.output(out).exists()]
    counts = {"written": 0, "existing": len(sequences) - len(jobs), "empty": 0, "short": 0}
    for status, sequence, n_frames in parallel_map(
        _pretreat_one, jobs, workers or multiprocessing.cpu_count(), desc=f"pretreat {dataset}", unit="seq",
        progress=progress,
    ):
        counts[status] += 1
        where = f"{sequence.subject}/{sequence.type}/{sequence.view}"
        if status == "empty":
            tqdm.write(f"warning: {where}: every frame was dropped; skipped", file=sys.stderr)
        elif n_frames < MIN_FRAMES:
            counts["short"] += 1
            tqdm.write(f"warning: {where}: only {n_frames} frames after pretreatment", file=sys.stderr)
    return counts


from .._cli import cli_main  # noqa: E402 - one-line errors for this CLI


@cli_main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastgait.data.pretreat", description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", help="folder of raw silhouette frames")
    parser.add_argument("out", help="output folder (the processed layout)")
    parser.add_argument("--dataset", choices=("casia-b", "oumvlp"), default="casia-b")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    counts = pretreat_dataset(args.raw, args.out, args.dataset, args.workers, progress=not args.no_progress)
    print(", ".join(f"{key} {value}" for key, value in counts.items()))


if __name__ == "__main__":
    import sys

    sys.exit(main())
