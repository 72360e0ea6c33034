"""Challenge submission files: GREW (top-20 subjects per probe video) and HID (top-1 per probe video).

Both are written where the caller says (the run folder's ``eval/``), never into the dataset.

- GREW, as OpenGait's ``GREW_submission``: gallery types ``01``/``02``, probes type ``03``; one
  row per probe, ``videoId`` (the probe's view folder name) then the subject ids of its 20
  nearest gallery sequences (a subject may repeat: the gallery holds two sequences per subject);
  numeric ids are written as integers, as OpenGait does.
- HID, as OpenGait's ``HID_submission``: probes are the sequences whose subject is ``probe``,
  the rest is gallery; one row per probe, ``videoID,label`` (the nearest gallery subject), after
  k-reciprocal re-ranking (k1 = 6, k2 = 6, lambda = 0.3) unless ``rerank=False``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from ..data.io import PathLike, atomic_write_bytes
from .protocols import GREW_GALLERY, GREW_PROBE, _distances
from .ranking import top_k

HID_RERANK = {"k1": 6, "k2": 6, "lambda_value": 0.3}


def _subject(text: str) -> str:
    return str(int(text)) if str(text).isdigit() else str(text)


def _write_csv(path: PathLike, header: str, rows: list[list[str]]) -> Path:
    path = Path(path)
    text = header + "\n" + "".join(",".join(row) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode())
    return path


def grew_submission(
    embeddings, subject_ids: Sequence[str], types: Sequence[str], views: Sequence[str], path: PathLike,
    metric: str = "euc", rerank: Union[bool, dict] = False, top: int = 20,
) -> Path:
    """Write the GREW submission CSV (``videoId,rank1..rank20``) to ``path``; returns it."""
    subject_ids, types, views = (np.asarray(a, dtype=str) for a in (subject_ids, types, views))
    probe, gallery = np.isin(types, GREW_PROBE), np.isin(types, GREW_GALLERY)
    if not probe.any() or not gallery.any():
        raise ValueError(f"a GREW submission needs gallery types {GREW_GALLERY} and probe type {GREW_PROBE[0]}; "
                         f"found types {sorted(set(types.tolist()))}")
    dist = _distances(torch.as_tensor(embeddings).float(), probe, gallery, metric, rerank)
    top = min(top, int(gallery.sum()))  # a toy gallery of fewer than 20 sequences: fewer columns
    nearest = top_k(dist, top)
    gallery_ids = subject_ids[gallery]
    rows = [[video, *(_subject(s) for s in gallery_ids[row])] for video, row in zip(views[probe], nearest)]
    return _write_csv(path, "videoId," + ",".join(f"rank{k}" for k in range(1, top + 1)), rows)


def hid_submission(
    embeddings, subject_ids: Sequence[str], views: Sequence[str], path: PathLike, metric: str = "euc",
    rerank: Union[bool, dict] = True, probe_subject: str = "probe",
) -> Path:
    """Write the HID submission CSV (``videoID,label``) to ``path``; returns it."""
    subject_ids, views = np.asarray(subject_ids, dtype=str), np.asarray(views, dtype=str)
    probe = subject_ids == probe_subject
    if not probe.any() or probe.all():
        raise ValueError(f"an HID submission needs probe sequences (subject folder {probe_subject!r}) and gallery ones")
    dist = _distances(torch.as_tensor(embeddings).float(), probe, ~probe, metric, HID_RERANK if rerank is True else rerank)
    nearest = top_k(dist, 1)[:, 0]
    labels = subject_ids[~probe][nearest]
    return _write_csv(path, "videoID,label", [[v, str(label)] for v, label in zip(views[probe], labels)])
