"""Row-loss engine shared by every op family: backend primitives -> per-row values -> autograd.

Two levels, one recipe:

* logits level: ``row_stats`` (+ ``jsd_sums``) in forward, ``grad_logits`` in backward, which
  recomputes from the saved per-row ``rs = (A, B, C, H)``; nothing ``[N, V]`` is saved.
* fused with the lm_head: the backend's ``fused_*`` kernels when it has them, otherwise row
  chunks ``h[c] @ W.T`` sized so each transient ``[c, V]`` fp32 buffer stays near
  ``OPD_CHUNK_BYTES``, fed to the same logits-level primitives. For scalar reductions without
  a process group (``fl_loss``) the gradients are computed during forward, chunk by chunk,
  and scaled by ``grad_output`` in backward (Liger's trick): 4 GEMM passes, like the naive
  loss, instead of 6 with recomputation.

The entry points are ``torch.library.custom_op``s (so callers compile with
``torch.compile(fullgraph=True)``); with a ``process_group`` the same code runs inside a plain
``autograd.Function`` because a process group cannot cross the custom-op boundary.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._stats import all_reduce_sum, finish, merge_shards
from ..backends import torch_backend


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation/output dtype: float64 stays float64 (the oracle), everything else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _be(impl: str):
    return _dispatch._load(impl)[0] if impl != "torch" else torch_backend


# ----------------------------------------------------------------------------- shared math
def _rows_from_stats(stats, jsd, kind, beta, group):
    """(main, entropy, rs) from local stats; ``jsd(AB)`` computes the local JSD sums."""
    rows = finish(merge_shards(stats, group))
    C = torch.zeros_like(rows.A)
    if kind == "logprob":
        main = rows.logprob
    elif kind == "forward_kl":
        main = rows.forward_kl
    elif kind == "reverse_kl":
        main = C = rows.reverse_kl
    else:  # jsd, 0 < beta < 1
        sums = all_reduce_sum(jsd(torch.stack([rows.A, rows.B], -1)), group)
        main, C = beta * sums[:, 0] + (1.0 - beta) * sums[:, 1], sums[:, 1]
    return main, rows.entropy, torch.stack([rows.A, rows.B, C, rows.entropy], -1)


def _hints(be, kind, entropy):
    """Which statistics the op needs, for backends that can skip the others (torch)."""
    if not getattr(be, "ACCEPTS_NEED", False):
        return {}
    return {"need": be.NEED["logprob+entropy" if kind == "logprob" and entropy else kind]}


def _kw(kind, inv_temp, lam, beta, vocab_start):
    return dict(kind=kind, inv_temp=inv_temp, lam=lam, beta=beta, vocab_start=vocab_start)


# ----------------------------------------------------------------------------- logits level
def rows_forward(be, s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy=True, group=None):
    stats = be.row_stats(s, t, r, targets, inv_temp=inv_temp, lam=lam, vocab_start=vocab_start,
                         **_hints(be, kind, entropy))
    return _rows_from_stats(stats, lambda AB: be.jsd_sums(s, t, AB, inv_temp=inv_temp, beta=beta),
                            kind, beta, group)


def rows_backward(be, s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy):
    return be.grad_logits(s, t, r, targets, rs, g, **_kw(kind, inv_temp, lam, beta, vocab_start),
                          with_entropy=entropy)


@torch.library.custom_op("opd_kernels::rows", mutates_args=())
def rows_op(s: Tensor, t: Optional[Tensor], r: Optional[Tensor], targets: Optional[Tensor], kind: str,
            inv_temp: float, lam: float, beta: float, vocab_start: int, entropy: bool,
            impl: str) -> tuple[Tensor, Tensor, Tensor]:
    main, ent, rs = rows_forward(_be(impl), s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy)
    return main.to(_acc(s)), ent.to(_acc(s)), rs.to(_acc(s))


@rows_op.register_fake
def _(s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, impl):
    N, dt = s.shape[0], _acc(s)
    return s.new_empty(N, dtype=dt), s.new_empty(N, dtype=dt), s.new_empty(N, 4, dtype=dt)


@torch.library.custom_op("opd_kernels::rows_backward", mutates_args=())
def rows_backward_op(s: Tensor, t: Optional[Tensor], r: Optional[Tensor], targets: Optional[Tensor],
                     rs: Tensor, g: Tensor, kind: str, inv_temp: float, lam: float, beta: float,
                     vocab_start: int, entropy: bool, impl: str) -> Tensor:
    return rows_backward(_be(impl), s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy)


@rows_backward_op.register_fake
def _(s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy, impl):
    return torch.empty_like(s)


def _upstream(g_main, g_ent, like):
    g_main = torch.zeros_like(like) if g_main is None else g_main.to(like.dtype)
    g_ent = torch.zeros_like(like) if g_ent is None else g_ent.to(like.dtype)
    return torch.stack([g_main, g_ent], -1)


def _rows_setup(ctx, inputs, output):
    s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, impl = inputs
    ctx.save_for_backward(s, t, r, targets, output[2])
    ctx.cfg = (kind, inv_temp, lam, beta, vocab_start, entropy, impl)


def _rows_bwd(ctx, g_main, g_ent, _g_rs):
    s, t, r, targets, rs = ctx.saved_tensors
    kind, inv_temp, lam, beta, vocab_start, entropy, impl = ctx.cfg
    g = _upstream(g_main, g_ent, rs[:, 0])
    ds = rows_backward_op(s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy, impl)
    return (ds,) + (None,) * 10


rows_op.register_autograd(_rows_bwd, setup_context=_rows_setup)


class RowsPG(torch.autograd.Function):
    """Logits-level rows over a vocabulary shard (``process_group`` given)."""

    @staticmethod
    def forward(ctx, s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, impl, group):
        be = _be(impl)
        main, ent, rs = rows_forward(be, s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, group)
        ctx.save_for_backward(s, t, r, targets, rs)
        ctx.cfg = (be, kind, inv_temp, lam, beta, vocab_start, entropy)
        ctx.mark_non_differentiable(rs)
        return main, ent, rs

    @staticmethod
    def backward(ctx, g_main, g_ent, _g_rs):
        s, t, r, targets, rs = ctx.saved_tensors
        be, kind, inv_temp, lam, beta, vocab_start, entropy = ctx.cfg
        g = _upstream(g_main, g_ent, rs[:, 0])
        return (rows_backward(be, s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy),) \
            + (None,) * 11


def rows(s, t, r, targets, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0, entropy=False,
         impl="torch", group=None):
    """Per-row (main, entropy) on logits; differentiable w.r.t. ``s`` only."""
    if group is not None:
        main, ent, _ = RowsPG.apply(s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, impl, group)
    else:
        main, ent, _ = rows_op(s, t, r, targets, kind, inv_temp, lam, beta, vocab_start, entropy, impl)
    return main, ent


# ----------------------------------------------------------------------------- fused with lm_head
def _prep(w: Optional[Tensor]) -> Optional[Tensor]:
    """Weight in its compute dtype, converted once per call (CPU has no fast bf16/fp16 GEMM)."""
    if w is None or w.dtype in (torch.float32, torch.float64) or w.device.type != "cpu":
        return w
    return w.float()


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    x = h.to(w.dtype) @ w.T
    if b is not None:
        x = x + b.to(x.dtype)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunks(N: int, V: int, chunk: int = 0):
    step = chunk if chunk > 0 else torch_backend.rows_per_chunk(V)
    return [(i, min(N, i + step)) for i in range(0, N, step)]


def _chunk_logits(models, i, j):
    """Student, teacher, reference logits of rows ``i:j`` (None where a model is absent)."""
    return [None if h is None else _logits(h[i:j], w, b) for h, w, b in models]


def _split(args):
    """(hs, ws, bs, ht, wt, bt, hr, wr, br) -> three (h, w, b) triples."""
    return [tuple(args[k:k + 3]) for k in (0, 3, 6)]


def _prepared(args):
    return [(h, _prep(w), b) for h, w, b in _split(args)]


def fl_forward(be, args, targets, kind, inv_temp, lam, beta, vocab_start, chunk=0, entropy=True, group=None):
    """Per-row (main, entropy, rs) for the fused-linear ops; ``args`` = (hs, ws, bs, ht, ..., br)."""
    kw = dict(inv_temp=inv_temp, lam=lam, vocab_start=vocab_start)
    if hasattr(be, "fused_row_stats"):
        stats = be.fused_row_stats(*args, targets, **kw)
        return _rows_from_stats(stats, lambda AB: be.fused_jsd_sums(*args[:6], AB, inv_temp=inv_temp, beta=beta),
                                kind, beta, group)
    models = _prepared(args)
    N, V = args[0].shape[0], args[1].shape[0]
    parts = []
    for i, j in _chunks(N, V, chunk):
        s, t, r = _chunk_logits(models, i, j)
        parts.append(be.row_stats(s, t, r, None if targets is None else targets[i:j], **kw,
                                  **_hints(be, kind, entropy)))
    stats = torch.cat(parts) if parts else args[0].new_zeros(0, 8, dtype=torch.float32)

    def jsd(AB):  # second pass: recompute the logits chunk by chunk
        out = [AB.new_zeros(0, 2)]
        for i, j in _chunks(N, V, chunk):
            s, t = _chunk_logits(models[:2], i, j)
            out.append(be.jsd_sums(s, t, AB[i:j], inv_temp=inv_temp, beta=beta))
        return torch.cat(out)

    return _rows_from_stats(stats, jsd, kind, beta, group)


def _grad_buffers(args, need):
    hs, ws, bs = args[:3]
    acc = torch.float64 if ws.dtype == torch.float64 else torch.float32
    dh = hs.new_zeros(hs.shape, dtype=acc) if need[0] else None
    dw = ws.new_zeros(ws.shape, dtype=acc) if need[1] else None
    db = ws.new_zeros(ws.shape[0], dtype=acc) if need[2] else None
    return dh, dw, db


def _accumulate(gs, h, w, i, j, bufs):
    """dh[i:j] = gs @ W; dW += gs^T h; db += sum(gs) for one chunk of logit gradients."""
    dh, dw, db = bufs
    if db is not None:
        db += gs.sum(0, dtype=db.dtype)
    gs = gs.to(w.dtype)  # GEMMs in the weight's dtype (bf16 on GPU), accumulated in fp32
    if dh is not None:
        dh[i:j] = gs @ w
    if dw is not None:
        if dw.dtype == w.dtype:
            dw.addmm_(gs.T, h[i:j].to(w.dtype))
        else:
            dw += (gs.T @ h[i:j].to(w.dtype)).to(dw.dtype)


def fl_backward(be, args, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy, need, chunk=0,
                group=None):
    """(dh, dw, db) in fp32 (None where not needed) for upstream per-row coefficients ``g``."""
    kw = dict(_kw(kind, inv_temp, lam, beta, vocab_start), with_entropy=entropy)
    if hasattr(be, "fused_grad"):
        dh, dw, db = be.fused_grad(*args, targets, rs, g, need_dw=need[1], need_db=need[2], **kw)
    else:
        models = _prepared(args)
        bufs = _grad_buffers(args, need)
        N, V = args[0].shape[0], args[1].shape[0]
        for i, j in _chunks(N, V, chunk):
            s, t, r = _chunk_logits(models, i, j)
            tg = None if targets is None else targets[i:j]
            gs = be.grad_logits(s, t, r, tg, rs[i:j], g[i:j], out=s, **kw)
            _accumulate(gs, args[0], models[0][1], i, j, bufs)
        dh, dw, db = bufs
    if group is not None and dh is not None:
        all_reduce_sum(dh, group)  # every rank holds a vocab shard's share of dL/dh
    return dh, dw, db


def fl_loss_with_grads(be, args, targets, g, kind, inv_temp, lam, beta, vocab_start, entropy, need, chunk=0):
    """Scalar loss sum_i g_i . (main_i, H_i) and its gradients, in one pass over the chunks."""
    if hasattr(be, "fused_grad"):
        main, ent, rs = fl_forward(be, args, targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy)
        grads = fl_backward(be, args, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy, need) \
            if any(need) else (None, None, None)
        return main, ent, grads
    models = _prepared(args)
    bufs = _grad_buffers(args, need)
    N, V = args[0].shape[0], args[1].shape[0]
    mains, ents = [], []
    for i, j in _chunks(N, V, chunk):
        s, t, r = _chunk_logits(models, i, j)
        tg = None if targets is None else targets[i:j]
        main, ent, rs = rows_forward(be, s, t, r, tg, kind, inv_temp, lam, beta, vocab_start, entropy)
        mains.append(main), ents.append(ent)
        if any(need):
            gs = be.grad_logits(s, t, r, tg, rs, g[i:j], out=s, with_entropy=entropy,
                                **_kw(kind, inv_temp, lam, beta, vocab_start))
            _accumulate(gs, args[0], models[0][1], i, j, bufs)
    cat = (lambda xs: torch.cat(xs)) if mains else (lambda xs: g.new_zeros(0))
    return cat(mains), cat(ents), bufs


_FL_SIG = ("hs", "ws", "bs", "ht", "wt", "bt", "hr", "wr", "br")


def _none_if_empty(x: Tensor) -> Optional[Tensor]:
    return None if x.numel() == 0 and x.dim() == 1 and x.shape[0] == 0 else x


def _cast_grads(args, grads, scale=None):
    """Gradients for (hs, ws, bs) in their own dtypes, optionally times a scalar upstream grad."""
    out = []
    for x, gx in zip(args[:3], grads):
        if gx is None or x is None:
            out.append(None)
            continue
        out.append((gx if scale is None else gx * scale).to(x.dtype))
    return out


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=_acc(like)) if x is None else x


@torch.library.custom_op("opd_kernels::fl_rows", mutates_args=())
def fl_rows_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], wt: Optional[Tensor],
               bt: Optional[Tensor], hr: Optional[Tensor], wr: Optional[Tensor], br: Optional[Tensor],
               targets: Optional[Tensor], kind: str, inv_temp: float, lam: float, beta: float,
               vocab_start: int, chunk: int, entropy: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    args = (hs, ws, bs, ht, wt, bt, hr, wr, br)
    main, ent, rs = fl_forward(_be(impl), args, targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy)
    return main.to(_acc(ws)), ent.to(_acc(ws)), rs.to(_acc(ws))


@fl_rows_op.register_fake
def _(hs, ws, *rest):
    N, dt = hs.shape[0], _acc(ws)
    return hs.new_empty(N, dtype=dt), hs.new_empty(N, dtype=dt), hs.new_empty(N, 4, dtype=dt)


@torch.library.custom_op("opd_kernels::fl_rows_backward", mutates_args=())
def fl_rows_backward_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor],
                        wt: Optional[Tensor], bt: Optional[Tensor], hr: Optional[Tensor],
                        wr: Optional[Tensor], br: Optional[Tensor], targets: Optional[Tensor], rs: Tensor,
                        g: Tensor, kind: str, inv_temp: float, lam: float, beta: float, vocab_start: int,
                        chunk: int, entropy: bool, impl: str, need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    args = (hs, ws, bs, ht, wt, bt, hr, wr, br)
    grads = fl_backward(_be(impl), args, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy, need,
                        chunk)
    return tuple(_empty_if_none(x, ws) for x in grads)


@fl_rows_backward_op.register_fake
def _(hs, ws, bs, *rest):
    need = rest[-1]
    shapes = (hs.shape, ws.shape, ws.shape[:1])
    return tuple(hs.new_empty(sh if n else (0,), dtype=_acc(ws)) for sh, n in zip(shapes, need))


def _need(args):
    hs, ws, bs = args[:3]
    return [bool(x is not None and x.requires_grad) for x in (hs, ws, bs)]


def _fl_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], output[2])
    ctx.cfg = inputs[10:]
    ctx.need = _need(inputs[:9])


def _fl_rows_bwd(ctx, g_main, g_ent, _g_rs):
    *saved, rs = ctx.saved_tensors
    args, targets = tuple(saved[:9]), saved[9]
    g = _upstream(g_main, g_ent, rs[:, 0])
    grads = fl_rows_backward_op(*args, targets, rs, g, *ctx.cfg, ctx.need)
    grads = _cast_grads(args, [_none_if_empty(x) for x in grads])
    return (*grads,) + (None,) * 15


fl_rows_op.register_autograd(_fl_rows_bwd, setup_context=_fl_rows_setup)


@torch.library.custom_op("opd_kernels::fl_loss", mutates_args=())
def fl_loss_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Optional[Tensor], wt: Optional[Tensor],
               bt: Optional[Tensor], hr: Optional[Tensor], wr: Optional[Tensor], br: Optional[Tensor],
               targets: Optional[Tensor], g: Tensor, kind: str, inv_temp: float, lam: float, beta: float,
               vocab_start: int, chunk: int, entropy: bool, impl: str,
               need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (hs, ws, bs, ht, wt, bt, hr, wr, br)
    main, ent, grads = fl_loss_with_grads(_be(impl), args, targets, g, kind, inv_temp, lam, beta,
                                          vocab_start, entropy, need, chunk)
    terms = torch.where(g[:, 0] != 0, g[:, 0] * main, 0.0)
    if entropy:
        terms = terms + torch.where(g[:, 1] != 0, g[:, 1] * ent, 0.0)
    dt = _acc(ws)
    return (terms.sum().to(dt), main.to(dt), ent.to(dt), *(_empty_if_none(x, ws) for x in grads))


@fl_loss_op.register_fake
def _(hs, ws, *rest):
    need, N, dt = rest[-1], hs.shape[0], _acc(ws)
    shapes = (hs.shape, ws.shape, ws.shape[:1])
    return (hs.new_empty((), dtype=dt), hs.new_empty(N, dtype=dt), hs.new_empty(N, dtype=dt),
            *(hs.new_empty(sh if n else (0,), dtype=dt) for sh, n in zip(shapes, need)))


def _fl_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output[3:])
    ctx.mark_non_differentiable(*output[1:])


def _fl_loss_bwd(ctx, g_loss, *_):
    hs, ws, bs, dh, dw, db = ctx.saved_tensors
    grads = _cast_grads((hs, ws, bs), [_none_if_empty(x) for x in (dh, dw, db)], g_loss)
    return (*grads,) + (None,) * 17


fl_loss_op.register_autograd(_fl_loss_bwd, setup_context=_fl_loss_setup)


class FLRowsPG(torch.autograd.Function):
    """Fused-linear rows over a vocabulary shard of the lm_head (``process_group`` given)."""

    @staticmethod
    def forward(ctx, targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy, impl, group, *args):
        be = _be(impl)
        main, ent, rs = fl_forward(be, args, targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy, group)
        ctx.save_for_backward(targets, rs, *args)
        ctx.cfg = (be, kind, inv_temp, lam, beta, vocab_start, entropy, chunk, group)
        ctx.need = [ctx.needs_input_grad[10 + k] for k in range(3)]
        ctx.mark_non_differentiable(rs)
        return main, ent, rs

    @staticmethod
    def backward(ctx, g_main, g_ent, _g_rs):
        targets, rs, *args = ctx.saved_tensors
        be, kind, inv_temp, lam, beta, vocab_start, entropy, chunk, group = ctx.cfg
        g = _upstream(g_main, g_ent, rs[:, 0])
        grads = fl_backward(be, args, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, entropy,
                            ctx.need, chunk, group)
        return (None,) * 10 + tuple(_cast_grads(args, grads)) + (None,) * 6


def fl_rows(args, targets, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0, chunk=0, entropy=False,
            impl="torch", group=None):
    """Per-row (main, entropy) fused with the lm_head; differentiable w.r.t. hs, ws, bs."""
    if group is not None:
        main, ent, _ = FLRowsPG.apply(targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy, impl, group,
                                      *args)
    else:
        main, ent, _ = fl_rows_op(*args, targets, kind, inv_temp, lam, beta, vocab_start, chunk, entropy, impl)
    return main, ent


def fl_loss(args, targets, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0, chunk=0, entropy=False,
            impl="torch"):
    """(scalar loss = sum_i g_i . (main_i, H_i), per-row main) with gradients computed in forward."""
    need = _need(args) if torch.is_grad_enabled() else [False, False, False]
    loss, main, *_ = fl_loss_op(*args, targets, g, kind, inv_temp, lam, beta, vocab_start, chunk, entropy, impl,
                                need)
    return loss, main
