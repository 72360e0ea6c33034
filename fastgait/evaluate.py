"""``python -m fastgait.evaluate --checkpoint CKPT [--data ROOT]``: the evaluation report of a trained model.

An OpenGait checkpoint (``{model, optimizer, scheduler, iteration}``) is read too; it carries no
config, so name the recipe of its model: ``--checkpoint GaitGL-80000.pt --config gaitgl_casia-b
data.root=/data/CASIA-B-pkl``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from . import data as gait_data
from ._cli import InputError, cli_main
from .engine import checkpoint as ckpt
from .config import load_config
from .engine.evaluation import embed_sequences, eval_options, report_results, score_embeddings, write_submission
from .evaluation import PROTOCOLS, gei_baseline
from .engine.trainer import _check_protocol, data_paths, resolve_amp, resolve_device
from .models import build_model
from .models.opengait import from_opengait, is_opengait_checkpoint


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgait.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint written by fastgait.train, or an OpenGait checkpoint (with --config)")
    parser.add_argument("--config", "-c", help="for an OpenGait checkpoint: the recipe of its model (e.g. gaitgl_casia-b)")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")
    parser.add_argument("--data", type=Path, help="dataset root (default: the one the model was trained on)")
    parser.add_argument("--partition", type=Path, help="partition JSON (default: the training run's)")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="default: the training config's")
    parser.add_argument("--probe", help="gait3d: probe keys JSON (default: eval.probe, else the partition's PROBE_SET)")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (real-scene protocols)")
    parser.add_argument("--cross-view-gallery", action="store_true",
                        help="casia-b / oumvlp: OpenGait's cross-view-gallery evaluation")
    parser.add_argument("--submission", choices=["grew", "hid"], help="also write the challenge CSV to the report folder")
    parser.add_argument("--metric", choices=["euc", "cos"], default=None)
    parser.add_argument("--output", type=Path, help="report folder (default: beside the checkpoint, eval/)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if any)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the GEI baseline")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_intermixed_args(argv)
    device = resolve_device(args.device)
    state = ckpt.load_checkpoint(args.checkpoint, validate=False)
    opengait = is_opengait_checkpoint(state)
    if not opengait:
        state = ckpt.load_checkpoint(args.checkpoint)  # a fastgait checkpoint: every part it needs
    if opengait and not args.config:
        raise InputError(f"{args.checkpoint} is an OpenGait checkpoint (no fastgait config in it): name its "
                         "model's recipe with --config, e.g. --config gaitgl_casia-b data.root=/data/CASIA-B-pkl")
    weights = state.get("model", state) if opengait else state["model"]
    bad = ckpt.nonfinite_tensors(weights)
    if bad:
        raise InputError(f"{args.checkpoint} holds NaN/inf weights ({len(bad)} of {len(weights)} tensors, "
                         f"e.g. {bad[0]}): the run diverged; evaluate an earlier checkpoint")
    config = load_config(args.config, args.overrides) if args.config else state["config"]
    data_cfg = config["data"]
    root, partition = data_paths(data_cfg)  # the training run's data, unless --data says otherwise
    if args.data is not None:
        root, partition = args.data, None
    partition = args.partition or partition
    protocol = args.protocol or data_cfg["protocol"]
    metric = args.metric or config["eval"]["metric"]
    if opengait:
        model = from_opengait(state, config["model"]).to(device)
    else:
        model = build_model(state["model_config"]).to(device)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"{args.checkpoint}: the weights do not match its model_config "
                                       f"({' '.join(str(error).split())[:200]})") from None
    eval_cfg = config.get("eval", {})
    options = eval_options(config)
    if args.protocol and args.protocol != data_cfg["protocol"]:
        options["probe"] = None  # the run's probe option belongs to its own protocol
    if args.probe:
        options["probe"] = args.probe
    options["rerank"] = options["rerank"] or args.rerank
    options["cross_view_gallery"] = options["cross_view_gallery"] or args.cross_view_gallery
    test_set = gait_data.GaitDataset(root, partition, "test", cache=False, on_error=data_cfg.get("on_error", "raise"),
                                     progress=False, in_use=data_cfg.get("in_use"))
    _check_protocol(test_set, protocol, options["probe"])
    amp = resolve_amp(eval_cfg.get("amp", "fp32"), device)  # evaluation precision (fp32 default, as OpenGait)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    embeddings = embed_sequences(model, test_set, device, autocast, workers=eval_cfg.get("workers", 0),
                                 frames_all_limit=eval_cfg.get("frames_all_limit", -1))
    out = args.output or args.checkpoint.parent.parent / "eval"
    submission = args.submission or eval_cfg.get("submission")
    if submission:
        path = write_submission(submission, embeddings, test_set, out, args.checkpoint.stem, metric,
                                options["rerank"] if args.rerank else None)
        print(f"{submission} submission: {path}")
    result = score_embeddings(embeddings, test_set, protocol=protocol, metric=metric, **options)
    baseline = None if args.no_baseline else gei_baseline(test_set, protocol=protocol, metric=metric, **options)
    report_results(result, baseline, out, tag=args.checkpoint.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
