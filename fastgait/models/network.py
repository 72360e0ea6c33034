"""The network shape all three models share, built from a list of block specs.

``stem -> blocks -> temporal max + GeM over strips -> SeparateFCs (-> BN + classifier)``

A spec is a dict with ``type`` and the block's arguments, e.g. ``{"type": "mla", "in": 32,
"out": 64, "fuse": "add"}``. Types: ``mla``, ``gl``, ``conv`` (plain ``c3``), ``rmb`` (Plain RMB),
``inception_rmb``, ``maxpool``, ``dropblock``, ``scaling_dropblock``. Configs (``configs/*.yaml``)
hold these lists, so a garbled channel count in a paper table is one edit away.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import C3, MLA, GLConv, InceptionRMB, PlainRMB, DropBlock, ScalingDropBlock, RandomErasing
from ..nn import BNClassifier, GeMHPP, SeparateBNNecks, SeparateFCs
from ..ops._dispatch import check_impl

INITS = ("opengait", "pytorch")
HEADS = ("bn", "bnneck")


def opengait_init(model: nn.Module) -> nn.Module:
    """OpenGait's ``BaseModel.init_parameters``: xavier-uniform weights (zero biases) for every
    Conv1d/2d/3d and Linear, BatchNorm weights ~ N(1, 0.02) and zero biases (affine ones);
    SeparateFCs are xavier-uniform at construction already. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return model


def apply_init(model: nn.Module, init: str) -> None:
    """``init="opengait"`` (default for every model: the GaitGL/GaitSet/GaitBase code all three
    papers build on initialises so; neither the GaitMask nor the ReverseMask paper says otherwise)
    or ``"pytorch"`` (PyTorch's per-layer defaults, kept as constructed)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "opengait":
        opengait_init(model)


class MaxPoolHW(nn.MaxPool3d):
    """2x2 max pool over (h, w), frames untouched."""

    def __init__(self):
        super().__init__(kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def out_rows(self, rows: int) -> int:
        return rows // 2


def _build_block(spec: dict, impl: str) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "maxpool":
        return MaxPoolHW()
    if kind in ("dropblock", "scaling_dropblock"):
        layer = DropBlock if kind == "dropblock" else ScalingDropBlock
        return layer(spec.get("drop_prob", 0.1), spec.get("block_size", 5))
    c_in, c_out = spec.pop("in"), spec.pop("out")
    if kind == "mla":
        return MLA(c_in, c_out, impl=impl, **spec)
    if kind == "gl":
        return GLConv(c_in, c_out, spec.pop("halving", 3), spec.pop("fm_sign", False), impl=impl, **spec)
    if kind == "conv":
        return C3(c_in, c_out)
    if kind == "rmb":
        return PlainRMB(c_in, c_out, impl=impl, **spec)
    if kind == "inception_rmb":
        return InceptionRMB(c_in, c_out, impl=impl, **spec)
    raise ValueError(f"unknown block type {kind!r}; known: mla, gl, conv, rmb, inception_rmb, maxpool, "
                     "dropblock, scaling_dropblock")


class GaitNet(nn.Module):
    """A gait network: silhouettes ``[n, t, h, w]`` (or ``[n, 1, t, h, w]``) -> embeddings ``[n, c, parts]``.

    Args:
        stem: conv specs ``{"in", "out", "kernel" (3), "stride" (1)}``, each followed by lrelu
            (a (3,1,1) kernel with stride (3,1,1) is GaitGL's local temporal aggregation).
        blocks: block specs (module docstring).
        embed_dim: output channels of the part-wise FCs.
        num_classes: > 0 adds a classifier head; forward then returns
            ``(embeddings, logits [n, num_classes, parts])``.
        head: ``"bn"`` (GaitGL's original head: BatchNorm1d + SeparateFCs; the embeddings are the
            BN output) or ``"bnneck"`` (OpenGait's SeparateBNNecks, arguments in ``bnneck``; the
            embeddings are the features before the BNNeck).
        init: ``"opengait"`` (default) or ``"pytorch"``; see ``apply_init``.
        input_height: rows of the input silhouettes; the GeM pooling takes one strip per row of
            the last feature map, so the number of parts follows from it.
        gem_p: initial GeM exponent (learnable).
        input_erasing: arguments of ``RandomErasing`` applied to the input in training, or None.
        input_pool: average-pool the silhouettes by this factor in h and w first (1: off); the CPU
            demo uses 2 to train on 32x22 frames.
        impl: op implementation for the fused ops (``fastgait.ops``).
    """

    def __init__(self, stem: Sequence[dict], blocks: Sequence[dict], embed_dim: int, num_classes: int = 0,
                 input_height: int = 64, gem_p: float = 6.5, input_erasing: Optional[dict] = None,
                 input_pool: int = 1, impl: str = "auto", head: str = "bn", bnneck: Optional[dict] = None,
                 init: str = "opengait"):
        super().__init__()
        check_impl(impl)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.impl = impl
        self.input_erasing = RandomErasing(**input_erasing) if input_erasing else None
        self.input_pool = int(input_pool)
        self.stem = nn.Sequential(*[
            C3(s["in"], s["out"], s.get("kernel", 3), s.get("stride", 1),
               padding=0 if s.get("stride", 1) != 1 else None)
            for s in stem
        ])
        self.blocks = nn.Sequential(*[_build_block(spec, impl) for spec in blocks])
        rows = input_height // self.input_pool
        for block in self.blocks:  # blocks without out_rows keep the rows
            rows = block.out_rows(rows) if hasattr(block, "out_rows") else rows
        if rows < 1:
            raise ValueError(f"input_height={input_height} leaves no rows after the blocks")
        self.parts = rows
        channels = _last_channels(blocks, stem)
        self.pool = GeMHPP([rows], p=gem_p, impl=impl)
        self.fcs = SeparateFCs(rows, channels, embed_dim)
        self.head_type = head
        self.head = None
        if num_classes > 0:
            self.head = (BNClassifier(rows, embed_dim, num_classes) if head == "bn"
                         else SeparateBNNecks(rows, embed_dim, num_classes, **(bnneck or {})))
        apply_init(self, init)

    def features(self, sils: torch.Tensor) -> torch.Tensor:
        """Backbone output before pooling: ``[n, c, t', h', w']``."""
        x = sils.unsqueeze(1) if sils.dim() == 4 else sils
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"expected silhouettes [n, t, h, w] or [n, 1, t, h, w], got {tuple(sils.shape)}")
        if x.shape[2] < 3:  # the temporal aggregation needs 3 frames: repeat short clips (as GaitGL)
            x = x.repeat(1, 1, 3 if x.shape[2] == 1 else 2, 1, 1)
        if self.input_erasing is not None:
            x = self.input_erasing(x)
        if self.input_pool > 1:
            x = F.avg_pool3d(x, (1, self.input_pool, self.input_pool))
        return self.blocks(self.stem(x))

    def forward(self, sils: torch.Tensor):
        pooled = self.pool(self.features(sils))  # temporal max + GeM: [n, c, parts]
        embeddings = self.fcs(pooled)
        if self.head is None:
            return embeddings
        features, logits = self.head(embeddings)
        return (features, logits) if self.head_type == "bn" else (embeddings, logits)


def _last_channels(blocks: Sequence[dict], stem: Sequence[dict]) -> int:
    for spec in reversed(blocks):
        if "out" in spec:
            return spec["out"]
    return stem[-1]["out"]


def merge_spec(base: dict[str, Any], overrides: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``overrides`` applied key by key (None values ignored)."""
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = copy.deepcopy(value)
    return merged
