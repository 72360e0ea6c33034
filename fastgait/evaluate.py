"""``python -m fastgait.evaluate --checkpoint CKPT [--data ROOT]``: the rank-1 report of a trained model.

An OpenGait checkpoint (``{model, optimizer, scheduler, iteration}``) is read too; it carries no
config, so name the recipe of its model: ``--checkpoint GaitGL-80000.pt --config gaitgl_casia-b
data.root=/data/CASIA-B-pkl``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional

import torch

from . import data as gait_data
from .engine import checkpoint as ckpt
from .engine.evaluation import evaluate_model, report_results
from .evaluation import gei_baseline
from .engine.trainer import data_paths, resolve_amp
from .config import load_config
from .models import build_model
from .models.opengait import from_opengait, is_opengait_checkpoint


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgait.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint written by fastgait.train, or an OpenGait checkpoint (with --config)")
    parser.add_argument("--config", "-c", help="for an OpenGait checkpoint: the recipe of its model (e.g. gaitgl_casia-b)")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")
    parser.add_argument("--data", type=Path, help="dataset root (default: the one the model was trained on)")
    parser.add_argument("--partition", type=Path, help="partition JSON (default: the training run's)")
    parser.add_argument("--protocol", choices=["casia-b", "oumvlp"], help="default: the training config's")
    parser.add_argument("--metric", choices=["euc", "cos"], default=None)
    parser.add_argument("--output", type=Path, help="report folder (default: beside the checkpoint, eval/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip the GEI baseline")
    args = parser.parse_intermixed_args(argv)
    try:
        state = ckpt.load_checkpoint(args.checkpoint)
        opengait = is_opengait_checkpoint(state)
        if opengait and not args.config:
            raise ValueError(f"{args.checkpoint} is an OpenGait checkpoint (no fastgait config in it): name its "
                             "model's recipe with --config, e.g. --config gaitgl_casia-b data.root=/data/CASIA-B-pkl")
        config = load_config(args.config, args.overrides) if args.config else state["config"]
        data_cfg = config["data"]
        root, partition = data_paths(data_cfg)  # the training run's data, unless --data says otherwise
        if args.data is not None:
            root, partition = args.data, None
        partition = args.partition or partition
        protocol = args.protocol or data_cfg["protocol"]
        metric = args.metric or config["eval"]["metric"]
        device = torch.device(args.device)
        if opengait:
            model = from_opengait(state, config["model"]).to(device)
        else:
            model = build_model(state["model_config"]).to(device)
            model.load_state_dict(state["model"])
        test_set = gait_data.GaitDataset(root, partition, "test", cache=False)
        amp = resolve_amp(config["eval"].get("amp", "fp32"), device)  # evaluation precision (fp32 default)
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
        result = evaluate_model(model, test_set, protocol=protocol, metric=metric, device=device, autocast=autocast,
                                workers=config["eval"]["workers"])
        baseline = None if args.no_baseline else gei_baseline(test_set, protocol=protocol, metric=metric)
        out = args.output or args.checkpoint.parent.parent / "eval"
        report_results(result, baseline, out, tag=args.checkpoint.stem)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
