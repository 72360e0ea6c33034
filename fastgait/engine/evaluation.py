"""Embedding a test split with a trained model, and reporting its scores beside the GEI baseline."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import data as gait_data
from ..evaluation import evaluate, grew_submission, hid_submission, is_real_scene, summary, to_markdown, write_report
from .signals import protect_workers


def eval_options(config: dict) -> dict[str, Any]:
    """The protocol options of a run config (``eval.probe``, ``eval.rerank``, ``eval.cross_view_gallery``),
    as keyword arguments of :func:`fastgait.evaluation.evaluate`."""
    cfg = config.get("eval", {})
    return {"probe": cfg.get("probe"), "rerank": cfg.get("rerank", False),
            "cross_view_gallery": cfg.get("cross_view_gallery", False)}


@torch.no_grad()
def embed_sequences(model: torch.nn.Module, dataset, device: torch.device, autocast: Callable = contextlib.nullcontext,
                    workers: int = 0, progress: bool = True, frames_all_limit: int = -1) -> torch.Tensor:
    """Embeddings ``[n, c, p]`` (fp32, on the CPU) of every whole sequence of ``dataset``, in order
    (its first ``frames_all_limit`` frames when that is not -1)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loader = protect_workers(gait_data.make_test_loader(dataset, workers=workers, frames_all_limit=frames_all_limit))
    out = []
    for sils, *_ in tqdm(loader, total=len(dataset), desc="embed", unit="seq", disable=not progress, dynamic_ncols=True):
        with autocast():
            result = model(sils.to(device, non_blocking=True))
        embeddings = result[0] if isinstance(result, tuple) else result
        out.append(embeddings.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def score_embeddings(embeddings, dataset, *, protocol: str, metric: str = "euc", probe=None, rerank=False,
                     cross_view_gallery: bool = False) -> dict:
    """:func:`fastgait.evaluation.evaluate` of embeddings of ``dataset``'s sequences; labels are the
    subject ids (so Gait3D probe keys match); ``probe`` defaults to the partition's ``PROBE_SET``."""
    finite = torch.isfinite(embeddings).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"the model gave NaN/inf embeddings for {int((~finite).sum())} of {len(finite)} test "
                         "sequences (diverged weights?); evaluate an earlier checkpoint, not a table of noise")
    if probe is None:
        probe = getattr(dataset, "probe_set", None)
    return evaluate(embeddings, dataset.subject_ids, dataset.types, dataset.views, protocol=protocol, metric=metric,
                    probe=probe, rerank=rerank, cross_view_gallery=cross_view_gallery)


def evaluate_model(model, dataset, *, protocol: str, metric: str = "euc", device: torch.device,
                   autocast: Callable = contextlib.nullcontext, workers: int = 0, progress: bool = True,
                   frames_all_limit: int = -1, **options) -> dict:
    """Scores of ``model`` on ``dataset`` (a test split) under ``protocol`` (``options``: :func:`eval_options`)."""
    embeddings = embed_sequences(model, dataset, device, autocast, workers, progress, frames_all_limit)
    return score_embeddings(embeddings, dataset, protocol=protocol, metric=metric, **options)


def write_submission(kind: str, embeddings, dataset, out_dir: Path, tag: str, metric: str = "euc", rerank=None) -> Path:
    """The GREW (``kind="grew"``) or HID (``"hid"``) challenge CSV under ``out_dir`` (never the dataset)."""
    path = Path(out_dir) / f"{kind}_submission_{tag}.csv"
    if kind == "grew":
        return grew_submission(embeddings, dataset.subject_ids, dataset.types, dataset.views, path, metric,
                               rerank=bool(rerank))
    if kind == "hid":
        return hid_submission(embeddings, dataset.subject_ids, dataset.views, path, metric,
                              rerank=True if rerank is None else rerank)
    raise ValueError(f"eval.submission must be grew or hid, got {kind!r}")


def combined_table(result: dict, baseline: Optional[dict], model_name: str = "model") -> str:
    """One Markdown table: the model's rows, then the GEI baseline's."""
    if is_real_scene(result):
        rows = {model_name: result}
        if baseline:
            rows["GEI+NN"] = baseline
        return to_markdown(rows)
    rows = {f"{model_name} {cond}": r for cond, r in result.items()}
    if baseline:
        rows.update({f"GEI+NN {cond}": r for cond, r in baseline.items()})
    return to_markdown(rows)


def report_results(result: dict, baseline: Optional[dict], out_dir: Path, tag: str = "final",
                   printer: Callable[[str], None] = print) -> None:
    """Print the score table beside the baseline and write the reports (md, csv, json, png)."""
    real_scene = is_real_scene(result)
    stem = "scores" if real_scene else "rank1"
    paths = write_report(result, out_dir, stem=f"{stem}_{tag}", title=f"{'scores' if real_scene else 'rank-1'} ({tag})")
    if baseline:
        write_report(baseline, out_dir, stem=f"{stem}_gei_baseline", title="GEI + nearest neighbour")
    if real_scene:
        printer(f"\nRetrieval scores (%), protocol {result['protocol']}{', re-ranked' if result.get('reranked') else ''}, "
                f"{result['probes']} probes against "
                f"{result['gallery']} gallery sequences (held-out subjects):\n")
    else:
        printer("\nRank-1 accuracy (%) per probe view, identical views excluded (held-out subjects):\n")
    printer(combined_table(result, baseline))
    printer(f"\nmodel: {summary(result)}" + (f"   GEI baseline: {summary(baseline)}" if baseline else ""))
    without = result.get("probes_without_gallery") if real_scene else sum(
        r.get("probes_without_gallery", 0) for r in result.values())
    if without:
        printer(f"note: {without} {'probes' if real_scene else '(probe, gallery view) pairs'} without a sequence of "
                f"their subject in the gallery ({'left out of the means' if real_scene else 'counted as misses'})")
    printer(f"reports: {paths['md']} (and .csv, .json{', .png' if 'png' in paths else ''})")
