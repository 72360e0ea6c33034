"""GaitSet (AAAI 2019; OpenGait's implementation): a set of per-frame 2-D maps, pooled by max.

``set_block1 -> set_block2 -> set_block3`` run on every frame (``SetBlock``); after each, the
frames are max-pooled ("set pooling") and fed to a global branch (``gl_block2``, ``gl_block3``,
same layout as the set blocks, own weights) that sums the pooled maps; HPP (mean + max over
``bin_num`` strip pyramids) of the last set map and of the global map, then SeparateFCs.
Module names are OpenGait's, so OpenGait's GaitSet state dict loads by name.

``rmb``: the ReverseMask plug-in (paper Table 4, "GaitSet + Inception RMB"): the second 3x3
conv of each listed set block (1-based, default all three) becomes a 2-D Inception RMB with
additive fusion (**Decision**: the paper does not list the places; the per-frame set blocks are
GaitSet's feature extractor, and additive fusion keeps the rows the global branch adds to).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import HorizontalPoolingPyramid, SeparateFCs
from ..nn.backbones2d import BasicConv2d, SetBlock
from ..nn.rmb2d import InceptionRMB2d
from ..ops._dispatch import check_impl
from .network import apply_init

PRESETS = {
    # OpenGait's configs/gaitset/gaitset.yaml
    "casia-b": {"channels": (1, 32, 64, 128), "bin_num": (16, 8, 4, 2, 1), "embed_dim": 256},
    "oumvlp": {"channels": (1, 64, 128, 256), "bin_num": (16, 8, 4, 2, 1), "embed_dim": 256},
    # CPU demo / tests: a quarter of the channels on 2x pooled frames (32x22)
    "tiny": {"channels": (1, 8, 16, 32), "bin_num": (8, 4, 2, 1), "embed_dim": 64, "input_pool": 2},
}


def _frames(sils: torch.Tensor, input_pool: int) -> torch.Tensor:
    """Silhouettes ``[n, t, h, w]`` or ``[n, 1, t, h, w]`` -> ``[n, 1, t, h', w']``."""
    x = sils.unsqueeze(1) if sils.dim() == 4 else sils
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"expected silhouettes [n, t, h, w] or [n, 1, t, h, w], got {tuple(sils.shape)}")
    if input_pool > 1:
        x = F.avg_pool3d(x, (1, input_pool, input_pool))
    return x


def _rmb_options(rmb) -> Optional[dict]:
    if not rmb:
        return None
    options = {} if rmb is True else dict(rmb)
    unknown = set(options) - {"blocks", "layers", "region", "ratio", "reg_prob"}
    if unknown:
        raise ValueError(f"unknown rmb option(s) {sorted(unknown)}; known: blocks (GaitSet), layers (GaitBase), "
                         "region, ratio, reg_prob")
    return options


class GaitSet(nn.Module):
    """GaitSet for ``preset="casia-b" | "oumvlp" | "tiny"``: ``[n, t, h, w] -> [n, embed_dim, parts]``,
    ``parts = 2 * sum(bin_num)`` (62 for CASIA-B). About 2.59 M parameters on CASIA-B."""

    channels_last_format = torch.channels_last  # 4-D weights (the trainer's channels_last)

    def __init__(self, preset: str = "casia-b", channels: Optional[Sequence[int]] = None,
                 bin_num: Optional[Sequence[int]] = None, embed_dim: Optional[int] = None,
                 input_pool: Optional[int] = None, rmb=None, impl: str = "auto", init: str = "opengait"):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown GaitSet preset {preset!r}; choose one of {sorted(PRESETS)}")
        check_impl(impl)
        spec = PRESETS[preset]
        c0, c1, c2, c3 = channels or spec["channels"]
        bins = list(bin_num or spec["bin_num"])
        embed_dim = embed_dim or spec["embed_dim"]
        self.input_pool = int(input_pool or spec.get("input_pool", 1))
        options = _rmb_options(rmb)
        rmb_blocks = set(options.pop("blocks", (1, 2, 3))) if options is not None else set()

        def stage(block: int, c_in: int, c_out: int, kernel: int, pool: bool, set_block: bool) -> nn.Sequential:
            """conv k (c_in -> c_out), lrelu, conv 3x3 (c_out -> c_out), lrelu (, max pool 2x2); in a set
            block listed in ``rmb`` the second conv is an Inception RMB (activations inside its branches)."""
            mods = [BasicConv2d(c_in, c_out, kernel, 1, kernel // 2), nn.LeakyReLU(inplace=True)]
            if set_block and block in rmb_blocks:
                mods.append(InceptionRMB2d(c_out, c_out, "add", impl=impl, **options))
            else:
                mods += [BasicConv2d(c_out, c_out, 3, 1, 1), nn.LeakyReLU(inplace=True)]
            if pool:
                mods.append(nn.MaxPool2d(2, 2))
            return nn.Sequential(*mods)

        self.set_block1 = SetBlock(stage(1, c0, c1, 5, True, True))
        self.set_block2 = SetBlock(stage(2, c1, c2, 3, True, True))
        self.set_block3 = SetBlock(stage(3, c2, c3, 3, False, True))
        self.gl_block2 = stage(2, c1, c2, 3, True, False)
        self.gl_block3 = stage(3, c2, c3, 3, False, False)
        self.HPP = HorizontalPoolingPyramid(bins)
        self.parts = 2 * sum(bins)
        self.Head = SeparateFCs(self.parts, c3, embed_dim)
        apply_init(self, init)

    @property
    def fcs(self) -> SeparateFCs:
        return self.Head

    def forward(self, sils: torch.Tensor) -> torch.Tensor:
        x = _frames(sils, self.input_pool)
        outs = self.set_block1(x)
        gl = self.gl_block2(outs.amax(2))
        outs = self.set_block2(outs)
        gl = self.gl_block3(gl + outs.amax(2))
        outs = self.set_block3(outs).amax(2)
        gl = gl + outs
        return self.Head(torch.cat([self.HPP(outs), self.HPP(gl)], -1))
