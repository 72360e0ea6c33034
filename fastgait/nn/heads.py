"""Part-wise heads: ``SeparateFCs`` (OpenGait's) and the optional BN + classifier head of GaitGL."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SeparateFCs(nn.Module):
    """One weight ``[parts, c_in, c_out]``, a separate matrix product per part:
    ``[n, c_in, p] -> [n, c_out, p]``. Drop-in for OpenGait's ``SeparateFCs``."""

    def __init__(self, parts_num: int, in_channels: int, out_channels: int, norm: bool = False):
        super().__init__()
        self.p = parts_num
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(parts_num, in_channels, out_channels)))
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.fc_bin, dim=1) if self.norm else self.fc_bin
        out = x.permute(2, 0, 1).matmul(weight)  # [p, n, c_out]
        return out.permute(1, 2, 0).contiguous()


class BNClassifier(nn.Module):
    """GaitGL's original head: ``BatchNorm1d(c)`` over ``[n, c, p]``, then per-part logits.

    Returns ``(normalised features [n, c, p], logits [n, num_classes, p])``.
    """

    def __init__(self, parts_num: int, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_channels)
        self.classifier = SeparateFCs(parts_num, in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.bn(x)
        return features, self.classifier(features)
