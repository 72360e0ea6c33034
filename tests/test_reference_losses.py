"""The reference triplet loss against a brute-force loop over all (anchor, positive, negative)."""

import pytest
import torch

from fastgait.nn import TripletLoss
from fastgait.ops.reference import part_distance_reference, triplet_loss_reference
from fastgait.testing import brute_force_triplet_parts


def brute_force_triplet(embeddings, labels, margin):
    """Plain loops over parts and triplets (``fastgait.testing.brute_force_triplet_parts``): the loss
    averaged over parts and the mean count of active triplets."""
    loss_avg, active, _, _ = brute_force_triplet_parts(embeddings, labels, margin)
    return float(loss_avg.mean()), float(active.mean())


LABELINGS = {
    "pk_sorted": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "unsorted_uneven": [3, 1, 3, 0, 1, 3, 2, 0, 1, 1],
    "k_is_one": [0, 1, 2, 3, 4, 5],
    "all_same": [7] * 6,
    "all_different": list(range(8)),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("labeling", sorted(LABELINGS))
@pytest.mark.parametrize("margin", [0.2, 0.0, 50.0])
def test_triplet_reference_matches_brute_force(seed, labeling, margin):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(LABELINGS[labeling])
    embeddings = torch.randn(len(labels), 5, 3, generator=gen)
    loss, info = triplet_loss_reference(embeddings, labels, margin)
    expected_loss, expected_active = brute_force_triplet(embeddings, labels.tolist(), margin)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert info["active_triplets"].item() == pytest.approx(expected_active)


def test_no_triplet_gives_zero_loss_and_gradient():
    embeddings = torch.randn(5, 4, 2, requires_grad=True)
    loss, info = TripletLoss(0.2, impl="reference")(embeddings, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and info["active_triplets"].item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_identical_embeddings_have_finite_gradients():
    embeddings = torch.ones(6, 4, 2, requires_grad=True)
    loss, _ = triplet_loss_reference(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.2)  # every triplet active with D = 0: hinge = margin
    assert torch.isfinite(embeddings.grad).all()


def test_info_distances():
    # Two identities on a line: positives at distance 1, negatives at distance 10 or more.
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    embeddings = points.view(4, 1, 1)
    _, info = triplet_loss_reference(embeddings, torch.tensor([0, 0, 1, 1]), 0.2)
    assert info["mean_pos_dist"].item() == pytest.approx(1.0)
    assert info["mean_neg_dist"].item() == pytest.approx((10 + 11 + 9 + 10) / 4)
    assert info["active_triplets"].item() == 0.0


def test_part_distance_reference():
    gen = torch.Generator().manual_seed(3)
    probe, gallery = torch.randn(4, 6, 3, generator=gen), torch.randn(5, 6, 3, generator=gen)
    euc = part_distance_reference(probe, gallery, "euc")
    loop = torch.stack([torch.cdist(probe[:, :, p], gallery[:, :, p]) for p in range(3)]).mean(0)
    torch.testing.assert_close(euc, loop, rtol=1e-4, atol=1e-5)
    cos = part_distance_reference(probe, gallery, "cos")
    loop = torch.stack([
        1 - torch.nn.functional.cosine_similarity(probe[:, None, :, p], gallery[None, :, :, p], dim=-1)
        for p in range(3)
    ]).mean(0)
    torch.testing.assert_close(cos, loop, rtol=1e-4, atol=1e-5)
