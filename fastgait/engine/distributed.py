"""DDP helpers: process-group setup from torchrun's environment, and the triplet-loss gather."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_for_triplet(embeddings: torch.Tensor, labels: torch.Tensor, info: DistInfo):
    """All-gather embeddings and labels so the loss sees the global batch.

    Only this rank's slice carries gradient (the others are detached copies); the caller
    multiplies the loss by the world size, since DDP averages gradients over ranks.
    """
    if not info.enabled:
        return embeddings, labels
    pieces = [torch.empty_like(embeddings) for _ in range(info.world_size)]
    dist.all_gather(pieces, embeddings.detach().contiguous())
    pieces[info.rank] = embeddings
    label_pieces = [torch.empty_like(labels) for _ in range(info.world_size)]
    dist.all_gather(label_pieces, labels.contiguous())
    return torch.cat(pieces), torch.cat(label_pieces)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a (detached) tensor over ranks; the tensor itself with one process."""
    if not info.enabled:
        return value.detach()
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for any device and backend (gloo included; torch's
    ``SyncBatchNorm`` runs on GPUs only): per channel, the sum, sum of squares and count are
    all-reduced (differentiably), so the statistics and gradients are those of one process with
    the global batch. Same parameters, buffers and state-dict keys as the BatchNorm it replaces;
    in evaluation, or without a process group, it is that BatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor([x.numel() // x.shape[1]], device=x.device, dtype=xf.dtype)
        # two passes (mean, then centred squares): E[x^2] - mean^2 loses digits in fp32
        c = x.shape[1]
        stats = all_reduce(torch.cat([xf.sum(dims), count]))
        total = stats[-1]
        mean = stats[:c] / total
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * total / (total - 1).clamp(min=1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of ``model`` normalises over the global batch: torch's ``SyncBatchNorm`` on
    CUDA, ``GlobalBatchNorm`` elsewhere (gloo on CPU). Parameters and buffers are kept."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        tensors = list(module.parameters()) + list(module.buffers())
        if tensors:
            new = new.to(tensors[0].device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
