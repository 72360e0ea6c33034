"""Reference blocks: masks, MLA, ReverseMask, GL, pooling, heads, regularisers, dispatch."""
import pytest
import torch
import torch.nn.functional as F

from fastgait.nn import (
    MLA, RMFE, ComplementaryBandMasks, DropBlock, GeMHPP, GLConv, InceptionRMB, PlainRMB, RandomErasing,
    ReverseMask, ScalingDropBlock, SeparateFCs, TripletLoss,
)
from fastgait.ops import band_height, draw_band_starts, resolve_impl
from fastgait.ops.reference import mla_conv3d_reference


# --- complementary band masks ---------------------------------------------------------

@pytest.mark.parametrize("height,ratio,rows", [(64, 0.4, 25), (10, 0.3, 3), (10, 0.7, 7), (5, 0.0, 0), (7, 1.0, 7)])
def test_band_height(height, ratio, rows):
    assert band_height(height, ratio) == rows


def test_band_masks_are_complementary_and_in_range():
    torch.manual_seed(0)
    x = torch.randn(50, 2, 3, 11, 4)
    keep, drop = ComplementaryBandMasks(0.4)(x)
    assert keep.shape == (50, 1, 1, 11, 1)
    assert torch.equal(keep + drop, torch.ones_like(keep))
    rows = keep.view(50, 11)
    assert torch.equal(rows.sum(1), torch.full((50,), 4.0))  # floor(0.4 * 11) = 4
    # the kept rows are contiguous: one run per sample
    assert torch.equal((rows.diff(dim=1) != 0).sum(1) <= 2, torch.ones(50, dtype=torch.bool))
    assert len(set(rows.argmax(1).tolist())) > 3  # per-sample starts vary


def test_band_starts_cover_all_positions_and_batch_mode():
    torch.manual_seed(0)
    starts = draw_band_starts(4000, 10, 4)
    assert set(starts.tolist()) == set(range(7))
    per_batch = draw_band_starts(6, 10, 4, per_sample=False)
    assert len(set(per_batch.tolist())) == 1
    with pytest.raises(ValueError, match="does not fit"):
        draw_band_starts(2, 5, 6)


def test_band_draw_follows_torch_seed():
    torch.manual_seed(5)
    a = draw_band_starts(8, 20, 8)
    torch.manual_seed(5)
    assert torch.equal(a, draw_band_starts(8, 20, 8))


# --- MLA ------------------------------------------------------------------------------

def _mla(fuse="add", **kwargs):
    torch.manual_seed(0)
    return MLA(3, 4, fuse=fuse, impl="reference", **kwargs)


@pytest.mark.parametrize("fuse,rows", [("add", 9), ("concat", 18)])
def test_mla_shapes(fuse, rows):
    block = _mla(fuse)
    assert block(torch.randn(2, 3, 4, 9, 5)).shape == (2, 4, 4, rows, 5)
    assert block.out_rows(9) == rows


def test_mla_eval_is_plain_local_conv():
    block = _mla().eval()
    x = torch.randn(2, 3, 4, 9, 5)
    expected = F.leaky_relu(F.conv3d(x, block.global_conv.weight, padding=1), 0.01) + F.leaky_relu(
        F.conv3d(x, block.local_conv.weight, padding=1), 0.01)
    torch.testing.assert_close(block(x), expected)


def test_mla_pair_differs_from_eval_and_equals_it_with_empty_band():
    x = torch.randn(4, 3, 4, 12, 5)
    block = _mla()
    torch.manual_seed(1)
    trained = block.train()(x)
    evaluated = block.eval()(x)
    assert (trained - evaluated).abs().max() > 1e-3
    empty_band = _mla(drop_ratio=0.0).train()
    empty_band.load_state_dict(block.state_dict())
    torch.testing.assert_close(empty_band(x), evaluated)


def test_pair_is_not_linear_shortcut():
    """Without the activation inside each branch the pair would collapse to W*X (blocks.md §1)."""
    x = torch.randn(2, 3, 2, 8, 4)
    w = torch.randn(4, 3, 3, 3, 3)
    start = torch.tensor([2, 3])
    with_act = mla_conv3d_reference(x, None, w, start, 3)
    without_band = mla_conv3d_reference(x, None, w, None, 0)
    assert (with_act - without_band).abs().max() > 1e-3


def test_mla_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fuse"):
        MLA(3, 4, fuse="mul")
    with pytest.raises(ValueError, match="impl"):
        MLA(3, 4, impl="cuda")
    with pytest.raises(ValueError, match="drop_ratio"):
        MLA(3, 4, drop_ratio=1.5)


# --- ReverseMask ----------------------------------------------------------------------

@pytest.mark.parametrize("region", ["unit", "band", "block"])
@pytest.mark.parametrize("variant", ["dropping", "scaling"])
def test_reverse_mask_pair_sums_to_input(region, variant):
    torch.manual_seed(0)
    layer = ReverseMask(variant, region).train()
    x = torch.randn(3, 2, 4, 10, 6)
    x_a, x_b = layer(x)
    torch.testing.assert_close(x_a + x_b, x)
    if variant == "dropping":  # Xa = X*Mm, Xb = X*Mr: disjoint supports
        assert torch.equal((x_a != 0) & (x_b != 0), torch.zeros_like(x, dtype=torch.bool))


def test_reverse_mask_regions_share_mask_over_batch_channels_frames():
    torch.manual_seed(0)
    x = torch.ones(3, 2, 4, 10, 6)
    x_a, _ = ReverseMask("dropping", "block", ratio=0.5).train()(x)
    mask = x_a[0, 0, 0]
    assert torch.equal(x_a, mask.expand_as(x_a))
    assert mask.sum() == 5 * 3  # floor(0.5*10) x floor(0.5*6) block
    band, _ = ReverseMask("dropping", "band", ratio=0.4).train()(x)
    assert torch.equal(band[0, 0, 0].sum(1), band[0, 0, 0, :, 0] * 6) and band[0, 0, 0, :, 0].sum() == 4


def test_reverse_mask_off_in_eval_and_reg_prob_zero():
    x = torch.randn(2, 2, 3, 6, 5)
    assert ReverseMask().eval()(x) is None
    assert ReverseMask(reg_prob=0.0).train()(x) is None


@pytest.mark.parametrize("variant", ["dropping", "scaling"])
def test_rmfe_train_and_eval(variant):
    torch.manual_seed(0)
    block = PlainRMB(3, 4, variant=variant)
    x = torch.randn(2, 3, 3, 8, 5)
    plain = F.leaky_relu(F.conv3d(x, block.conv.weight, padding=1), 0.01)
    torch.testing.assert_close(block.eval()(x), plain)
    assert (block.train()(x) - plain).abs().max() > 1e-3
    assert isinstance(block, RMFE)


@pytest.mark.parametrize("fuse,rows", [("add", 8), ("concat", 24)])
def test_inception_rmb_shapes(fuse, rows):
    block = InceptionRMB(3, 4, fuse=fuse)
    assert block.train()(torch.randn(2, 3, 3, 8, 5)).shape == (2, 4, 3, rows, 5)
    assert block.out_rows(8) == rows


def test_inception_eval_is_sum_of_three_plain_convs():
    torch.manual_seed(0)
    block = InceptionRMB(3, 4).eval()
    x = torch.randn(2, 3, 3, 8, 5)
    c3 = lambda conv: F.leaky_relu(conv(x), 0.01)  # noqa: E731
    expected = c3(block.global_conv) + c3(block.dropping.conv) + c3(block.scaling.conv)
    torch.testing.assert_close(block(x), expected)


# --- GaitGL block ---------------------------------------------------------------------

def _opengait_local(block, x):
    """OpenGait's loop: split the rows into strips and convolve each separately."""
    strip = x.shape[3] // 2 ** block.halving
    return torch.cat([block.local_conv3d(part) for part in x.split(strip, 3)], 3)


@pytest.mark.parametrize("height", [16, 13])
@pytest.mark.parametrize("fm_sign", [False, True])
def test_glconv_matches_opengait_loop(height, fm_sign):
    torch.manual_seed(0)
    block = GLConv(3, 4, halving=2, fm_sign=fm_sign)
    x = torch.randn(2, 3, 3, height, 5)
    torch.testing.assert_close(block.local(x), _opengait_local(block, x))
    g = block.global_conv3d(x)
    l = _opengait_local(block, x)
    expected = (F.leaky_relu(torch.cat([g, l], 3)) if fm_sign else F.leaky_relu(g) + F.leaky_relu(l))
    torch.testing.assert_close(block(x), expected)
    assert "global_conv3d.conv3d.weight" in block.state_dict()


# --- pooling and heads ----------------------------------------------------------------

def test_gemhpp_matches_opengait_formula():
    torch.manual_seed(0)
    pool = GeMHPP(bin_num=[4, 2], p=3.0, impl="reference")
    x = torch.rand(2, 3, 8, 5)
    expected = torch.cat([
        F.avg_pool2d(x.view(2, 3, b, -1).clamp(min=1e-6).pow(3.0), (1, 8 // b * 5)).pow(1 / 3.0).squeeze(-1)
        for b in (4, 2)
    ], -1)
    torch.testing.assert_close(pool(x), expected)


def test_gemhpp_temporal_max_input():
    pool = GeMHPP(bin_num=[3], impl="reference")
    x = torch.rand(2, 3, 4, 9, 5)
    torch.testing.assert_close(pool(x), pool(x.max(2).values))


def test_gemhpp_uneven_strips_tile_the_map():
    pool = GeMHPP(bin_num=[3], p=1.0, impl="reference")
    x = torch.arange(7.0).view(1, 1, 7, 1) + 1  # rows 1..7, strips [0,2) [2,4) [4,7)
    torch.testing.assert_close(pool(x), torch.tensor([[[1.5, 3.5, 6.0]]]))
    with pytest.raises(ValueError, match="bin"):
        GeMHPP(bin_num=[8], impl="reference")(x)


def test_separate_fcs_is_per_part_matmul():
    fcs = SeparateFCs(3, 4, 5)
    x = torch.randn(2, 4, 3)
    expected = torch.stack([x[:, :, p] @ fcs.fc_bin[p] for p in range(3)], -1)
    torch.testing.assert_close(fcs(x), expected)


def test_triplet_module_signature():
    loss, info = TripletLoss(margin=0.2)(torch.randn(6, 4, 2), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert loss.dim() == 0 and set(info) >= {"loss", "active_triplets", "mean_pos_dist", "mean_neg_dist"}


# --- regularisation baselines ---------------------------------------------------------

def test_dropblock_drops_blocks_at_about_the_rate():
    torch.manual_seed(0)
    layer = DropBlock(drop_prob=0.2, block_size=3).train()
    x = torch.ones(8, 16, 2, 32, 32)
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    assert 0.1 < dropped < 0.3
    assert torch.equal(out[:, :, 0], out[:, :, 1])  # same blocks in every frame
    assert out.sum().item() == pytest.approx(x.sum().item(), rel=1e-4)  # rescaled
    assert torch.equal(layer.eval()(x), x)


def test_scaling_dropblock_scales_instead_of_dropping():
    torch.manual_seed(0)
    out = ScalingDropBlock(drop_prob=0.2, block_size=3).train()(torch.ones(4, 4, 16, 16))
    values = set(out.unique().tolist())
    assert len(values) == 2 and 1.0 in values and min(values) >= 0.0


def test_random_erasing_same_rectangle_in_every_frame():
    torch.manual_seed(0)
    x = torch.ones(16, 5, 64, 44)
    out = RandomErasing(p=1.0).train()(x)
    assert torch.equal(out, out[:, :1].expand_as(out))
    erased = (out[:, 0] == 0).flatten(1).sum(1)
    assert (erased > 0).all() and (erased < 0.25 * 64 * 44).all()
    assert torch.equal(RandomErasing().eval()(x), x)


# --- dispatch -------------------------------------------------------------------------

def test_resolve_impl():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, op="x", has_torch=True, has_triton=True) == "torch"
    assert resolve_impl("auto", cpu, op="x", has_torch=False, has_triton=True) == "reference"
    assert resolve_impl("torch", cpu, op="x", has_torch=False, has_triton=False) == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", cpu, op="x", has_torch=True, has_triton=True)
    with pytest.raises(ValueError, match="no Triton implementation"):
        resolve_impl("triton", cpu, op="x", has_torch=True, has_triton=False)


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.device("cpu"), op="x", has_torch=True, has_triton=True)
