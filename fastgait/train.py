"""``python -m fastgait.train``: train a gait model (the embedded default, or a recipe from ``configs/``).

With no arguments: generate the synthetic dataset once (cached), train a GaitMask sized for the
machine (the paper-sized model on a GPU, a small one on a CPU), evaluate it and print the rank-1
table beside the GEI baseline. Multi-GPU: ``torchrun --nproc_per_node=N -m fastgait.train ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ._cli import InputError, cli_main
from .config import available_configs, load_config
from .engine import checkpoint as ckpt
from .engine.trainer import Trainer, check_resume_config, check_run_folder, resolve_device

DEMO_CONFIGS = {"cuda": "demo_gpu", "cpu": "demo_cpu"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastgait.train",
        description="Train GaitMask / ReverseMaskNet / GaitGL with fused ops, AMP and torch.compile.",
        epilog="Overrides: any config key as section.key=value, e.g. train.iterations=2000 data.root=/data/CASIA-B-pkl "
               f"model.block=rmb_scaling. Recipes: {', '.join(available_configs())}. "
               "Exit codes: 0 done, 1 the run failed (diverged), 2 a bad input, 130 interrupted (checkpoint saved).",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    parser.add_argument("--config", "-c", help="recipe name (configs/NAME.yaml) or a YAML path; "
                        "default: the embedded demo for this machine (demo_gpu on CUDA, demo_cpu otherwise)")
    parser.add_argument("--output", "-o", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                        help="continue from a checkpoint (default: the newest in the run folder); overrides may "
                             "change the schedule (train.lr, iterations, milestones, ...) and cadences, not the model, "
                             "data or batch")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in a folder that holds another run, deleting its metrics, "
                             "checkpoints and reports")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the GPU of this rank if any)")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_intermixed_args(argv)
    if args.resume and args.resume != "latest" and "=" in args.resume and not Path(args.resume).exists():
        # "--resume train.lr=0.5": an override after a bare --resume, not a checkpoint path
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


@cli_main
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.resume and args.overwrite:
        raise InputError("--resume continues a run and --overwrite replaces it: give one of them")
    device = resolve_device(args.device)  # a bad --device fails here, before any data is read
    config = load_config(args.config or DEMO_CONFIGS[device.type], args.overrides)
    output = args.output or Path("runs") / config["name"]
    resume = None
    if args.resume:
        resume = ckpt.latest_checkpoint(output / "checkpoints") if args.resume == "latest" else Path(args.resume)
        if resume is None:
            raise InputError(f"--resume found no checkpoint (iter_*.pt) in {output / 'checkpoints'}; "
                             "name one (--resume PATH) or the run folder (--output DIR)")
        previous = ckpt.load_checkpoint(resume)["config"]
        # The run continues with the checkpoint's config, updated by this command's overrides
        # (or by the recipe, when --config is given again); keys that cannot change are refused.
        config = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides, base=previous)
        check_resume_config(previous, config, resume)
    else:
        check_run_folder(output, None, args.overwrite)
    if args.no_compile:
        config["train"]["compile"] = False
    started = time.perf_counter()
    trainer = None
    try:
        evaluates = not args.no_eval or config["train"]["eval_every"] > 0
        trainer = Trainer(config, output, device=args.device, progress=not args.quiet,
                          check_eval=evaluates, overwrite=args.overwrite)
        trainer._say(f"fastgait: {config['name']} | model {trainer.model_config['name']} "
                     f"({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters) | "
                     f"device {trainer.device} x {trainer.dist.world_size} | amp {str(trainer.amp_dtype or 'fp32').replace('torch.', '')} | "
                     f"data {trainer.data_root} ({len(trainer.train_set)} training sequences, "
                     f"{trainer.train_set.num_ids} identities) | output {output}")
        trainer.train(resume)
        if not args.no_eval:
            trainer.evaluate()
        trainer._say(f"wall time: {time.perf_counter() - started:.0f} s")
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
