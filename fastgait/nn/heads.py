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


class SeparateBNNecks(nn.Module):
    """OpenGait's ``SeparateBNNecks(parts_num, in_channels, class_num, norm=True, parallel_BN1d=True)``
    (BNNeck of "Bag of Tricks"): BatchNorm over ``c*p`` features (or one ``BatchNorm1d(c)`` per part),
    then per-part logits, cosine logits when ``norm``. Same state-dict keys as OpenGait's.

    Returns ``(normalised features [n, c, p], logits [n, class_num, p])``.
    """

    def __init__(self, parts_num: int, in_channels: int, class_num: int, norm: bool = True,
                 parallel_BN1d: bool = True):
        super().__init__()
        self.p, self.class_num, self.norm, self.parallel_BN1d = parts_num, class_num, norm, parallel_BN1d
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(parts_num, in_channels, class_num)))
        if parallel_BN1d:
            self.bn1d = nn.BatchNorm1d(in_channels * parts_num)
        else:
            self.bn1d = nn.ModuleList(nn.BatchNorm1d(in_channels) for _ in range(parts_num))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, p = x.shape
        if self.parallel_BN1d:
            x = self.bn1d(x.reshape(n, c * p)).view(n, c, p)
        else:
            x = torch.stack([bn(x[:, :, i]) for i, bn in enumerate(self.bn1d)], dim=2)
        feature = x.permute(2, 0, 1)  # [p, n, c]
        if self.norm:
            feature = F.normalize(feature, dim=-1)
            logits = feature.matmul(F.normalize(self.fc_bin, dim=1))
        else:
            logits = feature.matmul(self.fc_bin)
        return feature.permute(1, 2, 0).contiguous(), logits.permute(1, 2, 0).contiguous()
