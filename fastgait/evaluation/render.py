"""Results as the papers print them: Markdown and CSV tables, a heatmap PNG, JSON.

Indoor (CASIA-B, OU-MVLP): the main table has one row per condition (NM, BG, CL) and one
column per probe view (the mean over the other gallery views) plus the mean; the matrices give
probe view x gallery view. Real scene (GREW, Gait3D, ...): one row per result, columns rank-1,
rank-5, rank-10, rank-20, mAP, mINP, and the probe counts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.io import PathLike, atomic_write_bytes
from .protocols import REAL_SCENE_KEYS, is_real_scene


def _fmt(value: float, digits: int, missing: str = "-") -> str:
    return missing if value is None or math.isnan(value) else f"{value:.{digits}f}"


def real_scene_rows(result: dict) -> Optional[dict]:
    """``{row name: real-scene result}`` when ``result`` is one real-scene result (named by its
    protocol) or a dict of them; ``None`` for indoor results."""
    if is_real_scene(result):
        return {result.get("protocol", "result"): result}
    if result and all(isinstance(v, dict) and is_real_scene(v) for v in result.values()):
        return result
    return None


def _real_scene_table(rows: dict, digits: int, missing: str = "-") -> tuple[list[str], list[list[str]]]:
    header = ["", *REAL_SCENE_KEYS, "probes", "without gallery", "gallery"]
    body = [
        [name, *(_fmt(r[k], digits, missing) for k in REAL_SCENE_KEYS),
         str(r.get("probes", "")), str(r.get("probes_without_gallery", "")), str(r.get("gallery", ""))]
        for name, r in rows.items()
    ]
    return header, body


def _rows(result: dict, digits: int, missing: str = "-") -> tuple[list[str], list[list[str]]]:
    scene = real_scene_rows(result)
    if scene is not None:
        return _real_scene_table(scene, digits, missing)
    views = next(iter(result.values()))["views"]
    header = ["condition", *views, "mean"]
    rows = [
        [name, *(_fmt(v, digits, missing) for v in r["per_view"]), _fmt(r["mean"], digits, missing)]
        for name, r in result.items()
    ]
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(result: dict, digits: int = 1) -> str:
    """The papers' table: rows NM/BG/CL, columns the probe views and the mean (rank-1 %, identical views
    excluded); for real-scene results, rank-1/5/10/20, mAP and mINP (%)."""
    return _markdown_table(*_rows(result, digits))


def matrix_markdown(result: dict, condition: str, digits: int = 1) -> str:
    """Probe view (rows) x gallery view (columns) rank-1 % of one condition."""
    r = result[condition]
    if r.get("matrix") is None:  # cross-view gallery: no view pairs
        return ""
    header = [f"{condition} probe \\ gallery", *r["views"]]
    rows = [[view, *(_fmt(v, digits) for v in row)] for view, row in zip(r["views"], r["matrix"])]
    return _markdown_table(header, rows)


def to_csv(result: dict, digits: int = 2) -> str:
    """The papers' table as CSV (empty cells where undefined)."""
    header, rows = _rows(result, digits, missing="")
    return "\n".join(",".join(row) for row in [header, *rows]) + "\n"


def summary(result: dict, digits: int = 1) -> str:
    """One line: ``NM 95.1 | BG 89.0 | CL 71.3`` (condition means, rank-1 %), or
    ``rank-1 61.2 | rank-5 80.1 | mAP 50.3 | mINP 30.2`` for a real-scene result."""
    if is_real_scene(result):
        return " | ".join(f"{k} {_fmt(result[k], digits)}" for k in ("rank-1", "rank-5", "mAP", "mINP"))
    return " | ".join(f"{name} {_fmt(r['mean'], digits)}" for name, r in result.items())


def to_json(result: dict) -> dict:
    """The result with arrays as lists and NaN as ``None`` (JSON has no NaN)."""

    def clean(value):
        if isinstance(value, np.ndarray):
            return clean(value.tolist())
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    return clean(result)


def save_heatmap(result: dict, path: PathLike, title: Optional[str] = None) -> Path:
    """One probe-view x gallery-view rank-1 heatmap per condition, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    views = result[names[0]]["views"]
    size = 1.2 + 0.42 * len(views)
    fig, axes = plt.subplots(1, len(names), figsize=(size * len(names), size + 0.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        matrix = result[name]["matrix"]
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{name}: mean {_fmt(result[name]['mean'], 1)}%")
        ax.set_xticks(range(len(views)), views, rotation=90, fontsize=7)
        ax.set_yticks(range(len(views)), views, fontsize=7)
        ax.set_xlabel("gallery view")
        if ax is axes[0][0]:
            ax.set_ylabel("probe view")
        if len(views) <= 14:
            for (i, j), value in np.ndenumerate(matrix):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6, color="w" if value < 60 else "k")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="rank-1 %")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: PathLike, stem: str = "rank1", title: Optional[str] = None) -> dict[str, Path]:
    """Write ``<stem>.md`` (table and matrices), ``<stem>.csv``, ``<stem>.json`` and, for indoor
    results with view matrices, ``<stem>.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    heading = f"# {title}\n\n" if title else ""
    scene = real_scene_rows(result)
    matrices = [] if scene is not None else [m for m in (matrix_markdown(result, c) for c in result) if m]
    notes = _notes(result)
    markdown = heading + to_markdown(result) + "\n" + "".join("\n" + block + "\n" for block in matrices + notes)
    kinds = ("md", "csv", "json") + (("png",) if scene is None and matrices else ())
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in kinds}
    atomic_write_bytes(paths["md"], markdown.encode())
    atomic_write_bytes(paths["csv"], to_csv(result).encode())
    atomic_write_bytes(paths["json"], (json.dumps(to_json(result), indent=1) + "\n").encode())
    if "png" in paths:
        save_heatmap({c: r for c, r in result.items() if r.get("matrix") is not None}, paths["png"], title)
    return paths


def _notes(result: dict) -> list[str]:
    """Lines on probes that could not be matched (no sequence of their subject in the gallery)."""
    scene = real_scene_rows(result)
    items = scene.items() if scene is not None else result.items()
    notes = []
    for name, r in items:
        count = r.get("probes_without_gallery", 0) if isinstance(r, dict) else 0
        if count:
            what = "probes" if scene is not None or r.get("gallery") == "cross-view" else "(probe, gallery view) pairs"
            how = "left out of the means" if scene is not None else "counted as misses"
            notes.append(f"{name}: {count} {what} without a sequence of their subject in the gallery ({how}).")
    return notes
