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

from .config import available_configs, load_config
from .engine import checkpoint as ckpt
from .engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted

DEMO_CONFIGS = {"cuda": "demo_gpu", "cpu": "demo_cpu"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastgait.train",
        description="Train GaitMask / ReverseMaskNet / GaitGL with fused ops, AMP and torch.compile.",
        epilog="Overrides: any config key as section.key=value, e.g. train.iterations=2000 data.root=/data/CASIA-B-pkl "
               f"model.block=rmb_scaling. Recipes: {', '.join(available_configs())}.",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    parser.add_argument("--config", "-c", help="recipe name (configs/NAME.yaml) or a YAML path; "
                        "default: the embedded demo for this machine (demo_gpu on CUDA, demo_cpu otherwise)")
    parser.add_argument("--output", "-o", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                        help="continue from a checkpoint (default: the newest in the run folder)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the GPU of this rank if any)")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device_type = args.device.split(":")[0] if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config(args.config or DEMO_CONFIGS[device_type], args.overrides)
    if args.no_compile:
        config["train"]["compile"] = False
    output = args.output or Path("runs") / config["name"]
    resume = None
    if args.resume:
        resume = ckpt.latest_checkpoint(output / "checkpoints") if args.resume == "latest" else Path(args.resume)
        if resume is None:
            print(f"error: --resume found no checkpoint in {output / 'checkpoints'}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(config, output, device=args.device, progress=not args.quiet)
        trainer._say(f"fastgait: {config['name']} | model {trainer.model_config['name']} "
                     f"({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters) | "
                     f"device {trainer.device} x {trainer.dist.world_size} | amp {str(trainer.amp_dtype or 'fp32').replace('torch.', '')} | "
                     f"data {trainer.data_root} ({len(trainer.train_set)} training sequences, "
                     f"{trainer.train_set.num_ids} identities) | output {output}")
        trainer.train(resume)
        if not args.no_eval:
            trainer.evaluate()
        trainer._say(f"wall time: {time.perf_counter() - started:.0f} s")
    except TrainingInterrupted:
        return 130
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
