"""Turn per-shard row statistics into per-row results (and combine them across vocab shards).

A backend's ``row_stats`` gives, per row and over its local vocabulary columns,
``(m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y)`` (see ``opd_kernels.backends``). Shards merge like
the online-softmax recurrence itself: with ``M = max_r m_r`` every sum taken relative to
``m_r`` is rescaled by ``e^(m_r - M)`` and added. Vocab-parallel therefore costs two
all-reduces per op (MAX over 2 floats/row, then SUM over 6 floats/row), plus one SUM over 2
floats/row for JSD's second pass, and never moves logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import STAT_A_Y, STAT_D_P, STAT_D_Q, STAT_M_A, STAT_M_B, STAT_S_A, STAT_S_B, STAT_U_A


@dataclass
class Rows:
    A: torch.Tensor        # logsumexp of the student's scaled logits
    B: torch.Tensor        # logsumexp of the (combined) teacher's scaled logits
    entropy: torch.Tensor  # H(q)
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    logprob: torch.Tensor  # a_y - A


def _rescale(x: torch.Tensor, m_local: torch.Tensor, m_global: torch.Tensor) -> torch.Tensor:
    """x * e^(m_local - m_global), with empty shards (x == 0, m_local = -inf) staying 0."""
    return torch.where(x != 0, x * torch.exp(m_local - m_global), torch.zeros_like(x))


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def merge_shards(stats: torch.Tensor, group) -> torch.Tensor:
    """Global statistics from each rank's local ones (no-op without a process group)."""
    if group is None:
        return stats
    m = stats[:, [STAT_M_A, STAT_M_B]].contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    out = stats.clone()
    for col, mcol in ((STAT_S_A, 0), (STAT_U_A, 0), (STAT_D_Q, 0), (STAT_S_B, 1), (STAT_D_P, 1)):
        local = STAT_M_A if mcol == 0 else STAT_M_B
        out[:, col] = _rescale(stats[:, col], stats[:, local], m[:, mcol])
    sums = out[:, [STAT_S_A, STAT_U_A, STAT_S_B, STAT_D_Q, STAT_D_P, STAT_A_Y]].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    out[:, [STAT_S_A, STAT_U_A, STAT_S_B, STAT_D_Q, STAT_D_P, STAT_A_Y]] = sums
    out[:, STAT_M_A], out[:, STAT_M_B] = m[:, 0], m[:, 1]
    return out


def finish(stats: torch.Tensor) -> Rows:
    """Per-row quantities from global statistics (DESIGN.md's single-pass formulas)."""
    m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y = stats.unbind(-1)
    A = m_a + torch.log(S_a)
    B = m_b + torch.log(S_b)
    return Rows(A=A, B=B, entropy=A - U_a / S_a, reverse_kl=D_q / S_a - A + B,
                forward_kl=D_p / S_b - B + A, logprob=a_y - A)
