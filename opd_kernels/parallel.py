"""Vocab-parallel helpers: where this rank's vocabulary shard starts, and a differentiable sum.

Every op takes ``process_group=``; each rank then passes its local vocabulary shard (logits
``[..., V_r]`` or lm_head rows ``[V_r, d]``, shards in rank order, possibly uneven) and gets
the same full loss. Ops with global token ids (targets, top-k ids) first learn the shard
layout with one small all-gather per call (no cache: a cache local to each rank could make
ranks disagree on whether to communicate).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

def shard_layout(V_local: int, group) -> tuple[int, int]:
    """(global index of this rank's first vocabulary entry, global vocabulary size); shards are
    laid out in rank order."""
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, int(V_local), group=group)
    return int(sum(sizes[:dist.get_rank(group)])), int(sum(sizes))


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
