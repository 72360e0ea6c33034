"""Losses: separate batch-all triplet (blocks.md §6) and part-wise cross-entropy.

Two families:

- ``TripletLoss`` / ``CrossEntropyLoss`` (here, exported by ``fastgait.nn``) take OpenGait's
  constructor arguments. ``TripletLoss`` is fastgait's fused loss: it returns a *scalar* (the
  mean over parts) and fastgait's info keys (``active_triplets``, ``mean_pos_dist``,
  ``mean_neg_dist``); fastgait's trainer uses it. ``CrossEntropyLoss`` follows OpenGait's
  contract exactly (``label_smooth`` a bool, ``eps`` the smoothing, info key ``loss``).
- ``fastgait.nn.opengait.TripletLoss`` (``OpenGaitTripletLoss`` here) follows OpenGait's
  contract exactly: per-part loss ``[p]``, info ``loss``, ``hard_loss``, ``loss_num``,
  ``mean_dist`` (each ``[p]``), and an opt-in gather-and-scale under DDP.

In both, ``loss_term_weight`` is stored for the caller (OpenGait's ``LossAggregator`` multiplies
by it) and never applied inside ``forward``, so it is applied exactly once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..ops import triplet_loss
from ..ops._dispatch import check_impl
from ..ops.reference import _padded_columns, part_euclidean


def gather_and_scale(embeddings: torch.Tensor, labels: torch.Tensor):
    """OpenGait's ``gather_and_scale_wrapper`` input side: all-gather ``embeddings`` and ``labels``
    over the default process group in rank order (only this rank's slice keeps its gradient).

    Returns ``(embeddings, labels, world_size)``; the caller multiplies the loss by ``world_size``
    (DDP averages gradients over ranks, so the sum over ranks of each local slice's gradient then
    equals the gradient of the loss of the global batch). Without an initialised process group
    (or with one process) the inputs come back unchanged with world size 1.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, labels, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    pieces = [torch.empty_like(embeddings) for _ in range(world)]
    dist.all_gather(pieces, embeddings.detach().contiguous())
    pieces[rank] = embeddings
    label_pieces = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_pieces, labels.contiguous())
    return torch.cat(pieces), torch.cat(label_pieces), world


class TripletLoss(nn.Module):
    """Separate batch-all triplet loss (BA+), fused: ``forward(embeddings [n, c, p], labels [n]) -> (loss, info)``.

    Takes OpenGait's ``TripletLoss(margin, loss_term_weight)`` arguments. The loss comes back
    already averaged over parts (a scalar: OpenGait's aggregator takes ``loss.mean()``, which is
    the same value) and labels may be in any order, with any number of sequences per identity.
    ``info`` holds detached scalars: ``loss``, ``active_triplets`` (mean over parts),
    ``mean_pos_dist``, ``mean_neg_dist``. The loss is 0, not NaN, when no triplet is active.
    ``loss_term_weight`` is not applied here (the caller applies it, as OpenGait's aggregator does).
    ``gather_and_scale=True``: under DDP, all-gather the batch and multiply the loss by the world
    size (OpenGait's ``gather_and_scale_wrapper``); off by default (fastgait's trainer gathers itself).
    For OpenGait's exact return (per-part loss, its info keys) use ``fastgait.nn.opengait.TripletLoss``.
    """

    def __init__(self, margin: float = 0.2, loss_term_weight: float = 1.0, impl: str = "auto",
                 gather_and_scale: bool = False):
        super().__init__()
        check_impl(impl)
        self.margin, self.loss_term_weight, self.impl = margin, loss_term_weight, impl
        self.gather_and_scale = gather_and_scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        world = 1
        if self.gather_and_scale:
            embeddings, labels, world = gather_and_scale(embeddings, labels)
        loss, info = triplet_loss(embeddings, labels, self.margin, impl=self.impl)
        return (loss * world if world > 1 else loss), info

    def extra_repr(self) -> str:
        return f"margin={self.margin}, loss_term_weight={self.loss_term_weight}, impl={self.impl!r}"


def per_part_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float):
    """Per-part batch-all triplet terms without building ``[p, n, K, N]``.

    For each anchor the negatives' distances are sorted once; for a positive at distance ``a``
    the active negatives are those closer than ``a + margin`` (a ``searchsorted``), and their hinge
    sum is ``count * (a + margin) - prefix_sum`` of the sorted distances. Exact (same terms as the
    brute force), differentiable through the distances, ``O(p n^2 log n)`` time, ``O(p n^2)`` memory.

    Returns ``(loss_avg [p], loss_num [p], hard_loss [p], dist [p, n, n])``.
    """
    emb = embeddings.permute(2, 0, 1).float()  # [p, n, c]
    parts, n = emb.shape[0], emb.shape[1]
    self_pairs = torch.eye(n, dtype=torch.bool, device=emb.device)
    dist_all = part_euclidean(emb, emb).masked_fill(self_pairs, 0.0)  # [p, n, n]
    same = labels.view(-1, 1) == labels.view(1, -1)
    pos_index, pos_valid = _padded_columns(same)  # [n, K]
    neg_index, neg_valid = _padded_columns(~same)  # [n, N]
    if neg_index.shape[1] == 0:  # one identity: no triplet
        zero = dist_all.sum(dim=(1, 2)) * 0.0
        return zero, zero.detach(), zero.detach(), dist_all
    anchor_pos = dist_all.gather(2, pos_index.expand(parts, -1, -1))  # [p, n, K]
    anchor_neg = dist_all.gather(2, neg_index.expand(parts, -1, -1))  # [p, n, N]
    inf = torch.tensor(float("inf"), device=emb.device)
    neg_sorted, _ = torch.where(neg_valid, anchor_neg, inf).sort(dim=-1)
    neg_finite = torch.where(torch.isinf(neg_sorted), torch.zeros_like(neg_sorted), neg_sorted)
    prefix = F.pad(neg_finite.cumsum(-1), (1, 0))  # [p, n, N + 1]
    threshold = anchor_pos + margin
    count = torch.searchsorted(neg_sorted.detach().contiguous(), threshold.detach().contiguous())  # [p, n, K]
    count = count * pos_valid
    hinge_sum = count.to(threshold.dtype) * threshold - prefix.gather(2, count)
    hinge_sum = (hinge_sum * pos_valid).sum(dim=(1, 2))  # [p]
    loss_num = count.sum(dim=(1, 2)).float()
    loss_avg = torch.where(loss_num > 0, hinge_sum / (loss_num + 1e-9), torch.zeros_like(hinge_sum))
    with torch.no_grad():  # the hardest triplet of each part (0 when none is active)
        far_pos = torch.where(pos_valid, anchor_pos, -inf).amax(dim=-1)  # [p, n]
        near_neg = neg_sorted[..., 0]
        hard = F.relu(far_pos - near_neg + margin)
        hard = torch.where(torch.isfinite(hard), hard, torch.zeros_like(hard)).amax(dim=-1)
    return loss_avg, loss_num, hard, dist_all


class OpenGaitTripletLoss(nn.Module):
    """OpenGait's ``TripletLoss`` contract, for use inside OpenGait's training loop.

    ``TripletLoss(margin, loss_term_weight=1.0)``; ``forward(embeddings [n, c, p], labels [n])``
    returns ``(loss_avg [p], info)`` with ``info`` = ``loss``, ``hard_loss``, ``loss_num``,
    ``mean_dist`` (each ``[p]``, detached), as OpenGait's. ``loss_term_weight`` is left to the
    aggregator. ``gather_and_scale=True``: all-gather over the process group and multiply the
    loss by the world size, as OpenGait's ``gather_and_scale_wrapper`` does (OpenGait always
    does this; here it is opt-in so that a single process needs no process group).

    Differences to OpenGait's: the distance of a sample to itself is exactly 0 (OpenGait's
    expanded formula leaves rounding noise there), and identities may have unequal numbers of
    sequences in the batch (OpenGait's reshape needs equal counts).
    """

    def __init__(self, margin: float = 0.2, loss_term_weight: float = 1.0, gather_and_scale: bool = False):
        super().__init__()
        self.margin, self.loss_term_weight, self.gather_and_scale = margin, loss_term_weight, gather_and_scale
        self.info: dict = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        world = 1
        if self.gather_and_scale:
            embeddings, labels, world = gather_and_scale(embeddings, labels)
        loss_avg, loss_num, hard_loss, dist_all = per_part_triplet(embeddings, labels, self.margin)
        self.info = {
            "loss": loss_avg.detach().clone(),
            "hard_loss": hard_loss.detach().clone(),
            "loss_num": loss_num.detach().clone(),
            "mean_dist": dist_all.detach().mean((1, 2)),
        }
        return (loss_avg * world if world > 1 else loss_avg), self.info

    def extra_repr(self) -> str:
        return f"margin={self.margin}, loss_term_weight={self.loss_term_weight}, gather_and_scale={self.gather_and_scale}"


class CrossEntropyLoss(nn.Module):
    """Part-wise cross-entropy on logits ``[n, classes, p]``, OpenGait's contract:
    ``CrossEntropyLoss(scale=16, label_smooth=True, eps=0.1, loss_term_weight=1.0, log_accuracy=False)``.

    ``label_smooth`` is a switch and ``eps`` the smoothing it applies (OpenGait's meaning).
    Returns ``(loss, info)``: the loss averaged over samples and parts; ``info["loss"]``, plus
    ``info["accuracy"]`` when ``log_accuracy``. ``loss_term_weight`` is left to the caller.
    """

    def __init__(self, scale: float = 16.0, label_smooth: bool = True, eps: float = 0.1,
                 loss_term_weight: float = 1.0, log_accuracy: bool = False):
        super().__init__()
        if not isinstance(label_smooth, bool):
            raise TypeError(f"label_smooth is a switch (True/False) as in OpenGait, got {label_smooth!r}; "
                            "give the smoothing amount as eps=")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps (label smoothing) must lie in [0, 1), got {eps}")
        self.scale, self.label_smooth, self.eps = scale, label_smooth, eps
        self.loss_term_weight, self.log_accuracy = loss_term_weight, log_accuracy
        self.info: dict = {}

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = logits.shape[-1]
        logits = logits.float()
        target = labels.view(-1, 1).expand(-1, parts)
        smoothing = self.eps if self.label_smooth else 0.0
        loss = F.cross_entropy(logits * self.scale, target, label_smoothing=smoothing)
        self.info = {"loss": loss.detach().clone()}
        if self.log_accuracy:
            self.info["accuracy"] = (logits.argmax(dim=1) == labels.view(-1, 1)).float().mean().detach()
        return loss, self.info

    def extra_repr(self) -> str:
        return f"scale={self.scale}, label_smooth={self.label_smooth}, eps={self.eps}"
