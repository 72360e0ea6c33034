"""3D convolution with a faster CPU path for few input channels.

A 3D convolution is exactly a 2D convolution over the ``k_t`` neighbouring frames stacked along
channels:

    conv3d(x, W)[:, :, t] = conv2d(cat_k x[:, :, s*t + k], W[:, :, k] stacked along c_in)

On a CPU, oneDNN's conv3d backward is slow when there are few input channels (measured on 2
cores, batch 32, 1 -> 8 channels at 30 x 32 x 22: 122 ms against 49 ms in the stacked form),
while from about 8 input channels up its conv3d is as fast or faster. ``conv3d`` here takes
the stacked form on a CPU below that, ``F.conv3d`` otherwise (cuDNN on a GPU). Values equal up
to summation order; autograd derives the backward through ``conv2d``.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

Triple = Union[int, Sequence[int]]


def _triple(value: Triple) -> tuple[int, int, int]:
    return (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)


def frame_stacked_conv3d(x: torch.Tensor, weight: torch.Tensor, stride: Triple = 1, padding: Triple = 0) -> torch.Tensor:
    """``F.conv3d(x, weight, stride=stride, padding=padding)`` as one ``conv2d`` over stacked frames.

    x ``[n, c_in, t, h, w]``, weight ``[c_out, c_in, k_t, k_h, k_w]`` (no groups, no dilation).
    """
    st, sh, sw = _triple(stride)
    pt, ph, pw = _triple(padding)
    n, c_in, t, h, w = x.shape
    c_out, _, kt, kh, kw = weight.shape
    if pt:
        x = F.pad(x, (0, 0, 0, 0, pt, pt))
    t_out = (t + 2 * pt - kt) // st + 1
    span = st * (t_out - 1) + 1
    stacked = torch.cat([x[:, :, k : k + span : st] for k in range(kt)], dim=1)  # [n, kt*c_in, t_out, h, w]
    frames = stacked.transpose(1, 2).reshape(n * t_out, kt * c_in, h, w)
    weight2d = weight.permute(0, 2, 1, 3, 4).reshape(c_out, kt * c_in, kh, kw)  # channel index k*c_in + c
    out = F.conv2d(frames, weight2d, stride=(sh, sw), padding=(ph, pw))  # [n*t_out, c_out, h', w']
    return out.view(n, t_out, c_out, *out.shape[-2:]).transpose(1, 2)


STACKED_MAX_CHANNELS = 4  # input channels up to which the CPU takes the frame-stacked form


def conv3d(x: torch.Tensor, weight: torch.Tensor, stride: Triple = 1, padding: Triple = 0) -> torch.Tensor:
    """A bias-free 3D convolution: the frame-stacked form on a CPU for few input channels,
    ``F.conv3d`` otherwise."""
    if x.device.type == "cpu" and weight.shape[1] <= STACKED_MAX_CHANNELS:
        return frame_stacked_conv3d(x, weight, stride, padding)
    return F.conv3d(x, weight, stride=stride, padding=padding)
