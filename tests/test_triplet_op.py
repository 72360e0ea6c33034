"""``triplet_loss`` and ``part_distance`` with ``impl="triton"`` (the interpreter on CPU) against the references.

Most inputs lie on a 1/16 grid (``grid_embeddings``): every squared norm and inner product is
then exact in fp32 whatever the summation order, so the reference and the kernels see the same
distances bit for bit, identical embeddings really are at distance 0, and values and gradients
can be compared tightly even where the loss is ill-conditioned (D = 0, huge margins). With
plain ``randn`` inputs the reference's self-distances ``D[i, i]`` are rounding noise (up to
~1e-2 at c = 128) where the kernel's are exactly 0; ``test_randn_embeddings`` uses the
training margin, where those self-pairs are never active.
"""
import pytest
import torch

import fastgait.ops.triplet as triplet_ops
from fastgait.ops import part_distance, triplet_loss
from fastgait.ops.reference import part_distance_reference, triplet_loss_reference
from fastgait.ops.triplet import part_distance_fwd, triplet_loss_bwd, triplet_loss_fwd
from fastgait.testing import assert_close, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")

INFO_KEYS = ("loss", "active_triplets", "mean_pos_dist", "mean_neg_dist")


def grid_embeddings(n, c, parts, seed, layout="pnc", dtype=torch.float32, device="cpu"):
    """``[n, c, p]`` values on a 1/16 grid in [-4, 4]; ``layout="pnc"`` is SeparateFCs' output
    (a permuted ``[p, n, c]`` tensor), ``"ncp"`` a contiguous one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (parts, n, c) if layout == "pnc" else (n, c, parts)
    values = (torch.randn(shape, generator=gen, device=device).clamp(-3.9, 3.9) * 16).round() / 16
    values = values.to(dtype)
    return values.permute(1, 2, 0) if layout == "pnc" else values


def loss_and_grad(fn, embeddings, labels, margin):
    embeddings = embeddings.detach().requires_grad_()
    loss, info = fn(embeddings, labels, margin)
    (grad,) = torch.autograd.grad(loss, embeddings)
    return loss, info, grad


def triton_triplet(embeddings, labels, margin):
    return triplet_loss(embeddings, labels, margin, impl="triton")


def check_against_reference(embeddings, labels, margin, **tolerance):
    loss, info, grad = loss_and_grad(triton_triplet, embeddings, labels, margin)
    ref_loss, ref_info, ref_grad = loss_and_grad(triplet_loss_reference, embeddings, labels, margin)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, name="loss", **tolerance)
    for key in INFO_KEYS:
        assert_close(info[key], ref_info[key], name=key, **tolerance)
    assert_close(grad, ref_grad.to(grad.dtype), name="grad", **tolerance)
    assert grad.stride() == embeddings.stride(), "the gradient must keep the embeddings' layout"
    return loss, info, grad


def shuffled_pk(identities, per_identity, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(identities).repeat_interleave(per_identity) * 7 + 3  # not 0..P-1
    return labels[torch.randperm(len(labels), generator=gen)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsorted_pk_batch(seed):
    labels = shuffled_pk(5, 4, seed)
    check_against_reference(grid_embeddings(20, 24, 3, seed), labels, 0.2)


@pytest.mark.parametrize("seed", [0, 1])
def test_uneven_groups_more_than_one_block(seed):
    # 37 samples (three anchor blocks, a partial one), groups of 1 to 9, int32 labels.
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (37,), generator=gen, dtype=torch.int32)
    check_against_reference(grid_embeddings(37, 20, 2, seed, layout="ncp"), labels, 0.5)


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(9, dtype=torch.long), torch.arange(9), torch.tensor([4, 1, 4, 0, 2, 3, 2, 1, 0])],
    ids=["all_same", "all_different_k1", "k2_unsorted"],
)
def test_label_edge_cases(labels):
    loss, info, grad = check_against_reference(grid_embeddings(9, 16, 2, 3), labels, 0.2)
    if len(labels.unique()) == 1:  # no negatives: no triplet, loss 0 (not NaN), no gradient
        assert loss.item() == 0.0 and info["active_triplets"].item() == 0.0
        assert (grad == 0).all()


@pytest.mark.parametrize(
    "labels, channels, parts",
    [([0], 1, 1), ([0, 1], 1, 1), ([5, 5], 3, 1), ([1, 0, 1], 17, 2)],
    ids=["one_sample", "two_identities", "one_identity", "c17"],
)
def test_degenerate_sizes(labels, channels, parts):
    embeddings = grid_embeddings(len(labels), channels, parts, 16, layout="ncp")
    check_against_reference(embeddings, torch.tensor(labels), 0.5)


def test_margin_so_large_every_triplet_is_active():
    labels = shuffled_pk(4, 3, 4)
    _, info, _ = check_against_reference(grid_embeddings(12, 16, 2, 4), labels, 1000.0)
    assert info["active_triplets"].item() == 12 * 3 * 9


def test_margin_zero():
    labels = shuffled_pk(4, 3, 5)
    check_against_reference(grid_embeddings(12, 16, 2, 5), labels, 0.0)


def test_tiny_margin_none_active():
    # Identities far apart: with margin 0 no positive is farther than a negative.
    labels = torch.arange(4).repeat_interleave(3)
    centres = torch.arange(4.0).view(4, 1, 1).repeat_interleave(3, dim=0) * 8
    spread = (grid_embeddings(12, 8, 2, 6, layout="ncp") * 2).round() / 8  # |.| <= 1, a 1/8 grid: still exact
    embeddings = centres + spread
    loss, info, grad = check_against_reference(embeddings, labels, 0.0)
    assert info["active_triplets"].item() == 0 and loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("margin", [0.2, 1000.0])
def test_identical_embeddings_have_finite_reference_gradients(margin):
    # Every pair at distance 0: the gradient of D at 0 is 0, as in the reference.
    embeddings = grid_embeddings(1, 16, 3, 7, layout="ncp").expand(8, 16, 3).contiguous()
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    check_against_reference(embeddings, labels, margin)


def test_duplicated_samples_mixed_with_distinct_ones():
    embeddings = grid_embeddings(10, 16, 2, 8, layout="ncp")
    embeddings[5:] = embeddings[:5]  # sample i + 5 duplicates sample i (distance 0 off the diagonal)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 2, 1])
    check_against_reference(embeddings, labels, 3.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_randn_embeddings(seed):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(16, 32, 4, generator=gen)
    check_against_reference(embeddings, shuffled_pk(4, 4, seed), 0.2)


def test_bf16_embeddings_compute_in_fp32():
    embeddings = grid_embeddings(12, 16, 2, 15, dtype=torch.bfloat16)  # the 1/16 grid is exact in bf16
    loss, info, grad = loss_and_grad(triton_triplet, embeddings, shuffled_pk(4, 3, 15), 0.2)
    ref_loss, ref_info, ref_grad = loss_and_grad(triplet_loss_reference, embeddings, shuffled_pk(4, 3, 15), 0.2)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, name="loss")
    assert_close(grad.float(), ref_grad.float(), name="grad", dtype=torch.bfloat16)


def test_poisoned_outputs_are_all_written():
    with poisoned_outputs():
        check_against_reference(grid_embeddings(19, 20, 2, 9), shuffled_pk(5, 4, 9)[:19], 0.3)


def test_opcheck():
    embeddings = grid_embeddings(10, 16, 2, 10).requires_grad_()
    labels = shuffled_pk(5, 2, 10)
    torch.library.opcheck(triplet_loss_fwd, (embeddings, labels, 0.2, True))
    torch.library.opcheck(triplet_loss_fwd, (embeddings.detach(), labels, 0.2, False))
    _, _, ratio, part_scale = triplet_loss_fwd(embeddings.detach(), labels, 0.2, True)
    bwd_args = (torch.tensor(1.0), embeddings.detach(), ratio, part_scale)
    torch.library.opcheck(triplet_loss_bwd, bwd_args)


def test_compile_fullgraph_forward_and_backward():
    def loss_fn(embeddings, labels):
        loss, info = triplet_loss(embeddings, labels, 0.2, impl="triton")
        return loss * 3.0, info["active_triplets"]

    compiled = torch.compile(loss_fn, fullgraph=True)
    embeddings = grid_embeddings(12, 16, 2, 11)
    labels = shuffled_pk(4, 3, 11)
    got = loss_and_grad(lambda e, y, _: compiled(e, y), embeddings, labels, None)
    ref_loss, ref_info, ref_grad = loss_and_grad(triplet_loss_reference, embeddings, labels, 0.2)
    assert_close(got[0], ref_loss * 3.0, name="loss")
    assert_close(got[1], ref_info["active_triplets"], name="active_triplets")
    assert_close(got[2], ref_grad * 3.0, name="grad")


def test_auto_uses_the_reference_on_cpu():
    embeddings, labels = grid_embeddings(6, 8, 2, 12), shuffled_pk(3, 2, 12)
    assert torch.equal(triplet_loss(embeddings, labels)[0], triplet_loss_reference(embeddings, labels)[0])


@pytest.mark.parametrize(
    "embeddings, labels, margin, error",
    [
        (torch.randn(4, 8), torch.arange(4), 0.2, "3-D"),
        (torch.randn(4, 8, 2), torch.arange(5), 0.2, "5 labels for 4 embeddings"),
        (torch.randn(4, 8, 2), torch.arange(4).float(), 0.2, "dtype"),
        (torch.randn(4, 8, 2), torch.arange(4).view(2, 2), 0.2, "1-D"),
        (torch.randn(4, 8, 2), torch.arange(4), -0.1, "triplet_loss: margin must be a finite number >= 0"),
        (torch.randn(4, 8, 2), torch.arange(4), float("nan"), "triplet_loss: margin must be a finite number >= 0"),
        (torch.randn(4, 8, 2), torch.arange(4), float("inf"), "triplet_loss: margin must be a finite number >= 0"),
        (torch.randn(16385, 2, 1), torch.arange(16385), 0.2, "at most 16384 samples"),
        (torch.randn(0, 8, 2), torch.arange(0), 0.2, "empty"),
        (torch.ones(4, 8, 2, dtype=torch.int64), torch.arange(4), 0.2, "dtype"),
    ],
)
def test_triplet_bad_inputs_raise_clear_errors(embeddings, labels, margin, error):
    with pytest.raises((ValueError, TypeError), match=error):
        triplet_loss(embeddings, labels, margin, impl="triton")


# ----------------------------------------------------------------------------------------
# part_distance
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euc", "cos"])
@pytest.mark.parametrize("seed", [0, 1])
def test_part_distance_matches_reference(metric, seed):
    # 70 probes: two row blocks of 64; the gallery is a strided (permuted) tensor.
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(70, 20, 3, generator=gen)
    gallery = torch.randn(3, 23, 20, generator=gen).permute(1, 2, 0)
    got = part_distance(probe, gallery, metric, impl="triton")
    assert got.dtype == torch.float32 and got.shape == (70, 23)
    assert_close(got, part_distance_reference(probe, gallery, metric), name=metric)


def test_part_distance_zero_and_shared_vectors_and_poison():
    probe = grid_embeddings(5, 16, 2, 13, layout="ncp")
    probe[1] = 0.0  # F.normalize floors the norm at 1e-12: cosine distance 1
    gallery = torch.cat([probe[:3], grid_embeddings(4, 16, 2, 14, layout="ncp")])  # three at distance 0
    with poisoned_outputs():
        for metric in ("euc", "cos"):
            got = part_distance(probe, gallery, metric, impl="triton")
            assert_close(got, part_distance_reference(probe, gallery, metric), name=metric)


def test_part_distance_opcheck():
    probe, gallery = torch.randn(5, 16, 2), torch.randn(6, 16, 2)
    for cosine in (False, True):
        torch.library.opcheck(part_distance_fwd, (probe, gallery, cosine))


@pytest.mark.parametrize(
    "probe, gallery, metric, error",
    [
        (torch.randn(4, 8, 2), torch.randn(5, 8, 3), "euc", "must share"),
        (torch.randn(4, 8, 2), torch.randn(5, 8, 2), "l1", "metric must be one of"),
        (torch.randn(4, 8), torch.randn(5, 8), "euc", "3-D"),
    ],
)
def test_part_distance_bad_inputs(probe, gallery, metric, error):
    with pytest.raises(ValueError, match=error):
        part_distance(probe, gallery, metric, impl="triton")


# ----------------------------------------------------------------------------------------
# GPU: bf16 at training shapes
# ----------------------------------------------------------------------------------------


@pytest.fixture
def fp32_matmul():
    """The reference's matmuls in full fp32 (another test may have allowed TF32)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.parametrize("identities, per_identity", [(8, 16), (32, 8), (32, 16)])
def test_bf16_at_training_shape_on_gpu(identities, per_identity, fp32_matmul):
    n = identities * per_identity
    embeddings = grid_embeddings(n, 128, 64, 0, dtype=torch.bfloat16, device="cuda")  # exact in bf16
    labels = shuffled_pk(identities, per_identity, 0).cuda()
    loss, info, grad = loss_and_grad(triton_triplet, embeddings, labels, 0.2)
    ref_loss, ref_info, ref_grad = loss_and_grad(triplet_loss_reference, embeddings, labels, 0.2)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, name="loss", rtol=1e-4, atol=1e-5)
    for key in INFO_KEYS:
        assert_close(info[key], ref_info[key], name=key, rtol=1e-4, atol=1e-5)
    assert_close(grad.float(), ref_grad.float(), name="grad", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-tensor-cores", "fp32-ieee"])
@pytest.mark.parametrize("metric", ["euc", "cos"])
def test_part_distance_bf16_on_gpu(metric, dtype, fp32_matmul):
    # fp32 inputs: IEEE fp32 dots (no TF32), so the evaluation distances match the fp32 reference.
    gen = torch.Generator(device="cuda").manual_seed(0)
    probe = torch.randn(1000, 128, 64, device="cuda", generator=gen).to(dtype)
    gallery = torch.randn(64, 1200, 128, device="cuda", generator=gen).to(dtype).permute(1, 2, 0)
    got = part_distance(probe, gallery, metric, impl="triton")
    assert_close(got, part_distance_reference(probe, gallery, metric), name=metric, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Batch shapes like the trainer's (scaled down), label types and order, no-grad
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("identities, per_identity, seed", [(4, 16, 0), (16, 4, 1), (3, 16, 2), (9, 5, 3)])
def test_pk_batches_any_label_order(identities, per_identity, seed):
    # K = 16: one label per block of 16 anchors; K = 4 or 5: several labels per block, blocks that
    # straddle identities; labels shuffled, fresh random (randn) embeddings in the SeparateFCs layout.
    labels = shuffled_pk(identities, per_identity, seed)
    n = len(labels)
    gen = torch.Generator().manual_seed(seed)
    embeddings = (torch.randn(3, n, 24, generator=gen) * 0.5).permute(1, 2, 0)
    with poisoned_outputs():
        check_against_reference(embeddings, labels, 0.2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_label_dtypes_and_strided_labels(dtype):
    labels = shuffled_pk(4, 3, 17)
    wide = torch.stack([labels, labels * 0 + 99], dim=1).reshape(-1)[::2]  # a strided view
    assert not wide.is_contiguous()
    check_against_reference(grid_embeddings(12, 16, 2, 17), wide.to(dtype), 0.3)


def test_no_grad_saves_no_ratio():
    embeddings, labels = grid_embeddings(10, 16, 2, 18), shuffled_pk(5, 2, 18)
    with torch.no_grad():
        loss, info = triplet_loss(embeddings.requires_grad_(), labels, 0.2, impl="triton")
    ref_loss, ref_info = triplet_loss_reference(embeddings.detach(), labels, 0.2)
    assert_close(loss, ref_loss, name="loss")
    for key in INFO_KEYS:
        assert_close(info[key], ref_info[key], name=key)
    _, _, ratio, _ = triplet_loss_fwd(embeddings.detach(), labels, 0.2, False)
    assert ratio.numel() == 0


# ----------------------------------------------------------------------------------------
# Non-finite embeddings: the loss must be NaN, in every path
# ----------------------------------------------------------------------------------------


def nan_results(fn, embeddings, labels, margin):
    embeddings = embeddings.detach().requires_grad_()
    loss, info = fn(embeddings, labels, margin)
    (grad,) = torch.autograd.grad(loss, embeddings)
    return loss, info, grad


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_nonfinite_embedding_gives_a_nan_loss(impl, bad):
    embeddings = grid_embeddings(12, 16, 2, 19)
    embeddings[5, 3, 1] = bad  # one value of one sample in part 1
    labels = shuffled_pk(4, 3, 19)
    loss, info, grad = nan_results(lambda e, y, m: triplet_loss(e, y, m, impl=impl), embeddings, labels, 0.2)
    assert torch.isnan(loss) and torch.isnan(info["loss"]), f"{impl}: loss {loss.item()}"
    assert not torch.isfinite(grad).all(), f"{impl}: the gradient must not be all finite"


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_nan_distance_with_no_active_triplet_is_nan(impl):
    # Identities far apart and margin 0: no triplet is active, the loss would be 0; a NaN
    # embedding must still give NaN, not "no active triplet".
    labels = torch.arange(4).repeat_interleave(3)
    centres = torch.arange(4.0).view(4, 1, 1).repeat_interleave(3, dim=0) * 8
    embeddings = centres + (grid_embeddings(12, 8, 2, 6, layout="ncp") * 2).round() / 8
    clean, _ = triplet_loss(embeddings, labels, 0.0, impl=impl)
    assert clean.item() == 0.0
    embeddings[7, 0, 0] = float("nan")
    loss, info = triplet_loss(embeddings, labels, 0.0, impl=impl)
    assert torch.isnan(loss), f"{impl}: {loss.item()}"
    assert info["active_triplets"].item() == 0.0


def test_nan_outside_every_triplet_leaves_the_loss_finite():
    # One identity only: no negatives, no triplet uses any distance: loss 0 in both paths.
    embeddings = grid_embeddings(4, 8, 2, 20)
    embeddings[1, 0, 0] = float("nan")
    labels = torch.zeros(4, dtype=torch.long)
    for impl in ("triton", "reference"):
        loss, _ = triplet_loss(embeddings, labels, 0.2, impl=impl)
        assert loss.item() == 0.0, impl


@pytest.mark.parametrize("metric", ["euc", "cos"])
def test_part_distance_propagates_nan_and_inf(metric):
    gen = torch.Generator().manual_seed(21)
    probe = torch.randn(6, 20, 3, generator=gen)
    gallery = torch.randn(7, 20, 3, generator=gen)
    probe[2, 4, 1] = float("nan")
    gallery[3, 0, 2] = float("inf")
    got = part_distance(probe, gallery, metric, impl="triton")
    want = part_distance_reference(probe, gallery, metric)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), "non-finite positions differ"
    assert torch.isnan(got[2]).all() and not torch.isfinite(got[:, 3]).any()
    finite = torch.isfinite(want)
    assert_close(got[finite], want[finite], name=metric)


# ----------------------------------------------------------------------------------------
# Batches above SINGLE_TILE_BATCH (256): the ranking launch and the column-tiled rows kernel
# ----------------------------------------------------------------------------------------


def uneven_labels(counts, seed):
    """Shuffled labels with the given group sizes (labels not 0..P-1)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)) * 5 + 2, torch.tensor(counts))
    return labels[torch.randperm(len(labels), generator=gen)]


@pytest.mark.parametrize("seed, parts, layout", [(0, 2, "pnc"), (1, 1, "cnp")])
def test_above_the_single_tile_limit_value_and_every_gradient(seed, parts, layout):
    # 300 samples > SINGLE_TILE_BATCH: 19 anchor blocks (a partial one), 3 column tiles (a partial
    # one); 41 groups of 1 to 40 samples (a block inside the 40 takes two chunks of positives).
    # Fresh randn embeddings, non-contiguous: the SeparateFCs layout (a permuted [p, n, c]) or a
    # permuted [c, n, p] (channels strided: the launcher copies it); outputs poisoned: every
    # element of R, the sums and the gradient must be written.
    counts = [40, 3, 1, 7, 5, 11, 2, 13, 6, 9, 4, 8, 12, 5, 10, 7, 3, 9, 6, 14, 2, 8, 11, 5, 9, 6, 3, 10, 4, 6]
    counts += [5, 7] * 5 + [1]
    labels = uneven_labels(counts, seed)
    n = len(labels)
    assert n == 300 > triplet_ops.SINGLE_TILE_BATCH
    gen = torch.Generator().manual_seed(seed)
    if layout == "pnc":
        embeddings = torch.randn(parts, n, 8, generator=gen).permute(1, 2, 0)
    else:
        embeddings = torch.randn(8, n, parts, generator=gen).permute(1, 0, 2)
    assert not embeddings.is_contiguous()
    with poisoned_outputs():
        check_against_reference(embeddings, labels, 0.2)


@pytest.mark.parametrize(
    "labels",
    [torch.arange(257) * 3, torch.arange(257) // 2],
    ids=["all_distinct", "pairs_and_one"],
)
def test_above_the_single_tile_limit_odd_n_edge_labels(labels):
    # Odd n = 257: one anchor in the last block, one column in the last tile; all labels distinct
    # (only the anchor itself is a positive), or pairs and one single sample. (A single label at
    # odd n with several chunks of positives: test_tiled_label_edge_cases.)
    embeddings = grid_embeddings(257, 4, 1, 22, layout="ncp")
    check_against_reference(embeddings, labels, 0.5)


@pytest.fixture
def small_tiles(monkeypatch):
    """The column-tiled kernel at any n, with 16-wide tiles and chunks: several column tiles and
    several chunks of positives at sizes the interpreter runs fast."""
    monkeypatch.setattr(triplet_ops, "SINGLE_TILE_BATCH", 0)
    monkeypatch.setattr(
        triplet_ops, "_rows_tiled_config", lambda n, c: dict(BLOCK_A=16, BLOCK_T=16, BLOCK_P=16, BLOCK_K=16)
    )


@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(9, dtype=torch.long),
        torch.arange(9),
        torch.tensor([4, 1, 4, 0, 2, 3, 2, 1, 0]),
        torch.tensor([0]),
        torch.tensor([1, 0]),
        torch.tensor([3, 3, 3]),
        torch.full((33,), 7),
        torch.arange(33).flip(0),
    ],
    ids=["all_same", "all_different_k1", "k2_unsorted", "one_sample", "two_identities", "one_identity",
         "odd_n_one_label_3_chunks", "odd_n_all_different"],
)
def test_tiled_label_edge_cases(small_tiles, labels):
    n = len(labels)
    with poisoned_outputs():
        loss, info, grad = check_against_reference(grid_embeddings(n, 16, 2, 3, layout="ncp"), labels, 0.2)
    if len(labels.unique()) == 1:
        assert loss.item() == 0.0 and info["active_triplets"].item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_uneven_groups_several_tiles_and_chunks(small_tiles, seed):
    # 53 samples: 4 anchor blocks and 4 column tiles (partial last ones); with 3 labels a block's
    # positives span up to ~40 ranks: 2 or 3 chunks of 16 (the counts carried in R between them).
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3 if seed else 8, (53,), generator=gen, dtype=torch.int32)
    with poisoned_outputs():
        check_against_reference(grid_embeddings(53, 20, 2, seed), labels, 0.5)


def test_tiled_margins_every_triplet_active_and_none(small_tiles):
    labels = shuffled_pk(4, 5, 4)
    _, info, _ = check_against_reference(grid_embeddings(20, 16, 2, 4), labels, 1000.0)
    assert info["active_triplets"].item() == 20 * 5 * 15
    check_against_reference(grid_embeddings(20, 16, 2, 5), labels, 0.0)


def test_tiled_duplicates_and_identical_embeddings(small_tiles):
    embeddings = grid_embeddings(20, 16, 2, 8, layout="ncp")
    embeddings[10:] = embeddings[:10]  # pairs at distance 0 off the diagonal
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 2, 1] * 2)
    check_against_reference(embeddings, labels, 3.0)
    same = grid_embeddings(1, 16, 2, 7, layout="ncp").expand(18, 16, 2).contiguous()
    check_against_reference(same, torch.arange(18) % 4, 0.2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tiled_nonfinite_embedding_gives_a_nan_loss(small_tiles, bad):
    embeddings = grid_embeddings(40, 8, 2, 19)
    embeddings[25, 3, 1] = bad
    labels = shuffled_pk(4, 10, 19)
    loss, info, grad = nan_results(triton_triplet, embeddings, labels, 0.2)
    assert torch.isnan(loss) and torch.isnan(info["loss"])
    assert not torch.isfinite(grad).all()


def test_tiled_nan_distance_with_no_active_triplet_is_nan(small_tiles):
    labels = torch.arange(6).repeat_interleave(4)
    centres = torch.arange(6.0).view(6, 1, 1).repeat_interleave(4, dim=0) * 8
    embeddings = centres + (grid_embeddings(24, 8, 2, 6, layout="ncp") * 2).round() / 8
    clean, _ = triplet_loss(embeddings, labels, 0.0, impl="triton")
    assert clean.item() == 0.0
    embeddings[17, 0, 0] = float("nan")
    loss, info = triplet_loss(embeddings, labels, 0.0, impl="triton")
    assert torch.isnan(loss) and info["active_triplets"].item() == 0.0


def test_tiled_no_grad_forward(small_tiles):
    embeddings, labels = grid_embeddings(40, 16, 2, 18), shuffled_pk(5, 8, 18)
    with poisoned_outputs(), torch.no_grad():
        loss, info = triplet_loss(embeddings.requires_grad_(), labels, 0.2, impl="triton")
    ref_loss, ref_info = triplet_loss_reference(embeddings.detach(), labels, 0.2)
    assert_close(loss, ref_loss, name="loss")
    for key in INFO_KEYS:
        assert_close(info[key], ref_info[key], name=key)


def test_tiled_opcheck(small_tiles):
    embeddings = grid_embeddings(20, 16, 2, 10).requires_grad_()
    labels = shuffled_pk(5, 4, 10)
    torch.library.opcheck(triplet_loss_fwd, (embeddings, labels, 0.2, True))
    torch.library.opcheck(triplet_loss_fwd, (embeddings.detach(), labels, 0.2, False))


def test_tiled_matches_single_tile(small_tiles, monkeypatch):
    # The two rows kernels on the same batch: same loss, info and R (up to summation order).
    embeddings, labels = grid_embeddings(37, 16, 3, 23), shuffled_pk(5, 8, 23)[:37]
    tiled = triplet_loss_fwd(embeddings, labels, 0.3, True)
    monkeypatch.setattr(triplet_ops, "SINGLE_TILE_BATCH", 256)
    single = triplet_loss_fwd(embeddings, labels, 0.3, True)
    for got, want, name in zip(tiled, single, ("loss", "info", "ratio", "part_scale")):
        assert_close(got, want, name=name)
