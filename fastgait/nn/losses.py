"""Losses: separate batch-all triplet (blocks.md §6) and part-wise cross-entropy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import triplet_loss
from ..ops._dispatch import check_impl


class TripletLoss(nn.Module):
    """Separate batch-all triplet loss (BA+): ``forward(embeddings [n, c, p], labels [n]) -> (loss, info)``.

    Drop-in for OpenGait's ``TripletLoss(margin)``, except that the loss comes back already
    averaged over parts (a scalar) and labels may be in any order. ``info`` holds detached
    scalars: ``loss``, ``active_triplets`` (mean over parts), ``mean_pos_dist``, ``mean_neg_dist``.
    The loss is 0, not NaN, when no triplet is active (e.g. a batch of one identity).
    """

    def __init__(self, margin: float = 0.2, loss_term_weight: float = 1.0, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
        self.margin, self.loss_term_weight, self.impl = margin, loss_term_weight, impl

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, info = triplet_loss(embeddings, labels, self.margin, impl=self.impl)
        return loss * self.loss_term_weight, info

    def extra_repr(self) -> str:
        return f"margin={self.margin}, impl={self.impl!r}"


class CrossEntropyLoss(nn.Module):
    """Part-wise cross-entropy on logits ``[n, classes, p]`` (OpenGait's defaults: scale 16,
    label smoothing 0.1), averaged over parts. Returns ``(loss, info)`` with the accuracy."""

    def __init__(self, scale: float = 16.0, label_smooth: float = 0.1, loss_term_weight: float = 1.0):
        super().__init__()
        self.scale, self.label_smooth, self.loss_term_weight = scale, label_smooth, loss_term_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        parts = logits.shape[-1]
        scaled = logits.float() * self.scale
        loss = F.cross_entropy(scaled, labels.view(-1, 1).expand(-1, parts), label_smoothing=self.label_smooth)
        accuracy = (scaled.argmax(dim=1) == labels.view(-1, 1)).float().mean()
        return loss * self.loss_term_weight, {"ce_loss": loss.detach(), "accuracy": accuracy.detach()}
