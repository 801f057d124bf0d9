"""Divergences to a sparse teacher given as top-k ids and logprobs plus a tail bucket.

The teacher is served as top-k ids ``K [..., k]`` with full-vocabulary-normalized logprobs
``l [..., k]`` (SDPO's top-100). Both distributions are collapsed to the k+1 buckets
``{K_1..K_k, tail}``: ``p_tail = 1 - sum e^l``, ``q_K = e^(a_K - A)``, ``q_tail = 1 - sum q_K``.
Only the student's log-normalizer ``A`` needs the full vocabulary (one streaming pass through
the backend; its backward spreads ``-q`` over all entries); the k-sized rest is plain torch,
in float64. Tails are ``-expm1(logsumexp(...))``, floored at the smallest normal number when
rounding ate them (see ``_tail_log``), so a top-k covering nearly all mass stays finite.
The teacher's logprobs are taken as given (already at the teacher's temperature); the
``temperature`` option divides the student's logits.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from . import _engine
from ._common import backend_name, flat_mask, jsd_kind, reduce_rows, rows2d, shard_layout_or_local
from ..parallel import sum_across_shards


def _tail_log(logp_k: torch.Tensor, empty: bool) -> torch.Tensor:
    """log(1 - sum e^logp_k), the tail bucket, as ``log(-expm1(logsumexp(logp_k)))``.

    A tail lost to rounding (a confident model whose top-k holds all but ~eps of the mass) is
    floored at the dtype's smallest normal number: finite, with zero gradient, never the
    ``inf`` an exact 0 would give. ``empty`` (k covers the whole vocabulary) gives -inf.
    """
    if empty:
        return torch.full_like(logp_k[:, :1], -float("inf"))
    tail = -torch.expm1(torch.logsumexp(logp_k, -1, keepdim=True))
    return tail.clamp_min(torch.finfo(tail.dtype).tiny).log()


def _bucket_divergence(lq, lp, kind, beta):
    """Divergence between bucket distributions given as log-probs ``[N, k+1]``."""
    def kl(lx, ly):  # sum x (log x - log y), zero-probability terms dropped
        px = lx.exp()
        live = px > 0
        diff = torch.where(live, lx, 0.0) - torch.where(live, ly, 0.0)
        return torch.where(live, px * diff, 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(lp, lq)
    if kind == "reverse_kl":
        return kl(lq, lp)
    lm = torch.logaddexp(lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                         lq + torch.log(torch.tensor(1.0 - beta, dtype=lp.dtype)))
    return beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)


def sparse_distill_loss(student_logits, teacher_topk_ids, teacher_topk_logprobs, *, divergence="reverse_kl",
                        beta=0.5, temperature=1.0, mask=None, reduction="mean", impl="auto", process_group=None):
    """Divergence over the teacher's top-k buckets + tail (see module docstring)."""
    V.check_logits("student_logits", student_logits)
    V.check_logits("teacher_topk_logprobs", teacher_topk_logprobs)
    V.check_same_device(student_logits=student_logits, teacher_topk_ids=teacher_topk_ids,
                        teacher_topk_logprobs=teacher_topk_logprobs, mask=mask)
    V.check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:-1] != lead:
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs must both be [*{tuple(lead)}, k], got "
                         f"{tuple(teacher_topk_ids.shape)} and {tuple(teacher_topk_logprobs.shape)}")
    k = teacher_topk_ids.shape[-1]
    ids = teacher_topk_ids.reshape(-1, k)
    start, total = shard_layout_or_local(vocab, process_group)
    V.check_targets(ids, ids.shape, total, ignore_index=None, name="teacher_topk_ids")
    m = flat_mask(mask, lead, student_logits.device)
    s = rows2d(student_logits, vocab)
    inv_temp = 1.0 / temperature
    # -A from the "logprob" kind with an off-shard target (a_y = 0): one pass, backward -q.
    neg_A, _ = _engine.rows(s, None, None, torch.full_like(ids[:, 0], -1).long(), kind="logprob",
                            inv_temp=inv_temp, vocab_start=start, impl=backend_name(impl, s.device),
                            group=process_group)
    local = ids.long() - start
    inside = (local >= 0) & (local < vocab)
    # The [N, k+1] bucket math runs in float64: cheap, and tails near 0 stay meaningful.
    a_k = torch.where(inside, s.gather(1, local.clamp(0, vocab - 1)).double() * inv_temp, 0.0)
    a_k = sum_across_shards(a_k, process_group)
    lq_k = a_k + neg_A.double()[:, None]
    lp_k = teacher_topk_logprobs.reshape(-1, k).detach().double()
    lq = torch.cat([lq_k, _tail_log(lq_k, k >= total)], -1)
    lp = torch.cat([lp_k, _tail_log(lp_k, k >= total)], -1)
    lp = torch.where(m[:, None], lp, lq.detach())  # masked rows: no divergence, no inf * 0 in backward
    rows = _bucket_divergence(lq, lp, jsd_kind(divergence, beta), beta)
    return reduce_rows(rows.to(_engine._acc(s)), m, reduction, lead)
