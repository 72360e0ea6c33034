"""Embedding a test split with a trained model, and reporting rank-1 beside the GEI baseline."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import data as gait_data
from ..evaluation import evaluate, summary, to_markdown, write_report
from .signals import protect_workers


@torch.no_grad()
def embed_sequences(model: torch.nn.Module, dataset, device: torch.device, autocast: Callable = contextlib.nullcontext,
                    workers: int = 0, progress: bool = True) -> torch.Tensor:
    """Embeddings ``[n, c, p]`` (fp32, on the CPU) of every whole sequence of ``dataset``, in order."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loader = protect_workers(gait_data.make_test_loader(dataset, workers=workers))
    out = []
    for sils, *_ in tqdm(loader, total=len(dataset), desc="embed", unit="seq", disable=not progress, dynamic_ncols=True):
        with autocast():
            result = model(sils.to(device, non_blocking=True))
        embeddings = result[0] if isinstance(result, tuple) else result
        out.append(embeddings.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluate_model(model, dataset, *, protocol: str, metric: str = "euc", device: torch.device,
                   autocast: Callable = contextlib.nullcontext, workers: int = 0, progress: bool = True) -> dict:
    """Rank-1 tables of ``model`` on ``dataset`` (a test split) under ``protocol``."""
    embeddings = embed_sequences(model, dataset, device, autocast, workers, progress)
    finite = torch.isfinite(embeddings).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"the model gave NaN/inf embeddings for {int((~finite).sum())} of {len(finite)} test "
                         "sequences (diverged weights?); evaluate an earlier checkpoint, not a table of noise")
    return evaluate(embeddings, dataset.labels, dataset.types, dataset.views, protocol=protocol, metric=metric)


def combined_table(result: dict, baseline: Optional[dict], model_name: str = "model") -> str:
    """One Markdown table: the model's rows, then the GEI baseline's."""
    rows = {f"{model_name} {cond}": r for cond, r in result.items()}
    if baseline:
        rows.update({f"GEI+NN {cond}": r for cond, r in baseline.items()})
    return to_markdown(rows)


def report_results(result: dict, baseline: Optional[dict], out_dir: Path, tag: str = "final",
                   printer: Callable[[str], None] = print) -> None:
    """Print the rank-1 table beside the baseline and write the reports (md, csv, json, png)."""
    paths = write_report(result, out_dir, stem=f"rank1_{tag}", title=f"rank-1 ({tag})")
    if baseline:
        write_report(baseline, out_dir, stem="rank1_gei_baseline", title="GEI + nearest neighbour")
    printer("\nRank-1 accuracy (%) per probe view, identical views excluded (held-out subjects):\n")
    printer(combined_table(result, baseline))
    printer(f"\nmodel: {summary(result)}" + (f"   GEI baseline: {summary(baseline)}" if baseline else ""))
    printer(f"reports: {paths['md']} (and .csv, .json, .png)")
