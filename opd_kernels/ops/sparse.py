"""Divergences to a sparse teacher given as top-k ids and logprobs plus a tail bucket.

The teacher is served as top-k ids ``K [..., k]`` with full-vocabulary-normalized logprobs
``l [..., k]`` (SDPO's top-100). Both distributions are collapsed to the k+1 buckets
``{K_1..K_k, tail}``: ``p_tail = 1 - sum e^l``, ``q_K = e^(a_K - A)``, ``q_tail = 1 - sum q_K``.
Only the student's log-normalizer ``A`` needs the full vocabulary (``_rows.log_normalizer``:
one streaming pass through the backend; its backward spreads ``q`` over all entries); the
k-sized rest is plain torch, in float64. Tails are ``-expm1(logsumexp(...))``, floored at the
smallest normal number when rounding ate them (see ``_tail_log``), so a top-k covering nearly
all mass stays finite. The teacher's logprobs are taken as given (already at the teacher's
temperature; each must be <= 0, checked like the ids' range, see ``_validate``); the
``temperature`` option divides the student's logits, after its logit transform (``logit_scale``
multiplies them, then ``softcap`` maps them to ``softcap * tanh(x / softcap)``), which applies to
the full-vocabulary ``A`` (in the backends) and to the k gathered logits (``transform_logits``).

Fused with the lm_head (``fused_linear_sparse_distill_loss``), ``A`` comes from
``_fused.log_normalizer`` (row chunks or fused kernels, never ``[N, V]``) and the k student logits
``a_K = h · W[K] + b[K]`` from a gather-and-dot in row chunks (``_TopkLogits``): ``2 N k d``
flops instead of the ``2 N V d`` of full logits, no ``[N, k, d]`` saved for backward, which
gathers ``W[K]`` again for ``dh`` and scatter-adds ``g h`` into ``dW``.
"""
from __future__ import annotations

import torch

from .. import parallel
from .._chunks import rows_per_chunk
from .._validate import (check_hidden_weight, check_logit_transform, check_logits, check_options, check_same_device,
                         check_targets, check_topk)
from . import _fused, _rows
from ._decide import backend_name
from ._spec import RowSpec, transform_fields
from ._common import acc_dtype, flat_mask, jsd_kind, linear_args, linear_vocab, reduce_rows, rows2d, transform_logits


def _tail_log(logp_k: torch.Tensor, empty: bool) -> torch.Tensor:
    """log(1 - sum e^logp_k), the tail bucket, as ``log(-expm1(logsumexp(logp_k)))``.

    A tail lost to rounding (a confident model whose top-k holds all but ~eps of the mass) is
    floored at the dtype's smallest normal number: finite, with zero gradient, never the
    ``inf`` an exact 0 would give. ``empty`` (k covers the whole vocabulary) gives -inf; it is a
    bool, or a 0-dim bool tensor when the global vocabulary size is known on device only.
    """
    if isinstance(empty, bool) and empty:
        return torch.full_like(logp_k[:, :1], -float("inf"))
    tail = -torch.expm1(torch.logsumexp(logp_k, -1, keepdim=True))
    tail = tail.clamp_min(torch.finfo(tail.dtype).tiny).log()
    return tail if isinstance(empty, bool) else tail.masked_fill(empty, -float("inf"))


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


def _bucket_loss(A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead, out_dtype):
    """The [N, k+1] bucket math, in float64: cheap, and tails near 0 stay meaningful.
    ``A [N]``: the student's logsumexp; ``a_k [N, k]``: its (temperature-scaled) top-k logits."""
    k = a_k.shape[-1]
    lq_k = a_k - A.double()[:, None]
    lp_k = teacher_topk_logprobs.reshape(-1, k).detach().double()
    lq = torch.cat([lq_k, _tail_log(lq_k, k >= total)], -1)
    lp = torch.cat([lp_k, _tail_log(lp_k, k >= total)], -1)
    lp = torch.where(m[:, None], lp, lq.detach())  # masked rows: no divergence, no inf * 0 in backward
    rows = _bucket_divergence(lq, lp, jsd_kind(divergence, beta), beta)
    return reduce_rows(rows.to(out_dtype), m, reduction, lead)


def sparse_distill_loss(student_logits, teacher_topk_ids, teacher_topk_logprobs, *, divergence="reverse_kl",
                        beta=0.5, temperature=1.0, mask=None, reduction="mean", softcap=None, logit_scale=None,
                        impl="auto", process_group=None):
    """Divergence over the teacher's top-k buckets + tail (see module docstring); ``softcap`` /
    ``logit_scale``: the student's logit transform, as in :func:`opd_kernels.token_logprobs`."""
    check_logits("student_logits", student_logits)
    check_same_device(student_logits=student_logits, teacher_topk_ids=teacher_topk_ids,
                      teacher_topk_logprobs=teacher_topk_logprobs, mask=mask)
    check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    tf = check_logit_transform(softcap, logit_scale)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    local, inside, total, group = _topk_ids(teacher_topk_ids, teacher_topk_logprobs, lead, vocab, process_group,
                                            student_logits.device)
    m = flat_mask(mask, lead, student_logits.device)
    s = rows2d(student_logits, vocab)
    spec = RowSpec("log_normalizer", 1.0 / temperature, impl=backend_name(impl, s.device, s), **transform_fields(tf))
    A = _rows.log_normalizer(s, spec, group)
    a_k = torch.where(inside, transform_logits(s.gather(1, local).double(), tf) * spec.inv_temp, 0.0)
    a_k = parallel.sum_across_shards(a_k, group)
    return _bucket_loss(A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead, acc_dtype(s))


def _topk_ids(ids, logprobs, lead, vocab, process_group, device):
    """Checked top-k ids as this shard's columns: ``(local [N, k] clamped into range, inside
    [N, k], global vocabulary size, group)``."""
    k = check_topk(ids, logprobs, lead)
    ids = ids.reshape(-1, k)
    shard = parallel.shard_of(process_group, vocab, device)
    check_targets(ids, ids.shape, shard.total, ignore_index=None, name="teacher_topk_ids")
    local = shard.local(ids.long())
    inside = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), inside, shard.total, shard.group


class _TopkLogits(torch.autograd.Function):
    """``out[n, j] = h[n] · W[idx[n, j]] (+ b[idx[n, j]])`` in row chunks; entries where
    ``inside`` is False are 0. Backward: ``dh = Σ_j g W[idx]`` (all-reduced over ``group``, as
    ``h`` is replicated across vocabulary shards), ``dW`` / ``db`` by ``index_add_``."""

    @staticmethod
    def forward(ctx, h, w, b, idx, inside, rows, group):
        acc = acc_dtype(w)
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
        g = torch.where(inside, g, 0.0).to(acc_dtype(w))
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = torch.empty(h.shape, dtype=g.dtype, device=h.device)
            for i in range(0, h.shape[0], ctx.rows):
                j = slice(i, i + ctx.rows)
                dh[j] = torch.einsum("nk,nkd->nd", g[j], w[idx[j]].to(g.dtype))
            dh = parallel.all_reduce_sum(dh, ctx.group).to(h.dtype)
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
                                     reduction="mean", softcap=None, logit_scale=None, vocab_size=None,
                                     chunk_size=None, impl="auto", process_group=None):
    """``sparse_distill_loss(hidden @ weight.T + bias, ...)`` without materializing the logits.

    ``hidden [..., d]``, ``weight [V, d]`` (this rank's shard with ``process_group``; the top-k
    ids are global), ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[..., k]``. The full
    vocabulary is read once for the student's log-normalizer (the fused logprob op); the
    top-k logits cost ``2 N k d`` flops (see module docstring). ``softcap`` / ``logit_scale``: the
    student's logit transform (``opd_kernels.hf.head(model).kwargs()``). Differentiable w.r.t.
    hidden, weight and bias.
    """
    check_hidden_weight("hidden", hidden, "weight", weight, "bias", bias)
    check_same_device(hidden=hidden, weight=weight, teacher_topk_ids=teacher_topk_ids,
                      teacher_topk_logprobs=teacher_topk_logprobs, bias=bias, mask=mask)
    check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    tf = check_logit_transform(softcap, logit_scale)
    lead = hidden.shape[:-1]
    vocab = linear_vocab(weight, vocab_size, process_group)
    local, inside, total, group = _topk_ids(teacher_topk_ids, teacher_topk_logprobs, lead, vocab, process_group,
                                            hidden.device)
    m = flat_mask(mask, lead, hidden.device)
    h, w, b = linear_args(hidden, weight, bias, vocab)
    spec = RowSpec("log_normalizer", 1.0 / temperature, impl=backend_name(impl, hidden.device, w),
                   chunk=chunk_size or 0, **transform_fields(tf))
    A = _fused.log_normalizer(h, w, b, spec, group)
    # rows per gather chunk: [rows, k, d] fp32 near the chunk budget (chunk_size overrides)
    rows = chunk_size or rows_per_chunk(local.shape[-1] * h.shape[-1])
    a_k = _TopkLogits.apply(h, w, b, local, inside, rows, group)
    a_k = parallel.sum_across_shards(transform_logits(a_k.double(), tf) * spec.inv_temp, group)  # T(0) = 0 off-shard
    return _bucket_loss(A, a_k, teacher_topk_logprobs, total, m, divergence, beta, reduction, lead, acc_dtype(w))
