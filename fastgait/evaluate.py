"""``python -m fastgait.evaluate --checkpoint CKPT [--data ROOT]``: the rank-1 report of a trained model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from . import data as gait_data
from .engine import checkpoint as ckpt
from .engine.evaluation import evaluate_model, report_results
from .evaluation import gei_baseline
from .engine.trainer import resolve_amp, synthetic_root
from .models import build_model


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgait.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by fastgait.train")
    parser.add_argument("--data", type=Path, help="dataset root (default: the one the model was trained on)")
    parser.add_argument("--partition", type=Path, help="partition JSON (default: the training run's)")
    parser.add_argument("--protocol", choices=["casia-b", "oumvlp"], help="default: the training config's")
    parser.add_argument("--metric", choices=["euc", "cos"], default=None)
    parser.add_argument("--output", type=Path, help="report folder (default: beside the checkpoint, eval/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip the GEI baseline")
    args = parser.parse_args(argv)
    try:
        state = ckpt.load_checkpoint(args.checkpoint)
        config = state["config"]
        data_cfg = config["data"]
        root = args.data or (Path(data_cfg["root"]) if data_cfg["root"] else
                             synthetic_root(data_cfg["synthetic"]["preset"], data_cfg["synthetic"]["seed"]))
        partition = args.partition
        if partition is None and args.data is None and data_cfg["split"]:
            partition = root / f"partition_{data_cfg['split'].upper()}.json"
        elif partition is None and args.data is None and data_cfg["partition"]:
            partition = Path(data_cfg["partition"])
        protocol = args.protocol or data_cfg["protocol"]
        metric = args.metric or config["eval"]["metric"]
        device = torch.device(args.device)
        model = build_model(state["model_config"]).to(device)
        model.load_state_dict(state["model"])
        test_set = gait_data.GaitDataset(root, partition, "test", cache=False)
        amp = resolve_amp(config["train"]["amp"], device)
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else None
        result = evaluate_model(model, test_set, protocol=protocol, metric=metric, device=device,
                                **({"autocast": autocast} if autocast else {}))
        baseline = None if args.no_baseline else gei_baseline(test_set, protocol=protocol, metric=metric)
        out = args.output or args.checkpoint.parent.parent / "eval"
        report_results(result, baseline, out, tag=args.checkpoint.stem)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
