"""Training as OpenGait trains: DDP with BatchNorm (sync_bn + OpenGait's rank split) equals one
process on the global batch, the logged total is the global objective; the set models train."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgait.config import load_config
from fastgait.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def read_metrics(output):
    return {m["iteration"]: m for m in map(json.loads, (Path(output) / "metrics.jsonl").read_text().splitlines())}


def _torchrun(nproc, root, output, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastgait.train", "--config", "gaitbase_casia-b", "--quiet", "--no-eval", "--output", str(output),
               f"data.root={root}", "data.split=null", "data.workers=0", "model.preset=tiny",
               "train.iterations=2", "train.P=2", "train.K=2", "train.clip_len=4", "train.log_every=1",
               "train.checkpoint_every=0", "train.lr=0.001", "train.milestones=[]", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_with_batchnorm_match_one_process(tiny_root, tmp_path):
    """GaitBase (BatchNorm in every block, BNNeck, triplet + CE) with train.sync_bn: 2 processes
    of 2 clips each compute what 1 process with the 4 clips computes: losses, CE, logged total."""
    _torchrun(1, tiny_root, tmp_path / "one")
    _torchrun(2, tiny_root, tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for it in one:
        for key in ("loss", "ce_loss", "total_loss", "accuracy"):
            assert two[it][key] == pytest.approx(one[it][key], rel=1e-4, abs=1e-6), (it, key, one[it], two[it])
        assert one[it]["total_loss"] == pytest.approx(one[it]["loss"] + one[it]["ce_loss"], rel=1e-6)


@pytest.mark.slow
def test_without_sync_bn_two_processes_differ(tiny_root, tmp_path):
    """The control of the test above: without sync_bn each rank normalises its own half of the
    batch, and the losses differ from one process's."""
    _torchrun(1, tiny_root, tmp_path / "one", ["train.iterations=1"])
    _torchrun(2, tiny_root, tmp_path / "unsynced", ["train.sync_bn=false", "train.iterations=1"])
    one, unsynced = read_metrics(tmp_path / "one")[1], read_metrics(tmp_path / "unsynced")[1]
    assert abs(unsynced["total_loss"] - one["total_loss"]) > 1e-3 * abs(one["total_loss"])


def _train_set_model(root, output, config_name, **model):
    overrides = [f"data.root={root}", "data.split=null", "data.workers=0", "eval.workers=0", "eval.baseline=false",
                 "model.preset=tiny", "train.iterations=3", "train.P=2", "train.K=2", "train.clip_len=6",
                 "train.log_every=1", "train.checkpoint_every=0", "train.lr=0.01", "train.milestones=[]"]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    trainer = Trainer(load_config(config_name, overrides), output, progress=False)
    try:
        trainer.train()
        return trainer.evaluate()
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["gaitset_casia-b", "gaitbase_casia-b", "gaitset+rmb_casia-b",
                                         "gaitbase+rmb_casia-b"])
def test_set_models_train_end_to_end(tiny_root, tmp_path, config_name):
    result = _train_set_model(tiny_root, tmp_path, config_name)
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2, 3] and all(np.isfinite(m["total_loss"]) for m in metrics.values())
    assert set(result) == {"NM", "BG", "CL"} and 0 <= result["NM"]["mean"] <= 100


def _bn_worker(rank, world, init_file, out_dir):
    import torch
    import torch.distributed as dist

    from fastgait.engine.distributed import convert_sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, grad, bn = _bn_problem()
    model = convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
    local = x[rank::world].clone().requires_grad_(True)
    y = model(local)
    y.backward(grad[rank::world])
    torch.save({"y": y.detach(), "dx": local.grad, "dw": model[0].weight.grad, "db": model[0].bias.grad,
                "mean": model[0].running_mean, "var": model[0].running_var}, f"{out_dir}/bn{rank}.pt")
    # every rank done with gloo before any tears it down (else: an occasional abort in its threads)
    dist.barrier()
    dist.destroy_process_group()


def _bn_problem():
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, 3, generator=gen) * 3 + 10  # a large mean: the variance must not cancel
    grad = torch.randn(6, 5, 7, 3, generator=gen)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(5, generator=gen))
    return x, grad, bn


def test_global_batchnorm_on_two_gloo_processes_equals_batchnorm_on_the_global_batch(tmp_path):
    """The CPU/gloo SyncBatchNorm: output, every gradient and the running statistics."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, grad, bn = _bn_problem()
    x.requires_grad_(True)
    y = bn(x)
    y.backward(grad)
    shards = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    for r, shard in enumerate(shards):
        torch.testing.assert_close(shard["y"], y.detach()[r::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shard["dx"], x.grad[r::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shard["mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shard["var"], bn.running_var, rtol=1e-5, atol=1e-6)
    # parameter gradients: each rank holds its shard's part; DDP sums them (then averages over ranks)
    torch.testing.assert_close(shards[0]["dw"] + shards[1]["dw"], bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shards[0]["db"] + shards[1]["db"], bn.bias.grad, rtol=1e-5, atol=1e-5)
