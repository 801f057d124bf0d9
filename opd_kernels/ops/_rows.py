"""Logits-level row losses: backend primitives -> per-row values, differentiable w.r.t. ``s``.

Forward: ``row_stats`` (+ ``jsd_sums`` for JSD) -> ``_stats.finish`` -> ``row_outputs``;
backward: ``grad_logits``, which recomputes from the saved per-row ``rs = (A, B, C, H)``, so
nothing ``[N, V]`` is saved. Without a process group this is the custom op ``opd_kernels::rows``
(callers compile with ``torch.compile(fullgraph=True)``); with one, the same code runs in
``_RowsOverShards`` (a process group cannot cross the custom-op boundary).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import parallel
from .._chunks import row_ranges
from .._dispatch import backend
from . import _compiled
from ._decide import Decision, decide, logits_dtype
from .._stats import finish, row_outputs
from ._common import acc_dtype, row_slice
from ._spec import ROW_SPEC_SCHEMA as SPEC, RowSpec, SpecOp, pad_grads


def rows_from_stats(stats: Tensor, jsd_sums, spec: RowSpec, group=None):
    """``(main, entropy, rs)`` from local statistics; ``jsd_sums(AB)`` gives the local JSD sums."""
    rows = finish(parallel.merge_shards(stats, group))
    sums = None
    if spec.kind == "jsd":
        sums = parallel.all_reduce_sum(jsd_sums(torch.stack([rows.A, rows.B], -1)), group)
    return row_outputs(rows, spec.kind, spec.beta, sums)


def upstream(g_main, g_ent, like: Tensor) -> Tensor:
    """Per-row upstream coefficients ``[N, 2] = (g_main, g_ent)`` (0 for an unused output)."""
    g_main = torch.zeros_like(like) if g_main is None else g_main.to(like.dtype)
    g_ent = torch.zeros_like(like) if g_ent is None else g_ent.to(like.dtype)
    return torch.stack([g_main, g_ent], -1)


def decision(s, t, r, spec: RowSpec, group=None) -> Decision:
    """``_decide.decide`` for one call on logits ``s [N, V]`` (and ``t``, ``r``)."""
    return decide(spec.impl, s.device, logits_dtype(s, t, r), rows=s.shape[0], vocab=s.shape[1], kind=spec.kind,
                  group=group)


def rows_forward(be, s, t, r, targets, spec: RowSpec, group=None):
    stats = be.row_stats(s, t, r, targets, **spec.stats_kw(be))
    return rows_from_stats(stats, lambda AB: be.jsd_sums(s, t, AB, **spec.jsd_kw()), spec, group)


def rows_backward(be, s, t, r, targets, rs, g, spec: RowSpec, out=None):
    targets, g = spec.grad_inputs(targets, g)
    return be.grad_logits(s, t, r, targets, rs, g, out=out, **spec.grad_kw())


def _rows_impl(s, t, r, targets, spec):
    run = decision(s, t, r, spec)
    if run.compiled:  # row chunks through the compiled chunk math
        outs = [_compiled.rows(s[i:j], row_slice(t, i, j), row_slice(r, i, j), row_slice(targets, i, j), spec)
                for i, j in row_ranges(*s.shape)]
        return tuple(torch.cat(x) for x in zip(*outs))
    main, ent, rs = rows_forward(backend(run.backend), s, t, r, targets, spec)
    dt = acc_dtype(s)
    return main.to(dt), ent.to(dt), rs.to(dt)


def _backward_impl(s, t, r, targets, rs, g, spec):
    run = decision(s, t, r, spec)
    if not run.compiled:
        return rows_backward(backend(run.backend), s, t, r, targets, rs, g, spec)
    ds = torch.empty_like(s)
    for i, j in row_ranges(*s.shape):
        _compiled.grad(s[i:j], row_slice(t, i, j), row_slice(r, i, j), row_slice(targets, i, j), rs[i:j], g[i:j],
                       spec, out=ds[i:j])
    return ds


def _rows_fake(s, t, r, targets, spec):
    N, dt = s.shape[0], acc_dtype(s)
    return s.new_empty(N, dtype=dt), s.new_empty(N, dtype=dt), s.new_empty(N, 4, dtype=dt)


# returns (main, entropy, rs); the backward returns ds
rows_op = SpecOp("opd_kernels::rows",
                 f"(Tensor s, Tensor? t, Tensor? r, Tensor? targets, {SPEC}) -> (Tensor, Tensor, Tensor)",
                 _rows_impl, _rows_fake)
rows_backward_op = SpecOp(
    "opd_kernels::rows_backward",
    f"(Tensor s, Tensor? t, Tensor? r, Tensor? targets, Tensor rs, Tensor g, {SPEC}) -> Tensor",
    _backward_impl, lambda s, *_: torch.empty_like(s))


def _rows_setup(ctx, inputs, spec, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.spec = spec


def _rows_bwd(ctx, g_main, g_ent, _g_rs):
    *inputs, rs = ctx.saved_tensors
    return (rows_backward_op(*inputs, rs, upstream(g_main, g_ent, rs[:, 0]), spec=ctx.spec),)


rows_op.register_autograd(_rows_bwd, _rows_setup)


class _RowsOverShards(torch.autograd.Function):
    """Logits-level rows over a vocabulary shard (``process_group`` given)."""

    @staticmethod
    def forward(ctx, s, t, r, targets, spec, group):
        be = backend(decision(s, t, r, spec, group).backend)
        main, ent, rs = rows_forward(be, s, t, r, targets, spec, group)
        ctx.save_for_backward(s, t, r, targets, rs)
        ctx.spec, ctx.group = spec, group
        ctx.mark_non_differentiable(rs)
        return main, ent, rs

    @staticmethod
    def backward(ctx, g_main, g_ent, _g_rs):
        s, t, r, targets, rs = ctx.saved_tensors
        be = backend(decision(s, t, r, ctx.spec, ctx.group).backend)
        ds = rows_backward(be, s, t, r, targets, rs, upstream(g_main, g_ent, rs[:, 0]), ctx.spec)
        return pad_grads(len(ctx.needs_input_grad), [ds])


def rows(s, t, r, targets, spec: RowSpec, group=None):
    """Per-row ``(main, entropy)`` on logits ``[N, V]``; differentiable w.r.t. ``s`` only.
    ``targets`` are local ids (``parallel.Shard.local``)."""
    if group is not None:
        main, ent, _ = _RowsOverShards.apply(s, t, r, targets, spec, group)
    else:
        main, ent, _ = rows_op(s, t, r, targets, spec=spec)
    return main, ent


def log_normalizer(s, spec: RowSpec, group=None) -> Tensor:
    """``A = logsumexp(inv_temp * T_s(s))`` per row (over all shards), differentiable (``dA/da = q``);
    ``spec``: kind ``log_normalizer`` with the student's temperature and logit transform."""
    return rows(s, None, None, None, spec, group)[0]
