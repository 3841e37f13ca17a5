"""Data-parallel training under torchrun: process group, model wrapping, metric reduction.

`torchrun --nproc_per_node=N -m speckle_models.training.train ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set; `setup()` reads them (a plain run is rank 0 of 1 and touches nothing), joins the
process group (NCCL on GPUs, gloo on CPUs) and picks the rank's device. `sync_norms()` makes the
model's normalization layers synchronize their statistics across ranks (SyncFusedBatchRenorm,
nn.SyncBatchNorm on GPUs) and `data_parallel()` wraps it in DistributedDataParallel. Each rank takes its shard of every
global batch (DeviceBatches(rank=, world_size=)); rank 0 alone writes checkpoints and reports.
`--batch-size` is per process: N processes step on global batches of N times that.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from speckle_kernels import convert_sync_batchrenorm


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group if there is one; returns the context and the rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world, local_rank), device


def sync_norms(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """Normalization layers that merge their batch statistics across ranks (before the
    optimizer is built: the converted layers carry new parameters)."""
    if not ctx.enabled:
        return model
    model = convert_sync_batchrenorm(model)
    if device.type == "cuda":  # nn.SyncBatchNorm runs on GPUs only; on CPUs BatchNorm stays per rank
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def data_parallel(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model, when distributed (gradients averaged over ranks)."""
    if not ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, for checkpoints that load with or without DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(value: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The average of a per-rank tensor over all ranks (the value itself when not distributed)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ctx.world_size


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def teardown_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
