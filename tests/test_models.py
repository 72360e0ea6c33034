"""Model configs: shapes, parameter counts, train/eval behaviour of the masked branches."""
import pytest
import torch

from fastgait.models import GaitGL, GaitMask, ReverseMaskNet, build_model

K3 = 27  # weights of one 3x3x3 kernel per (c_in, c_out) pair


def _convs(*pairs, branches=1):
    return branches * K3 * sum(c_in * c_out for c_in, c_out in pairs)


def _stem(c):
    return K3 * c + 3 * c * c  # conv 1->c (3x3x3) + the (3,1,1) temporal conv c->c


CASIA_STAGES = ((32, 64), (64, 128), (128, 128))
# (constructor, kwargs, parts, embed_dim, parameter count from the architecture of blocks.md);
# every count ends in + 1: the learnable GeM exponent.
CONFIGS = [
    # GaitGL CASIA-B with its BN + CE head for 74 classes: about 3.1 M (blocks.md §4).
    (GaitGL, dict(preset="casia-b", num_classes=74), 64, 128,
     _stem(32) + _convs(*CASIA_STAGES, branches=2) + 64 * 128 * 128 + 2 * 128 + 64 * 128 * 74 + 1),
    # GaitGL OU-MVLP with its head for 5153 classes (OpenGait's GaitGL always has it)
    (GaitGL, dict(preset="oumvlp"), 64, 256,
     K3 * 32 + K3 * 32 * 32 + 3 * 32 * 32
     + _convs((32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), branches=2) + 64 * 256 * 256 + 1
     + 2 * 256 + 64 * 256 * 5153),
    (GaitGL, dict(preset="casia-b", num_classes=0), 64, 128,
     _stem(32) + _convs(*CASIA_STAGES, branches=2) + 64 * 128 * 128 + 1),
    (GaitMask, dict(preset="casia-b"), 64, 128, _stem(32) + _convs(*CASIA_STAGES, branches=2) + 64 * 128 * 128 + 1),
    (GaitMask, dict(preset="oumvlp"), 64, 256,
     K3 * 64 + K3 * 64 * 64 + 3 * 64 * 64
     + _convs((64, 128), (128, 128), (128, 196), (196, 196), (196, 256), (256, 256), branches=2) + 64 * 256 * 256 + 1),
    (GaitMask, dict(preset="small"), 64, 64, _stem(16) + _convs((16, 32), (32, 64), (64, 64), branches=2) + 64 * 64 * 64 + 1),
    (ReverseMaskNet, dict(block="conv"), 32, 128, _stem(32) + _convs(*CASIA_STAGES) + 32 * 128 * 128 + 1),
    (ReverseMaskNet, dict(block="gl"), 64, 128, _stem(32) + _convs(*CASIA_STAGES, branches=2) + 64 * 128 * 128 + 1),
    (ReverseMaskNet, dict(block="rmb_dropping"), 32, 128, _stem(32) + _convs(*CASIA_STAGES) + 32 * 128 * 128 + 1),
    (ReverseMaskNet, dict(block="rmb_scaling"), 32, 128, _stem(32) + _convs(*CASIA_STAGES) + 32 * 128 * 128 + 1),
    (ReverseMaskNet, dict(block="inception"), 96, 128, _stem(32) + _convs(*CASIA_STAGES, branches=3) + 96 * 128 * 128 + 1),
    (ReverseMaskNet, dict(preset="oumvlp", block="inception"), 96, 256,
     _stem(64) + _convs((64, 128), (128, 256), (256, 256), branches=3) + 96 * 256 * 256 + 1),
]


def test_gaitgl_casia_b_is_about_3_1_million():
    model = GaitGL("casia-b", num_classes=74)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 3.1) < 0.05


@pytest.mark.parametrize("cls,kwargs,parts,embed,params", CONFIGS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_parameter_count_and_parts(cls, kwargs, parts, embed, params):
    model = cls(**kwargs)
    assert model.parts == parts
    assert model.fcs.fc_bin.shape[::2] == (parts, embed)
    assert sum(p.numel() for p in model.parameters()) == params


# Forward shapes on a short clip, with the smallest presets of each model (the full-size shapes
# differ only in channel counts, covered by the parameter checks above).
@pytest.mark.parametrize("cls,kwargs", [
    (GaitMask, dict(preset="small")),
    (GaitMask, dict(preset="small", branches="global")),
    (GaitMask, dict(preset="small", branches="local")),
    (ReverseMaskNet, dict(block="inception", channels=(4, 8, 8))),
    (ReverseMaskNet, dict(block="rmb_scaling", channels=(4, 8, 8), region="band")),
    (GaitGL, dict(preset="casia-b", stem=[{"in": 1, "out": 4}, {"in": 4, "out": 4, "kernel": (3, 1, 1), "stride": (3, 1, 1)}],
                  blocks=[{"type": "gl", "in": 4, "out": 8, "halving": 3}, {"type": "maxpool"},
                          {"type": "gl", "in": 8, "out": 8, "halving": 3, "fm_sign": True}])),
])
@pytest.mark.parametrize("training", [True, False])
def test_forward_shapes(cls, kwargs, training):
    torch.manual_seed(0)
    model = cls(num_classes=5, embed_dim=16, **kwargs).train(training)
    sils = torch.rand(4, 7, 64, 44)
    embeddings, logits = model(sils)
    assert embeddings.shape == (4, 16, model.parts)
    assert logits.shape == (4, 5, model.parts)
    assert torch.isfinite(embeddings).all()


def test_table5_branches_change_parts():
    assert GaitMask("small").parts == 64  # MLA-B doubles the 32 rows
    assert GaitMask("small", branches="global").parts == 32
    assert GaitMask("small", branches="local").parts == 32


@pytest.mark.parametrize("num_mla", [0, 1, 2, 3])
def test_table6_num_mla(num_mla):
    model = GaitMask("small", num_mla=num_mla)
    kinds = [type(b).__name__ for b in model.blocks if type(b).__name__ != "MaxPoolHW"]
    assert kinds.count("MLA") == num_mla
    assert kinds[len(kinds) - num_mla:] == ["MLA"] * num_mla  # deepest first
    assert model.parts == (64 if num_mla >= 1 else 32)
    with pytest.raises(ValueError, match="num_mla"):
        GaitMask("small", num_mla=4)


def test_short_sequences_are_repeated():
    model = GaitMask("small").eval()
    for frames in (1, 2, 3):
        assert model(torch.rand(1, frames, 64, 44)).shape == (1, 64, 64)


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match=r"silhouettes \[n, t, h, w\]"):
        GaitMask("small")(torch.rand(2, 3, 5, 64, 44))


def test_build_model_from_config():
    model = build_model({"name": "ReverseMaskNet", "preset": "casia-b", "block": "rmb_dropping"})
    assert isinstance(model, ReverseMaskNet)
    with pytest.raises(ValueError, match="model name"):
        build_model({"name": "GaitPart"})
    with pytest.raises(ValueError, match="preset"):
        build_model({"name": "GaitMask", "preset": "grew"})


def _small_gaitmask(**kwargs):
    torch.manual_seed(1)
    return GaitMask("small", impl="reference", **kwargs)


def test_eval_is_deterministic_and_unmasked():
    """In evaluation the output is repeatable and equals the unmasked path (drop_ratio 0 in training,
    BN-free model, so train and eval differ only by the masks)."""
    masked = _small_gaitmask().eval()
    unmasked = _small_gaitmask(drop_ratio=0.0).train()
    unmasked.load_state_dict(masked.state_dict())
    sils = torch.rand(3, 9, 64, 44)
    with torch.no_grad():
        first, second = masked(sils), masked(sils)
        reference = unmasked(sils)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-6)


def test_training_pair_is_not_a_no_op():
    model = _small_gaitmask()
    sils = torch.rand(3, 9, 64, 44)
    with torch.no_grad():
        trained = model.train()(sils)
        evaluated = model.eval()(sils)
    assert (trained - evaluated).abs().max() > 1e-4


def test_seeded_training_forward_is_repeatable():
    model = _small_gaitmask().train()
    sils = torch.rand(3, 9, 64, 44)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model(sils))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    with torch.no_grad():
        assert not torch.equal(outs[0], model(sils))


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_model_impls_agree(impl):
    """The whole model gives the same embeddings and gradients through either PyTorch path."""
    reference = _small_gaitmask()
    fast = GaitMask("small", impl=impl)
    fast.load_state_dict(reference.state_dict())
    sils = torch.rand(2, 6, 64, 44)
    outs = []
    for model in (reference, fast):
        torch.manual_seed(7)
        out = model.train()(sils)
        out.square().sum().backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for g_ref, g_fast in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g_ref, g_fast, rtol=1e-3, atol=1e-4)


def test_gaitmask_trains_through_the_triton_ops():
    """One training step of a narrow GaitMask with every fused op on Triton (the interpreter here)
    gives the reference model's loss and gradients."""
    from fastgait.nn import TripletLoss

    stem = [{"in": 1, "out": 2}, {"in": 2, "out": 2, "kernel": (3, 1, 1), "stride": (3, 1, 1)}]
    layout = [(2, 4, "add"), "maxpool", (4, 4, "concat")]
    from fastgait.models.gaitmask import gaitmask_blocks

    results = []
    for impl in ("reference", "triton"):
        torch.manual_seed(3)
        model = GaitMask("small", stem=stem, blocks=gaitmask_blocks(layout), embed_dim=8, input_height=12,
                         impl=impl).train()
        sils = torch.rand(4, 6, 12, 8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(11)  # the same band draws for both
        loss, info = TripletLoss(0.2, impl=impl)(model(sils), torch.tensor([0, 0, 1, 1]))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (tri_loss, tri_grads) = results
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-4, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


# --- GaitSet, GaitBase and the 2-D ReverseMask blocks -----------------------------------------------

from fastgait.models import GaitBase, GaitSet  # noqa: E402
from fastgait.nn.rmb2d import (InceptionRMB2d, RMFE2d, inception_rmb2d_reference,  # noqa: E402
                               inception_rmb2d_torch, rmfe2d_reference, rmfe2d_torch)


def gaitset_params(c=(1, 32, 64, 128), bins=(16, 8, 4, 2, 1), out=256, rmb_blocks=()):
    """GaitSet by hand: set block i = conv k_i (c_{i-1} -> c_i) + conv 3x3 (c_i -> c_i); the global
    blocks 2, 3 repeat set blocks 2, 3; HPP on both branches -> 2 * sum(bins) parts x c3 -> out.
    An Inception RMB replacing a block's 3x3 conv holds 3 such weights."""
    set_blocks = [25 * c[0] * c[1], 9 * c[1] * c[2], 9 * c[2] * c[3]]
    second = [9 * c[1] ** 2, 9 * c[2] ** 2, 9 * c[3] ** 2]
    total = sum(set_blocks) + sum(s * (3 if i + 1 in rmb_blocks else 1) for i, s in enumerate(second))
    total += set_blocks[1] + second[1] + set_blocks[2] + second[2]  # gl_block2, gl_block3
    return total + 2 * sum(bins) * c[3] * out


def gaitbase_params(ch=(64, 128, 256, 512), bins=16, out=256, classes=74, rmb_layers=()):
    """GaitBase by hand: conv1 3x3 (1 -> c0) + BN; per layer one basic block: conv 3x3 (in -> c),
    BN, conv 3x3 (c -> c) (x3 with an RMB), BN, and a 1x1 conv + BN shortcut when the shape changes;
    SeparateFCs bins x c3 x out; BNNeck: BN over out * bins, bins x out x classes. BN: 2 per channel."""
    total = 9 * ch[0] + 2 * ch[0]
    c_in = ch[0]
    for i, (c, stride) in enumerate(zip(ch, (1, 2, 2, 1))):
        total += 9 * c_in * c + 9 * c * c * (3 if i + 1 in rmb_layers else 1) + 4 * c
        if stride != 1 or c_in != c:
            total += c_in * c + 2 * c
        c_in = c
    return total + bins * ch[3] * out + 2 * out * bins + bins * out * classes


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,kwargs,expected,parts", [
    ("casia-b", {}, gaitset_params(), 62),
    ("casia-b", {"rmb": True}, gaitset_params(rmb_blocks=(1, 2, 3)), 62),
    ("casia-b", {"rmb": {"blocks": [3]}}, gaitset_params(rmb_blocks=(3,)), 62),
    ("tiny", {}, gaitset_params((1, 8, 16, 32), (8, 4, 2, 1), 64), 30),
])
def test_gaitset_parameter_count(preset, kwargs, expected, parts):
    model = GaitSet(preset, **kwargs)
    assert _count(model) == expected and model.parts == parts
    if preset == "casia-b" and not kwargs:
        assert expected == 2_594_592  # OpenGait's GaitSet on CASIA-B: about 2.59 M


@pytest.mark.parametrize("preset,kwargs,expected", [
    ("casia-b", {}, gaitbase_params()),
    ("casia-b", {"rmb": True}, gaitbase_params(rmb_layers=(1, 2, 3, 4))),
    ("casia-b", {"num_classes": 10, "rmb": {"layers": [2, 4]}}, gaitbase_params(classes=10, rmb_layers=(2, 4))),
    ("tiny", {}, gaitbase_params((8, 16, 32, 64), 8, 64)),
])
def test_gaitbase_parameter_count(preset, kwargs, expected):
    assert _count(GaitBase(preset, **kwargs)) == expected


@pytest.mark.parametrize("cls,kwargs", [(GaitSet, {}), (GaitSet, {"rmb": True}), (GaitBase, {}),
                                        (GaitBase, {"rmb": True})])
@pytest.mark.parametrize("training", [True, False])
def test_set_model_shapes(cls, kwargs, training):
    torch.manual_seed(0)
    model = cls("tiny", **kwargs).train(training)
    out = model(torch.rand(3, 5, 64, 44))
    embeddings = out[0] if isinstance(out, tuple) else out
    assert embeddings.shape == (3, 64, model.parts) and torch.isfinite(embeddings).all()
    if isinstance(out, tuple):
        assert out[1].shape == (3, 74, model.parts)
    assert model(torch.rand(2, 1, 5, 64, 44)) is not None  # [n, 1, t, h, w] too


def _scales(h, w, variant, gen):
    keep = (torch.rand(h, w, generator=gen) < 0.5).float()
    alpha, beta = (1.0, 0.0) if variant == "dropping" else torch.rand(2, generator=gen).tolist()
    return alpha * keep + beta * (1 - keep), (1 - alpha) * keep + (1 - beta) * (1 - keep)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["dropping", "scaling"])
@pytest.mark.parametrize("slope", [0.01, 0.0])
def test_rmfe2d_torch_matches_reference(seed, variant, slope):
    """Value and every gradient (input, weight), odd sizes, non-contiguous input."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 3, 13, 9, generator=gen).transpose(2, 3)  # [n, c, 9, 13], non-contiguous
    weight = torch.randn(7, 3, 3, 3, generator=gen)
    scales = _scales(9, 13, variant, gen)
    grad_out = torch.randn(5, 7, 9, 13, generator=gen)
    results = []
    for fn in (rmfe2d_reference, rmfe2d_torch):
        x, w = base.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = fn(x, w, scales, slope)
        y.backward(grad_out)
        results.append((y.detach(), x.grad, w.grad))
    for name, a, b in zip(("value", "d_input", "d_weight"), results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # the pair is not a plain convolution (the activation sits in each branch)
    plain = rmfe2d_reference(base, weight, None, slope)
    assert (results[0][0] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fuse", ["add", "concat"])
def test_inception_rmb2d_torch_matches_reference(seed, fuse):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 4, 11, 7, generator=gen)
    weights = [torch.randn(5, 4, 3, 3, generator=gen) for _ in range(3)]
    s_d, s_s = _scales(11, 7, "dropping", gen), _scales(11, 7, "scaling", gen)
    rows = 33 if fuse == "concat" else 11
    grad_out = torch.randn(3, 5, rows, 7, generator=gen)
    results = []
    for fn in (inception_rmb2d_reference, inception_rmb2d_torch):
        x = base.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in weights]
        y = fn(x, *ws, s_d, s_s, fuse)
        y.backward(grad_out)
        results.append([y.detach(), x.grad] + [w.grad for w in ws])
    names = ("value", "d_input", "d_global", "d_dropping", "d_scaling")
    for name, a, b in zip(names, results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_inception_rmb2d_module_paths_agree_and_eval_is_plain():
    torch.manual_seed(0)
    ref = InceptionRMB2d(4, 6, impl="reference")
    fast = InceptionRMB2d(4, 6, impl="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 6)
    outs = []
    for module in (ref, fast):
        torch.manual_seed(9)  # same mask and scale draws
        outs.append(module.train()(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        evaluated = ref.eval()(x)
        lrelu = torch.nn.functional.leaky_relu
        conv = torch.nn.functional.conv2d
        plain = sum(lrelu(conv(x, w, padding=1), 0.01)
                    for w in (ref.global_conv.weight, ref.dropping.conv.weight, ref.scaling.conv.weight))
    torch.testing.assert_close(evaluated, plain)
    assert (outs[0] - evaluated).abs().max() > 1e-3
    rmfe = RMFE2d(4, 6, reg_prob=0.0).train()
    torch.testing.assert_close(rmfe(x), lrelu(conv(x, rmfe.conv.weight, padding=1), 0.01))
