"""GaitBase (OpenGait's ``Baseline`` model, CVPR 2023): a ResNet-9-like 2-D backbone on every
frame, temporal max (set pooling), HPP, SeparateFCs and SeparateBNNecks.

Module names are OpenGait's (``Backbone.forward_block.*``, ``FCs``, ``BNNecks``), so OpenGait's
Baseline state dict loads by name. Training returns ``(embeddings, logits)``: the triplet loss
takes the embeddings (before the BNNeck), the CE loss the BNNeck's logits; evaluation uses the
same embeddings (OpenGait's ``inference_feat``).

``rmb``: the ReverseMask plug-in (paper Table 4, "OpenGait + Inception RMB"): the second 3x3 conv
of every basic block of the listed layers (1-based, default all four) becomes a 2-D Inception
RMB, additive fusion, ReLU inside each branch (the backbone's activation), followed by the
block's BatchNorm as before (**Decision**: the paper does not list the places).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..nn import HorizontalPoolingPyramid, SeparateBNNecks, SeparateFCs
from ..nn.backbones2d import ResNet9, SetBlock
from ..nn.rmb2d import InceptionRMB2d
from ..ops._dispatch import check_impl
from .gaitset import _frames, _rmb_options
from .network import apply_init

PRESETS = {
    # OpenGait's configs/gaitbase/gaitbase_da_casiab.yaml
    "casia-b": {"channels": (64, 128, 256, 512), "layers": (1, 1, 1, 1), "strides": (1, 2, 2, 1),
                "bin_num": (16,), "embed_dim": 256, "num_classes": 74},
    # configs/gaitbase/gaitbase_oumvlp.yaml
    "oumvlp": {"channels": (64, 128, 256, 512), "layers": (1, 1, 1, 1), "strides": (1, 2, 2, 1),
               "bin_num": (16,), "embed_dim": 256, "num_classes": 5153},
    "tiny": {"channels": (8, 16, 32, 64), "layers": (1, 1, 1, 1), "strides": (1, 2, 2, 1),
             "bin_num": (8,), "embed_dim": 64, "num_classes": 74, "input_pool": 2},
}


class GaitBase(nn.Module):
    """GaitBase for ``preset="casia-b" | "oumvlp" | "tiny"``: ``[n, t, h, w] ->
    (embeddings [n, embed_dim, parts], logits [n, num_classes, parts])``, ``parts = sum(bin_num)``."""

    channels_last_format = torch.channels_last

    def __init__(self, preset: str = "casia-b", num_classes: Optional[int] = None,
                 channels: Optional[Sequence[int]] = None, layers: Optional[Sequence[int]] = None,
                 strides: Optional[Sequence[int]] = None, maxpool: bool = False,
                 bin_num: Optional[Sequence[int]] = None, embed_dim: Optional[int] = None,
                 bnneck: Optional[dict] = None, input_pool: Optional[int] = None, rmb=None,
                 impl: str = "auto", init: str = "opengait"):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown GaitBase preset {preset!r}; choose one of {sorted(PRESETS)}")
        check_impl(impl)
        spec = PRESETS[preset]
        num_classes = spec["num_classes"] if num_classes is None else int(num_classes)
        if num_classes < 1:
            raise ValueError(f"GaitBase needs num_classes >= 1 (its BNNeck classifier), got {num_classes}")
        bins = list(bin_num or spec["bin_num"])
        embed_dim = embed_dim or spec["embed_dim"]
        self.input_pool = int(input_pool or spec.get("input_pool", 1))
        options = _rmb_options(rmb)
        conv2_factory = None
        if options is not None:
            rmb_layers = set(options.pop("layers", (1, 2, 3, 4)))

            def conv2_factory(layer_index: int, planes: int):
                if layer_index + 1 not in rmb_layers:
                    return None
                return InceptionRMB2d(planes, planes, "add", negative_slope=0.0, impl=impl, **options)

        backbone = ResNet9(channels or spec["channels"], layers or spec["layers"], strides or spec["strides"],
                           maxpool=maxpool, conv2_factory=conv2_factory)
        c = backbone.out_channels
        self.Backbone = SetBlock(backbone)
        self.parts = sum(bins)
        self.FCs = SeparateFCs(self.parts, c, embed_dim)
        self.BNNecks = SeparateBNNecks(self.parts, embed_dim, num_classes, **(bnneck or {}))
        self.HPP = HorizontalPoolingPyramid(bins)
        apply_init(self, init)

    @property
    def fcs(self) -> SeparateFCs:
        return self.FCs

    def forward(self, sils: torch.Tensor):
        outs = self.Backbone(_frames(sils, self.input_pool)).amax(2)  # temporal max: [n, c, h, w]
        embeddings = self.FCs(self.HPP(outs))
        _, logits = self.BNNecks(embeddings)
        return embeddings, logits
