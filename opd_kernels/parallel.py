"""Vocab-parallel helpers: where this rank's vocabulary shard starts, and a differentiable sum.

Every op takes ``process_group=``; each rank then passes its local vocabulary shard (logits
``[..., V_r]`` or lm_head rows ``[V_r, d]``, shards in rank order, possibly uneven) and gets
the same full loss. The shard offset is found once per (group, V_r) with one all-gather.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OFFSETS: dict = {}


def vocab_offset(V_local: int, group) -> int:
    """Global index of this rank's first vocabulary entry (shards laid out in rank order)."""
    key = (id(group), V_local)
    if key not in _OFFSETS:
        rank = dist.get_rank(group)
        sizes = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, V_local, group=group)
        _OFFSETS[key] = int(sum(sizes[:rank]))
    return _OFFSETS[key]


class _SumAcrossShards(torch.autograd.Function):
    """All-reduce SUM forward; identity backward (the loss is replicated, so each rank's local
    share receives the upstream gradient unchanged)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def sum_across_shards(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _SumAcrossShards.apply(x, group)
