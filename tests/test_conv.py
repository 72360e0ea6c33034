"""The frame-stacked 3D convolution (the CPU path) against F.conv3d, in value and gradients."""
import pytest
import torch
import torch.nn.functional as F

from fastgait.nn.conv import Conv3d
from fastgait.ops.conv import frame_stacked_conv3d
from fastgait.testing import assert_close


@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3, 3), 1, 1),
    ((3, 1, 1), (3, 1, 1), 0),   # GaitGL's temporal aggregation
    ((3, 3, 3), (1, 2, 2), (1, 1, 1)),
    ((1, 3, 3), 1, (0, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 0, 1)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_frame_stacked_conv3d_matches_conv3d(kernel, stride, padding, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 9, 5, generator=gen, dtype=torch.float64)[:, :, :, :, ::1].requires_grad_()
    w = torch.randn(4, 3, *kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = F.conv3d(x, w, stride=stride, padding=padding)
    actual = frame_stacked_conv3d(x, w, stride, padding)
    assert_close(actual, expected, name="y")
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    for a, e, name in zip(torch.autograd.grad(actual, [x, w], grad), torch.autograd.grad(expected, [x, w], grad),
                          ("dx", "dw")):
        assert_close(a, e, name=name)


def test_conv3d_module_is_a_drop_in():
    torch.manual_seed(0)
    plain = torch.nn.Conv3d(3, 4, 3, padding=1, bias=False)
    fast = Conv3d(3, 4, 3, padding=1, bias=False)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 5, 8, 6).contiguous(memory_format=torch.channels_last_3d)
    assert_close(fast(x), plain(x), name="y")
    with_bias = Conv3d(3, 4, 3, padding=1, bias=True)  # falls back to nn.Conv3d's own path
    assert with_bias(x).shape == (2, 4, 5, 8, 6)
