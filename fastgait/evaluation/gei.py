"""The non-learned baseline: gait energy image (mean silhouette over time) + nearest neighbour.

    python -m fastgait.evaluation.gei ROOT [--partition P] [--split test] [--protocol auto]

Reported beside every trained score, so a reader sees how much was learned (data.md §5).
"""
from __future__ import annotations

import argparse
from typing import Optional, Union

import numpy as np
import torch

from ..data.dataset import GaitDataset
from ..data.io import PathLike
from ..data.loader import cut_frames
from .protocols import evaluate


def gait_energy_images(dataset: GaitDataset) -> np.ndarray:
    """Mean silhouette over time of every sequence, ``[n, 64, 44]`` float32 in [0, 1]."""
    return np.stack([cut_frames(dataset[i]).mean(0, dtype=np.float32) / 255.0 for i in range(len(dataset))])


def gei_baseline(
    data: Union[GaitDataset, PathLike],
    partition: Optional[PathLike] = None,
    protocol: str = "auto",
    metric: str = "euc",
    split: str = "test",
    in_use=None,
    **options,
) -> dict:
    """Scores of GEI nearest neighbour, by :func:`fastgait.evaluation.evaluate`.

    ``data``: a ``GaitDataset`` (used as is) or a dataset root (its ``split`` is loaded with
    ``partition`` and ``in_use``). Each GEI is one ``[64*44, 1]`` embedding (one part: plain
    Euclidean). ``options``: ``probe``, ``rerank``, ``cross_view_gallery`` as in ``evaluate``
    (``probe`` defaults to the partition's ``PROBE_SET``).
    """
    dataset = (data if isinstance(data, GaitDataset)
               else GaitDataset(data, partition, split=split, progress=False, in_use=in_use))
    geis = torch.from_numpy(gait_energy_images(dataset).reshape(len(dataset), -1, 1))
    if options.get("probe") is None:
        options["probe"] = dataset.probe_set
    return evaluate(geis, dataset.subject_ids, dataset.types, dataset.views, protocol=protocol, metric=metric, **options)


from .._cli import cli_main  # noqa: E402 - one-line errors for this CLI


@cli_main
def main(argv: Optional[list[str]] = None) -> None:
    from .protocols import PROTOCOLS, is_real_scene
    from .render import matrix_markdown, to_markdown

    parser = argparse.ArgumentParser(prog="python -m fastgait.evaluation.gei", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset folder (processed layout)")
    parser.add_argument("--partition", default=None, help="partition JSON (default ROOT/partition.json)")
    parser.add_argument("--split", default="test", choices=("train", "test", "all"))
    parser.add_argument("--protocol", default="auto", choices=("auto", *PROTOCOLS))
    parser.add_argument("--probe", default=None, help="gait3d: probe keys JSON (default: the partition's PROBE_SET)")
    parser.add_argument("--metric", default="euc", choices=("euc", "cos"))
    parser.add_argument("--matrices", action="store_true", help="also print the probe x gallery view matrices")
    args = parser.parse_args(argv)
    result = gei_baseline(args.root, args.partition, args.protocol, args.metric, args.split, probe=args.probe)
    print(to_markdown(result))
    if is_real_scene(result):
        return
    for condition, r in result.items():
        same_view = np.nanmean(np.diagonal(r["matrix"]))
        print(f"{condition}: cross-view mean {r['mean']:.1f}%, same-view mean {same_view:.1f}%, mAP {r['mAP']:.1f}%")
    if args.matrices:
        for condition in result:
            print("\n" + matrix_markdown(result, condition))


if __name__ == "__main__":
    import sys

    sys.exit(main())
