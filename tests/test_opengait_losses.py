"""Loss compatibility with OpenGait: constructor arguments, return values, info keys, the loss
weight applied once (by the aggregator), and gather-and-scale under DDP (2 gloo processes)."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastgait.nn import CrossEntropyLoss, TripletLoss
from fastgait.nn import opengait as og
from fastgait.ops.reference import triplet_loss_reference
from fastgait.testing import brute_force_triplet_parts as brute_force_parts

# OpenGait's info keys (opengait/modeling/losses/triplet.py, ce.py)
OPENGAIT_TRIPLET_INFO = {"loss", "hard_loss", "loss_num", "mean_dist"}


LABELINGS = {
    "pk_sorted": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "pk_shuffled": [2, 0, 1, 1, 0, 2, 2, 1, 0],
    "unsorted_uneven": [3, 1, 3, 0, 1, 3, 2, 0, 1, 1],
    "all_same": [7] * 5,
    "all_different": list(range(6)),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("labeling", sorted(LABELINGS))
@pytest.mark.parametrize("margin", [0.2, 3.0])
def test_opengait_triplet_values_and_info(seed, labeling, margin):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(LABELINGS[labeling])
    embeddings = torch.randn(len(labels), 5, 3, generator=gen)
    loss, info = og.TripletLoss(margin)(embeddings, labels)
    expected = brute_force_parts(embeddings, labels.tolist(), margin)
    assert loss.shape == (3,) and set(info) == OPENGAIT_TRIPLET_INFO
    for name, value, want in zip(("loss", "loss_num", "hard_loss", "mean_dist"),
                                 (loss, info["loss_num"], info["hard_loss"], info["mean_dist"]), expected):
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(info["loss"], loss.detach())
    # Its mean over parts is fastgait's scalar loss.
    fused, _ = TripletLoss(margin, impl="reference")(embeddings, labels)
    torch.testing.assert_close(loss.mean(), fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opengait_triplet_gradient_per_part(seed):
    """Every part's gradient equals the reference loss of that part alone (odd sizes, non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 1, 2, 0, 0, 3])
    base = torch.randn(7, len(labels), 4, generator=gen).permute(1, 0, 2)  # [n, c=7, p=4], non-contiguous
    weights = torch.randn(4, generator=gen)
    x = base.clone().requires_grad_(True)
    loss, _ = og.TripletLoss(0.3)(x, labels)
    (loss * weights).sum().backward()
    y = base.contiguous().requires_grad_(True)
    ref = torch.stack([triplet_loss_reference(y[:, :, p : p + 1], labels, 0.3)[0] for p in range(4)])
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


def _aggregate(loss_fn, **kwargs):
    """OpenGait's LossAggregator step: ``loss.mean() * loss_term_weight``."""
    loss, info = loss_fn(**kwargs)
    return loss.mean() * loss_fn.loss_term_weight, info


@pytest.mark.parametrize("cls", [og.TripletLoss, TripletLoss])
def test_triplet_weight_is_applied_once(cls):
    embeddings, labels = torch.randn(8, 4, 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    unweighted, _ = _aggregate(cls(0.2, loss_term_weight=1.0), embeddings=embeddings, labels=labels)
    weighted, _ = _aggregate(cls(0.2, loss_term_weight=0.5), embeddings=embeddings, labels=labels)
    torch.testing.assert_close(weighted, 0.5 * unweighted)


def test_cross_entropy_matches_opengait_contract():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, 3, generator=gen), torch.tensor([0, 4, 2, 2, 1, 3])
    target = labels.view(-1, 1).expand(-1, 3)
    # defaults: scale 16, label smoothing on with eps 0.1
    loss, info = CrossEntropyLoss()(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(16 * logits, target, label_smoothing=0.1))
    assert set(info) == {"loss"}
    loss, info = CrossEntropyLoss(scale=1, label_smooth=False, log_accuracy=True)(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    assert set(info) == {"loss", "accuracy"}
    assert info["accuracy"] == (logits.argmax(1) == labels.view(-1, 1)).float().mean()
    loss, _ = CrossEntropyLoss(scale=2, label_smooth=True, eps=0.3)(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(2 * logits, target, label_smoothing=0.3))
    weighted, _ = _aggregate(CrossEntropyLoss(eps=0.1, loss_term_weight=0.5), logits=logits, labels=labels)
    torch.testing.assert_close(weighted, 0.5 * CrossEntropyLoss()(logits, labels)[0])
    with pytest.raises(TypeError, match="eps="):
        CrossEntropyLoss(label_smooth=0.1)


# --- gather-and-scale on 2 gloo processes -------------------------------------------------------

N, C, P, IN = 8, 4, 3, 5
LABELS = [0, 1, 2, 3, 0, 1, 2, 3]


def _problem():
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(N, IN, generator=gen)
    model = torch.nn.Linear(IN, C * P)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C * P, IN, generator=gen))
        model.bias.copy_(torch.randn(C * P, generator=gen))
    return inputs, torch.tensor(LABELS), model


def _losses():
    return {"opengait": lambda g: og.TripletLoss(0.5, gather_and_scale=g),
            "fastgait": lambda g: TripletLoss(0.5, impl="reference", gather_and_scale=g)}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    inputs, labels, model = _problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = slice(rank, N, world)  # OpenGait's sampler: every world-th element
    results = {}
    for name, make in _losses().items():
        ddp.zero_grad()
        loss, info = make(True)(ddp(inputs[local]).view(-1, C, P), labels[local])
        loss.mean().backward()
        results[name] = (loss.detach(), {k: v.detach() for k, v in info.items()},
                         [p.grad.clone() for p in model.parameters()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # every rank done with gloo before any tears it down (else: an occasional abort in its threads)
    dist.barrier()
    dist.destroy_process_group()


def test_gather_and_scale_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    inputs, labels, model = _problem()
    for name, make in _losses().items():
        model.zero_grad()
        loss, info = make(False)(model(inputs).view(-1, C, P), labels)
        loss.mean().backward()
        grads = [p.grad for p in model.parameters()]
        for rank in range(2):
            r_loss, r_info, r_grads = torch.load(tmp_path / f"rank{rank}.pt")[name]
            torch.testing.assert_close(r_loss, 2 * loss.detach(), msg=f"{name} loss x world size")
            assert set(r_info) == set(info)
            torch.testing.assert_close(r_info["loss"], info["loss"], msg=f"{name} info")
            for g_rank, g_one in zip(r_grads, grads):  # DDP's average equals the global-batch gradient
                torch.testing.assert_close(g_rank, g_one, rtol=1e-5, atol=1e-6, msg=name)
