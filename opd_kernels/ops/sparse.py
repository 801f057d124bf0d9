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

Fused with the lm_head (``fused_linear_sparse_distill_loss``), ``A`` comes from the fused
logprob op (row chunks or fused kernels, never ``[N, V]``) and the k student logits
``a_K = h · W[K] + b[K]`` from a gather-and-dot in row chunks (``_TopkLogits``): ``2 N k d``
flops instead of the ``2 N V d`` of full logits, no ``[N, k, d]`` saved for backward, which
gathers ``W[K]`` again for ``dh`` and scatter-adds ``g h`` into ``dW``.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from .._stats import all_reduce_sum
from ..backends import torch_backend
from . import _engine
from ._common import backend_name, flat_mask, jsd_kind, reduce_rows, rows2d, shard_layout_or_local
from .logprobs import check_linear, linear_args, linear_vocab
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


def _check_topk(teacher_topk_ids, teacher_topk_logprobs, lead):
    V.check_logits("teacher_topk_logprobs", teacher_topk_logprobs)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:-1] != lead:
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs must both be [*{tuple(lead)}, k], got "
                         f"{tuple(teacher_topk_ids.shape)} and {tuple(teacher_topk_logprobs.shape)}")
    return teacher_topk_ids.shape[-1]


def _bucket_loss(neg_A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead, out_dtype):
    """The [N, k+1] bucket math, in float64: cheap, and tails near 0 stay meaningful.
    ``neg_A [N]``: the student's -logsumexp; ``a_k [N, k]``: its (temperature-scaled) top-k logits."""
    k = a_k.shape[-1]
    lq_k = a_k + neg_A.double()[:, None]
    lp_k = teacher_topk_logprobs.reshape(-1, k).detach().double()
    lq = torch.cat([lq_k, _tail_log(lq_k, k >= total)], -1)
    lp = torch.cat([lp_k, _tail_log(lp_k, k >= total)], -1)
    lp = torch.where(m[:, None], lp, lq.detach())  # masked rows: no divergence, no inf * 0 in backward
    rows = _bucket_divergence(lq, lp, jsd_kind(divergence, beta), beta)
    return reduce_rows(rows.to(out_dtype), m, reduction, lead)


def sparse_distill_loss(student_logits, teacher_topk_ids, teacher_topk_logprobs, *, divergence="reverse_kl",
                        beta=0.5, temperature=1.0, mask=None, reduction="mean", impl="auto", process_group=None):
    """Divergence over the teacher's top-k buckets + tail (see module docstring)."""
    V.check_logits("student_logits", student_logits)
    V.check_same_device(student_logits=student_logits, teacher_topk_ids=teacher_topk_ids,
                        teacher_topk_logprobs=teacher_topk_logprobs, mask=mask)
    V.check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = _check_topk(teacher_topk_ids, teacher_topk_logprobs, lead)
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
    a_k = torch.where(inside, s.gather(1, local.clamp(0, vocab - 1)).double() * inv_temp, 0.0)
    a_k = sum_across_shards(a_k, process_group)
    return _bucket_loss(neg_A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead,
                        _engine._acc(s))


class _TopkLogits(torch.autograd.Function):
    """``out[n, j] = h[n] · W[idx[n, j]] (+ b[idx[n, j]])`` in row chunks; entries where
    ``inside`` is False are 0. Backward: ``dh = Σ_j g W[idx]`` (all-reduced over ``group``, as
    ``h`` is replicated across vocabulary shards), ``dW`` / ``db`` by ``index_add_``."""

    @staticmethod
    def forward(ctx, h, w, b, idx, inside, rows, group):
        acc = _engine._acc(w)
        out = torch.empty(idx.shape, dtype=acc, device=h.device)
        for i in range(0, h.shape[0], rows):
            j = slice(i, i + rows)
            out[j] = torch.einsum("nd,nkd->nk", h[j].to(acc), w[idx[j]].to(acc))
        if b is not None:
            out += b[idx].to(acc)
        out.masked_fill_(~inside, 0.0)
        ctx.save_for_backward(h, w, b, idx, inside)
        ctx.rows, ctx.group = rows, group
        return out

    @staticmethod
    def backward(ctx, g):
        h, w, b, idx, inside = ctx.saved_tensors
        g = torch.where(inside, g, 0.0).to(_engine._acc(w))
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = torch.empty(h.shape, dtype=g.dtype, device=h.device)
            for i in range(0, h.shape[0], ctx.rows):
                j = slice(i, i + ctx.rows)
                dh[j] = torch.einsum("nk,nkd->nd", g[j], w[idx[j]].to(g.dtype))
            dh = all_reduce_sum(dh, ctx.group).to(h.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(w.shape, dtype=g.dtype, device=w.device)
            for i in range(0, h.shape[0], ctx.rows):
                j = slice(i, i + ctx.rows)
                gh = g[j, :, None] * h[j, None, :].to(g.dtype)  # [n, k, d]
                dw.index_add_(0, idx[j].reshape(-1), gh.reshape(-1, h.shape[1]))
            dw = dw.to(w.dtype)
        if b is not None and ctx.needs_input_grad[2]:
            db = torch.zeros(b.shape, dtype=g.dtype, device=b.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            db = db.to(b.dtype)
        return dh, dw, db, None, None, None, None


def fused_linear_sparse_distill_loss(hidden, weight, teacher_topk_ids, teacher_topk_logprobs, *, bias=None,
                                     divergence="reverse_kl", beta=0.5, temperature=1.0, mask=None,
                                     reduction="mean", vocab_size=None, chunk_size=None, impl="auto",
                                     process_group=None):
    """``sparse_distill_loss(hidden @ weight.T + bias, ...)`` without materializing the logits.

    ``hidden [..., d]``, ``weight [V, d]`` (this rank's shard with ``process_group``; the top-k
    ids are global), ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[..., k]``. The full
    vocabulary is read once for the student's log-normalizer (the fused logprob op); the
    top-k logits cost ``2 N k d`` flops (see module docstring). Differentiable w.r.t. hidden,
    weight and bias.
    """
    check_linear("hidden", hidden, "weight", weight, "bias", bias)
    V.check_same_device(hidden=hidden, weight=weight, teacher_topk_ids=teacher_topk_ids,
                        teacher_topk_logprobs=teacher_topk_logprobs, bias=bias, mask=mask)
    V.check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    lead = hidden.shape[:-1]
    k = _check_topk(teacher_topk_ids, teacher_topk_logprobs, lead)
    vocab = linear_vocab(weight, vocab_size, process_group)
    ids = teacher_topk_ids.reshape(-1, k)
    start, total = shard_layout_or_local(vocab, process_group)
    V.check_targets(ids, ids.shape, total, ignore_index=None, name="teacher_topk_ids")
    m = flat_mask(mask, lead, hidden.device)
    h, w, b = linear_args(hidden, weight, bias, vocab)
    inv_temp = 1.0 / temperature
    neg_A, _ = _engine.fl_rows((h, w, b) + (None,) * 6, torch.full_like(ids[:, 0], -1).long(), kind="logprob",
                               inv_temp=inv_temp, vocab_start=start, chunk=chunk_size or 0, entropy=False,
                               impl=backend_name(impl, hidden.device), group=process_group)
    local = ids.long() - start
    inside = (local >= 0) & (local < vocab)
    # rows per gather chunk: [rows, k, d] fp32 near the chunk budget (chunk_size overrides)
    rows = chunk_size or torch_backend.rows_per_chunk(k * h.shape[-1])
    a_k = _TopkLogits.apply(h, w, b, local.clamp(0, vocab - 1), inside, rows, process_group)
    a_k = sum_across_shards(a_k.double() * inv_temp, process_group)
    return _bucket_loss(neg_A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead,
                        _engine._acc(w))
