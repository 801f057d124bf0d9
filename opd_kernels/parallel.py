"""Vocab-parallel: the description of a vocabulary shard, and every collective the ops use.

Every op takes ``process_group=``; each rank then passes its local vocabulary shard (logits
``[..., V_r]`` or lm_head rows ``[V_r, d]``) and gets the same full loss. ``process_group`` is

* a ``VocabShard(start, size_total, group)`` (like Cut-Cross-Entropy's ``VocabParallelOptions``):
  the caller states where this rank's shard starts and the global vocabulary size, so no op
  communicates to learn the layout; or
* a bare ``ProcessGroup``: shards are laid out in rank order (possibly uneven). Ops with global
  ids (targets, top-k ids) learn the layout per call (no cache: a cache local to each rank could
  make ranks disagree on whether to communicate) by one all-gather of a 1-element int64 device
  tensor, with the cumulative sum taken on device.

Either way the ids are shifted to this shard on device (``Shard.local``), so kernels see local
ids (``vocab_start=0``) and an id on another shard falls outside ``[0, V_r)`` and contributes
nothing. No op reads a tensor on the host (no ``.item()``, ``.tolist()``, ``all_gather_object``).

Costs per op: ``merge_shards`` 2 all-reduces (MAX over 2 floats/row, SUM over 6 floats/row),
plus one SUM over 2 floats/row for JSD's second pass, and one SUM of ``[N, d]`` for the
replicated hidden states' gradient of the fused-linear ops. Logits never move.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ._stats import MAX_COLUMNS, SUM_COLUMNS, rebase
from ._validate import check_vocab_shard


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary shard: global ids ``start .. start + V_r - 1`` of ``size_total``,
    split over ``group`` (None: the default group)."""
    start: int
    size_total: int
    group: Any = None


@dataclass(frozen=True)
class Shard:
    """A resolved layout for one call. ``start`` / ``total`` are ints (no group, or a
    ``VocabShard``) or 0-dim int64 device tensors (learned over a bare group)."""
    start: Union[int, torch.Tensor]
    total: Union[int, torch.Tensor]
    group: Optional[Any]

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global ids -> this shard's columns (an id on another shard lands outside ``[0, V_r)``)."""
        return ids if isinstance(self.start, int) and self.start == 0 else ids - self.start


def group_of(process_group):
    """The ``ProcessGroup`` of ``process_group`` (a group, a ``VocabShard`` or None)."""
    if isinstance(process_group, VocabShard):
        return dist.group.WORLD if process_group.group is None else process_group.group
    return process_group


def shard_of(process_group, V_local: int, device: torch.device) -> Shard:
    """Where this rank's ``V_local`` entries sit in the global vocabulary."""
    if process_group is None:
        return Shard(0, V_local, None)
    if isinstance(process_group, VocabShard):
        check_vocab_shard(process_group.start, process_group.size_total, V_local)
        return Shard(process_group.start, process_group.size_total, group_of(process_group))
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    size = torch.full((1,), V_local, dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=process_group)
    ends = torch.cat(sizes).cumsum(0)
    return Shard(ends[rank] - size[0], ends[-1], process_group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM over ``group`` (no-op without one); returns ``x``."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def merge_shards(stats: torch.Tensor, group) -> torch.Tensor:
    """Global row statistics ``[N, 8]`` from each rank's local ones (no-op without a group):
    the maxima by a MAX all-reduce, then the sums rebased to them (``_stats.rebase``) and added."""
    if group is None:
        return stats
    m = stats[:, MAX_COLUMNS].contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    out = rebase(stats, m[:, 0], m[:, 1])
    out[:, SUM_COLUMNS] = all_reduce_sum(out[:, SUM_COLUMNS].contiguous(), group)
    return out


class _SumAcrossShards(torch.autograd.Function):
    """All-reduce SUM forward; identity backward (the loss is replicated, so each rank's local
    share receives the upstream gradient unchanged)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def sum_across_shards(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable SUM over ``group`` of per-shard shares of a replicated value."""
    return x if group is None else _SumAcrossShards.apply(x, group)
