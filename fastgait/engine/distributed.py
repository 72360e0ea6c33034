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
