"""Data parallel under ``torchrun``: process group, barrier, and the weights-in-sync check.

Without ``WORLD_SIZE`` > 1 everything here is a no-op on one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str, always: bool = False) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; joins the process group (gloo on CPU, nccl on GPU) under torchrun
    (with ``always``, FSDP's case, also for a world of one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (always and "WORLD_SIZE" in os.environ):
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    if device == "cuda":
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def check_in_sync(model: torch.nn.Module, world: int) -> None:
    """Every process must hold the same weights (checked before each checkpoint)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    everyone = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(everyone, total)
    if any(not torch.equal(everyone[0], x) for x in everyone):
        raise RuntimeError(f"data-parallel processes diverged: weight sums {[x.item() for x in everyone]}")
