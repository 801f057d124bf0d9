"""Row losses fused with the lm_head: ``logits = h @ W.T + b`` is not materialized as ``[N, V]``
(unless ``OPD_KEEP_BYTES`` opts in to the kept gradient of the per-token ops on CPU: rule 4).

``models`` is the flat 9-tuple ``(hs, ws, bs, ht, wt, bt, hr, wr, br)`` of student, teacher and
reference (None where absent). Two paths, chosen per call by ``_route.use_fused_kernels`` (a
FLOP/byte model, docs/design.md; ``OPD_FUSED_LINEAR=kernels|chunked|auto`` overrides):

* fused ``tl.dot`` kernels (a backend with ``fused_*`` primitives: triton) get the models whole;
* the chunk loop (torch, cuda, and triton where the model says so): rows in chunks
  ``h[i:j] @ W.T (+ b)`` into ``[c, V]`` buffers in the GEMM dtype (bf16 on CUDA, fp32 on CPU),
  sized by ``_chunks.fused_row_ranges`` (CUDA: all live buffers within ~1 GiB; CPU: each fp32
  buffer within ``OPD_CHUNK_BYTES``, at least 512 rows), one buffer per model reused by every
  chunk (``_gemm.workspace``), fed to the logits-level primitives as in ``_rows`` (CPU: the
  compiled chunk math of ``_compiled``); the gradient is written in place into the student's
  buffer, then ``dh = ds W`` and ``dW += ds^T h`` by cuBLAS/BLAS with fp32 accumulation
  (``_gemm.accumulate_grads``).

Entry points:

* ``fl_rows``: per-row ``(main, entropy)``; backward recomputes the logits chunk by chunk, or,
  where ``_decide`` rule 4 keeps it (CPU compiled path, logprob / log-normalizer, no entropy,
  within ``OPD_KEEP_BYTES``), runs two GEMMs on the ``[N, V]`` unit gradient kept from forward:
  3 GEMM passes instead of 4 (``fl_forward_kept``, ``kept_grads``).
* ``fl_loss``: a scalar ``sum_i g_i . (main_i, H_i)`` without a process group. Every backend
  computes its gradients during forward and backward only scales them by ``grad_output``
  (Liger's trick): the chunked path (torch, cuda) in the same pass over the chunks, 4 GEMM
  passes like the naive loss instead of 6 with recomputation; fused kernels (triton) by
  running their gradient kernels right after the forward ones.
* ``log_normalizer``: ``A = logsumexp(a)`` of one model, differentiable (the sparse ops).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import parallel
from .._dispatch import backend
from ..backends import N_STATS
from . import _compiled, _gemm as G
from ._decide import Decision, decide, logits_dtype
from ._common import acc_dtype, row_slice
from ._rows import rows_backward, rows_forward, rows_from_stats, upstream
from ._spec import ROW_SPEC_SCHEMA as SPEC, RowSpec, SpecOp, pad_grads

N_MODEL = 9  # tensor slots of ``models``: (h, W, b) of student, teacher, reference


# ----------------------------------------------------------------------------- decision
def decision(be, models, spec: RowSpec, group=None) -> tuple[Decision, object]:
    """``_decide.decide`` for one call of ``be`` (a backend module) on ``models``, and the backend
    module it picks (``be`` itself, except float64 asked of the cuda backend: torch)."""
    present = [k for k in (0, 3, 6) if models[k] is not None]
    run = decide(be.NAME, models[1].device, logits_dtype(*(models[k + 1] for k in present), models[0]),
                 rows=models[0].shape[0], vocab=models[1].shape[0], dims=[models[k].shape[1] for k in present],
                 kind=spec.kind, entropy=spec.entropy, group=group)
    return run, (be if run.backend == be.NAME else backend(run.backend))


# ----------------------------------------------------------------------------- forward / backward
def fl_forward(be, models, targets, spec: RowSpec, group=None, run: Decision | None = None):
    """Per-row ``(main, entropy, rs)`` of the fused-linear ops (``run``: the call's decision, if taken)."""
    run, be = decision(be, models, spec, group) if run is None else (run, be)
    if run.path == "fused_kernels":
        stats = be.fused_row_stats(*models, targets, **spec.stats_kw(be))
        return rows_from_stats(stats, lambda AB: be.fused_jsd_sums(*models[:6], AB, **spec.jsd_kw()), spec, group)
    prep, rng, bufs = G.plan(models, spec)
    if run.compiled:
        outs = [_compiled.rows(*G.chunk_logits(prep, i, j, bufs), row_slice(targets, i, j), spec) for i, j in rng]
        return tuple(torch.cat(x) for x in zip(*outs))
    parts = [models[0].new_zeros(0, N_STATS, dtype=torch.float32)]
    for i, j in rng:
        s, t, r = G.chunk_logits(prep, i, j, bufs)
        parts.append(be.row_stats(s, t, r, row_slice(targets, i, j), **spec.stats_kw(be)))

    def jsd(AB):  # second pass: recompute the logits chunk by chunk
        out = [AB.new_zeros(0, 2)]
        for i, j in rng:
            s, t = G.chunk_logits(prep[:2], i, j, bufs)
            out.append(be.jsd_sums(s, t, AB[i:j], **spec.jsd_kw()))
        return torch.cat(out)

    return rows_from_stats(torch.cat(parts), jsd, spec, group)


def fl_backward(be, models, targets, rs, g, spec: RowSpec, need, group=None, run: Decision | None = None):
    """(dh, dw, db) in the accumulation dtype (None where not needed) for upstream ``g [N, 2]``."""
    run, be = decision(be, models, spec, group) if run is None else (run, be)
    if run.path == "fused_kernels":
        tg, g = spec.grad_inputs(targets, g)
        dh, dw, db = be.fused_grad(*models, tg, rs, g, need_dw=need[1], need_db=need[2], **spec.grad_kw())
    else:
        prep, rng, bufs = G.plan(models, spec)
        grads = G.grad_buffers(models, need, overwrite=True)
        for n, (i, j) in enumerate(rng):
            s, t, r = G.chunk_logits(prep, i, j, bufs)
            if run.compiled:  # ds in place of the logits
                gs = _compiled.grad_(s, t, r, row_slice(targets, i, j), rs[i:j], g[i:j], spec)
            else:
                gs = rows_backward(be, s, t, r, row_slice(targets, i, j), rs[i:j], g[i:j], spec, out=s)
            G.accumulate_grads(gs, models[0], prep[0][1], i, j, grads, first=n == 0)
        dh, dw, db = grads
    if group is not None and dh is not None:
        parallel.all_reduce_sum(dh, group)  # every rank holds a vocab shard's share of dL/dh
    return dh, dw, db


def fl_loss_with_grads(be, models, targets, g, spec: RowSpec, need):
    """Per-row ``(main, entropy)`` and the gradients of ``sum_i g_i . (main_i, H_i)``."""
    run, be = decision(be, models, spec)
    if run.path == "fused_kernels":
        main, ent, rs = fl_forward(be, models, targets, spec, run=run)
        grads = fl_backward(be, models, targets, rs, g, spec, need, run=run) if any(need) else (None, None, None)
        return main, ent, grads
    prep, rng, bufs = G.plan(models, spec)
    grads = G.grad_buffers(models, need, overwrite=True)
    mains, ents = [g.new_zeros(0)], [g.new_zeros(0)]
    for n, (i, j) in enumerate(rng):
        s, t, r = G.chunk_logits(prep, i, j, bufs)
        tg = row_slice(targets, i, j)
        gs = s if any(need) else None  # the gradient, in place of the logits
        if run.compiled and gs is not None:  # statistics and gradient in one compiled pass
            main, ent, _ = _compiled.rows_and_grad_(s, t, r, tg, g[i:j], spec)
        elif run.compiled:
            main, ent, _ = _compiled.rows(s, t, r, tg, spec)
        else:
            main, ent, rs = rows_forward(be, s, t, r, tg, spec)
            if gs is not None:
                gs = rows_backward(be, s, t, r, tg, rs, g[i:j], spec, out=s)
        mains.append(main), ents.append(ent)
        if gs is not None:
            G.accumulate_grads(gs, models[0], prep[0][1], i, j, grads, first=n == 0)
    return torch.cat(mains), torch.cat(ents), grads


# ----------------------------------------------------------------------------- kept gradient (rule 4)
def fl_forward_kept(models, targets, spec: RowSpec):
    """``(main, entropy, D)`` of a per-token op (student only, ``_decide.KEEP_KINDS``): ``D = d main
    / d logits`` for a unit upstream, ``[N, V]`` in the GEMM dtype. One GEMM writes the logits into
    ``D`` and one compiled pass overwrites them with the gradient, so ``D`` is the only ``[N, V]``
    buffer; backward (``kept_grads``) is two GEMMs on it."""
    prep = G.prepared(models)
    h, w, _ = prep[0]
    D = h.new_empty(h.shape[0], w.shape[0], dtype=w.dtype)
    s, _, _ = G.chunk_logits(prep, 0, h.shape[0], [D, None, None])
    main, ent, _ = _compiled.rows_and_grad_(s, None, None, targets, None, spec)  # g=None: d main / ds
    return main, ent, D


def kept_grads(models, D, g_main, need):
    """``(dh, dW, db)`` from the kept unit gradient ``D`` and the upstream ``g_main [N]``: the logit
    gradient is ``g_main[:, None] * D``, so ``dW = D^T (g h)``, ``db = D^T g``, ``dh = g (D W)``
    (two GEMMs; ``g h`` lives in ``dh``'s buffer until ``dh`` overwrites it: no ``[N, V]`` temporary)."""
    hs, w = models[0], G.compute_weight(models[1])
    gm = g_main.to(D.dtype)[:, None]
    buf = hs.new_empty(hs.shape, dtype=D.dtype) if need[0] or need[1] else None
    dw = db = dh = None
    if need[1]:
        dw = torch.mm(D.T, torch.mul(hs.to(D.dtype), gm, out=buf))
    if need[2]:
        db = torch.mv(D.T, gm[:, 0])
    if need[0]:
        dh = torch.mm(D, w, out=buf).mul_(gm)
    return dh, dw, db


# ----------------------------------------------------------------------------- custom ops
def _need(models):
    return [bool(x is not None and x.requires_grad) for x in models[:3]]


def _cast_grads(models, grads, scale=None):
    """Gradients for (hs, ws, bs) in their own dtypes, optionally times a scalar upstream grad."""
    return [None if gx is None or x is None else (gx if scale is None else gx * scale).to(x.dtype)
            for x, gx in zip(models[:3], grads)]


def _to_op(grads, like):
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return tuple(like.new_empty(0, dtype=acc_dtype(like)) if x is None else x for x in grads)


def _from_op(grads):
    return [None if x.dim() == 1 and x.shape[0] == 0 else x for x in grads]


def _grad_fakes(hs, ws, need):
    shapes = (hs.shape, ws.shape, ws.shape[:1])
    return tuple(hs.new_empty(sh if n else (0,), dtype=acc_dtype(ws)) for sh, n in zip(shapes, need))


def _rows_impl(*xs):
    *models, targets, spec = xs
    main, ent, rs = fl_forward(backend(spec.impl), models, targets, spec)
    dt = acc_dtype(models[1])
    return main.to(dt), ent.to(dt), rs.to(dt)


def _rows_fake(hs, ws, *xs):
    N, dt = hs.shape[0], acc_dtype(ws)
    return hs.new_empty(N, dtype=dt), hs.new_empty(N, dtype=dt), hs.new_empty(N, 4, dtype=dt)


def _backward_impl(*xs):
    *models, targets, rs, g, need, spec = xs
    return _to_op(fl_backward(backend(spec.impl), models, targets, rs, g, spec, need), models[1])


def _loss_impl(*xs):
    *models, targets, g, need, spec = xs
    main, ent, grads = fl_loss_with_grads(backend(spec.impl), models, targets, g, spec, need)
    terms = torch.where(g[:, 0] != 0, g[:, 0] * main, 0.0)
    if spec.entropy:
        terms = terms + torch.where(g[:, 1] != 0, g[:, 1] * ent, 0.0)
    dt = acc_dtype(models[1])
    return (terms.sum().to(dt), main.to(dt), ent.to(dt), *_to_op(grads, models[1]))


def _loss_fake(hs, ws, *xs):
    need, N, dt = xs[-2], hs.shape[0], acc_dtype(ws)
    return (hs.new_empty((), dtype=dt), hs.new_empty(N, dtype=dt), hs.new_empty(N, dtype=dt),
            *_grad_fakes(hs, ws, need))


_MODELS = ("Tensor hs, Tensor ws, Tensor? bs, Tensor? ht, Tensor? wt, Tensor? bt, Tensor? hr, Tensor? wr, "
           "Tensor? br")
# fl_rows: (main, entropy, rs); its backward and fl_loss's gradients: (dh, dw, db), empty where not needed
fl_rows_op = SpecOp("opd_kernels::fl_rows", f"({_MODELS}, Tensor? targets, {SPEC}) -> (Tensor, Tensor, Tensor)",
                    _rows_impl, _rows_fake)
fl_rows_backward_op = SpecOp(
    "opd_kernels::fl_rows_backward",
    f"({_MODELS}, Tensor? targets, Tensor rs, Tensor g, bool[] need, {SPEC}) -> (Tensor, Tensor, Tensor)",
    _backward_impl, lambda hs, ws, *xs: _grad_fakes(hs, ws, xs[-2]))
# fl_loss: (loss, main, entropy, dh, dw, db)
fl_loss_op = SpecOp(
    "opd_kernels::fl_loss",
    f"({_MODELS}, Tensor? targets, Tensor g, bool[] need, {SPEC}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _loss_impl, _loss_fake)


def _rows_kept_impl(*xs):
    *models, targets, spec = xs
    return fl_forward_kept(models, targets, spec)


def _rows_kept_fake(hs, ws, *xs):
    N, dt = hs.shape[0], acc_dtype(ws)
    return hs.new_empty(N, dtype=dt), hs.new_empty(N, dtype=dt), hs.new_empty(N, ws.shape[0], dtype=G.compute_dtype(ws))


# fl_rows_kept: (main, entropy, D), D the kept [N, V] unit gradient; its backward: (dh, dw, db)
fl_rows_kept_op = SpecOp("opd_kernels::fl_rows_kept", f"({_MODELS}, Tensor? targets, {SPEC}) -> (Tensor, Tensor, Tensor)",
                         _rows_kept_impl, _rows_kept_fake)
fl_kept_backward_op = SpecOp(
    "opd_kernels::fl_kept_backward",
    f"(Tensor hs, Tensor ws, Tensor? bs, Tensor D, Tensor g_main, bool[] need, {SPEC}) -> (Tensor, Tensor, Tensor)",
    lambda hs, ws, bs, D, g, need, spec: _to_op(kept_grads((hs, ws, bs), D, g, need), ws),
    lambda hs, ws, bs, D, g, need, spec: _grad_fakes(hs, ws, need))


def _fl_rows_kept_setup(ctx, inputs, spec, output):
    ctx.save_for_backward(*inputs[:3], output[2])
    ctx.spec, ctx.need = spec, _need(inputs)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # else autograd zero-fills an [N, V] gradient for D


def _fl_rows_kept_bwd(ctx, g_main, _g_ent, _g_D):
    *inputs, D = ctx.saved_tensors
    g = torch.zeros(D.shape[0], dtype=D.dtype, device=D.device) if g_main is None else g_main
    return _cast_grads(inputs, _from_op(fl_kept_backward_op(*inputs, D, g, ctx.need, spec=ctx.spec)))


def _fl_rows_setup(ctx, inputs, spec, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.spec, ctx.need = spec, _need(inputs)


def _fl_rows_bwd(ctx, g_main, g_ent, _g_rs):
    *inputs, rs = ctx.saved_tensors
    grads = fl_rows_backward_op(*inputs, rs, upstream(g_main, g_ent, rs[:, 0]), ctx.need, spec=ctx.spec)
    return _cast_grads(inputs, _from_op(grads))


def _fl_loss_setup(ctx, inputs, spec, output):
    ctx.save_for_backward(*inputs[:3], *output[3:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient for every output, dW's [V, d] too


def _is_one(g: Tensor) -> bool:
    """Whether the scalar upstream gradient is exactly 1 (a plain ``loss.backward()``), read only
    where that is free: on CPU (no device sync) and outside a compiled region (no data-dependent
    branch in a traced backward). Then the gradients made in forward go back as they are: ``dW * 1``
    would allocate and write a fresh ``[V, d]`` copy (350 ms and +544 MB at V=151936, d=896, fp32,
    2-core EPYC, where the copy's page faults dominate)."""
    return g.device.type == "cpu" and not torch.compiler.is_compiling() and bool(g == 1)


def _fl_loss_bwd(ctx, g_loss, *_):
    saved = ctx.saved_tensors
    if g_loss is None:  # only the non-differentiable outputs reached backward
        return [None] * 3
    return _cast_grads(saved[:3], _from_op(saved[3:]), None if _is_one(g_loss) else g_loss)


fl_rows_op.register_autograd(_fl_rows_bwd, _fl_rows_setup)
fl_loss_op.register_autograd(_fl_loss_bwd, _fl_loss_setup)
fl_rows_kept_op.register_autograd(_fl_rows_kept_bwd, _fl_rows_kept_setup)


class _FusedRowsOverShards(torch.autograd.Function):
    """Fused-linear rows over a vocabulary shard of the lm_head (``process_group`` given);
    inputs ``(*models, targets, spec, group)``."""

    @staticmethod
    def forward(ctx, *inputs):
        *models, targets, spec, group = inputs
        be = backend(spec.impl)
        main, ent, rs = fl_forward(be, models, targets, spec, group)
        ctx.save_for_backward(*models, targets, rs)
        ctx.spec, ctx.group, ctx.need = spec, group, list(ctx.needs_input_grad[:3])
        ctx.mark_non_differentiable(rs)
        return main, ent, rs

    @staticmethod
    def backward(ctx, g_main, g_ent, _g_rs):
        *models, targets, rs = ctx.saved_tensors
        grads = fl_backward(backend(ctx.spec.impl), models, targets, rs, upstream(g_main, g_ent, rs[:, 0]),
                            ctx.spec, ctx.need, ctx.group)
        return pad_grads(len(ctx.needs_input_grad), _cast_grads(models, grads))


# ----------------------------------------------------------------------------- entry points
def fl_rows(models, targets, spec: RowSpec, group=None):
    """Per-row ``(main, entropy)`` fused with the lm_head; differentiable w.r.t. hs, ws, bs.
    ``targets`` are local ids (``parallel.Shard.local``)."""
    if group is not None:
        main, ent, _ = _FusedRowsOverShards.apply(*models, targets, spec, group)
    elif not torch.compiler.is_compiling() and decision(backend(spec.impl), models, spec)[0].keep:  # rule 4
        main, ent, _ = fl_rows_kept_op(*models, targets, spec=spec)
    else:
        main, ent, _ = fl_rows_op(*models, targets, spec=spec)
    return main, ent


def fl_loss(models, targets, g, spec: RowSpec):
    """``(sum_i g_i . (main_i, H_i), per-row main)`` with the gradients computed in forward."""
    need = _need(models) if torch.is_grad_enabled() else [False, False, False]
    loss, main, *_ = fl_loss_op(*models, targets, g, need, spec=spec)
    return loss, main


def log_normalizer(h, w, b, spec: RowSpec, group=None) -> Tensor:
    """``A = logsumexp(inv_temp * T_s(h @ w.T + b))`` per row (over all shards), differentiable;
    ``spec``: kind ``log_normalizer`` with the student's temperature, logit transform and chunk rows."""
    models = (h, w, b) + (None,) * (N_MODEL - 3)
    return fl_rows(models, None, spec, group)[0]
