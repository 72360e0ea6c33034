"""GaitGL's global-local block (blocks.md §4), with OpenGait's constructor and parameter names."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._dispatch import check_impl
from ..ops.gl import gl_conv3d
from .conv import NEGATIVE_SLOPE, BasicConv3d


class GLConv(nn.Module):
    """Global conv plus a local conv run on each of ``2**halving`` horizontal strips separately
    (zero padding at every strip border). ``fm_sign=False``: ``lrelu(global) + lrelu(local)``;
    ``fm_sign=True``: ``lrelu(concat_H(global, local))`` (2H rows).

    Drop-in for OpenGait's ``GLConv`` (same arguments and state-dict keys). With the GaitGL
    convolutions (3x3x3, stride 1, padding 1, no bias) the block runs ``fastgait.ops.gl_conv3d``
    (``impl``): one convolution with the stacked weights ``[W_g; W_l]`` and a correction on the
    rows either side of each strip border; other convolutions take OpenGait's loop.
    """

    def __init__(self, in_channels, out_channels, halving, fm_sign=False, kernel_size=(3, 3, 3),
                 stride=(1, 1, 1), padding=(1, 1, 1), bias=False, impl: str = "auto", **kwargs):
        super().__init__()
        check_impl(impl)
        self.halving = halving
        self.fm_sign = fm_sign
        self.impl = impl
        self.global_conv3d = BasicConv3d(in_channels, out_channels, kernel_size, stride, padding, bias, **kwargs)
        self.local_conv3d = BasicConv3d(in_channels, out_channels, kernel_size, stride, padding, bias, **kwargs)

    def out_rows(self, rows: int) -> int:
        return 2 * rows if self.fm_sign else rows

    def _fusable(self) -> bool:
        conv = self.global_conv3d.conv3d
        return (conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
                and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.bias is None
                and conv.padding_mode == "zeros" and self.local_conv3d.conv3d.bias is None)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The local branch before its activation, as OpenGait computes it (strips folded into the batch)."""
        if self.halving == 0:
            return self.local_conv3d(x)
        n, c, t, h, w = x.shape
        strip = h // 2**self.halving
        if strip == 0:
            raise ValueError(f"GLConv: {h} rows cannot be cut into 2**{self.halving} strips")
        if h % strip:  # unequal strips (OpenGait's torch.split semantics): one conv per strip
            return torch.cat([self.local_conv3d(part) for part in x.split(strip, 3)], 3)
        strips = h // strip
        folded = x.view(n, c, t, strips, strip, w).permute(0, 3, 1, 2, 4, 5).reshape(n * strips, c, t, strip, w)
        out = self.local_conv3d(folded)  # [n*strips, c', t', strip', w']
        _, c2, t2, h2, w2 = out.shape
        return out.view(n, strips, c2, t2, h2, w2).permute(0, 2, 3, 1, 4, 5).reshape(n, c2, t2, strips * h2, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():
            return gl_conv3d(x, self.global_conv3d.conv3d.weight, self.local_conv3d.conv3d.weight, self.halving,
                             bool(self.fm_sign), NEGATIVE_SLOPE, impl=self.impl)
        global_feat = self.global_conv3d(x)
        local_feat = self.local(x)
        if not self.fm_sign:
            return F.leaky_relu(global_feat, NEGATIVE_SLOPE) + F.leaky_relu(local_feat, NEGATIVE_SLOPE)
        return F.leaky_relu(torch.cat([global_feat, local_feat], dim=3), NEGATIVE_SLOPE)

    def extra_repr(self) -> str:
        return f"halving={self.halving}, fm_sign={self.fm_sign}, impl={self.impl!r}"
