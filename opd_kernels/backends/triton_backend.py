"""Triton backend: launchers for the kernels in ``opd_kernels.triton`` (contract: ``backends``).

Each primitive is a ``plan_*`` function and a launcher that runs its plan. The plan checks
layouts (last dim contiguous, int64-safe row strides), picks block sizes with the heuristics of
``backends/triton_plan.py`` per (N, V, d, dtype) -- passed as ``tl.constexpr`` --, allocates the
outputs and returns every launch (kernel, grid, arguments, constexprs, warps/stages) without
launching. ``sms=`` plans for a CUDA device with that many SMs whatever the tensors' device
(``meta`` tensors included), which is how ``python -m opd_kernels.triton.aot`` lists the variants
a GPU would compile. Launches never sync the host. ``OPD_TRITON_AUTOTUNE=1`` (read at import)
autotunes the fused-linear kernels over a few configs instead (keyed on V and the hidden sizes,
not on N).

Logit transforms (``tf_s``/``tf_t``/``tf_r``, see ``opd_kernels.backends``) reach the kernels as
runtime ``pre_*``/``post_*`` floats (``transform_consts``) plus constexpr
``HAS_CAP_*`` flags, set only for a model that is present and capped, so uncapped calls launch
the specialisations that have no transform code.

Runs on CUDA tensors, or on CPU tensors in the Triton interpreter when ``TRITON_INTERPRET=1``
was set before triton was first imported (tests on machines without a GPU).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Optional

import torch

from .._stats import rebase
from . import IDENTITY, N_STATS, STAT_M_A, STAT_M_B, transform_consts
from .triton_plan import Launch, Plan, fused_config, logits_config, vocab_splits

try:
    import triton

    from ..triton.fused_linear import (fused_grad_dh_kernel, fused_grad_dw_kernel, fused_jsd_sums_kernel,
                                       fused_row_stats_kernel)
    from ..triton.grad import KIND_IDS, grad_logits_kernel
    from ..triton.jsd import jsd_sums_kernel
    from ..triton.stats import row_stats_kernel
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any failure means "backend unavailable, with reason"
    triton = None
    _IMPORT_ERROR = exc

NAME = "triton"


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def _interpreted() -> bool:
    """True when the kernels *and* triton.language's own @jit helpers (tl.sum, tl.cdiv, ...)
    were defined under TRITON_INTERPRET=1, i.e. the kernels can run on CPU tensors."""
    return _is_interpreted(row_stats_kernel) and _is_interpreted(triton.language.cdiv)


def available():
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    if _interpreted():
        return True, ""
    if _is_interpreted(row_stats_kernel) or _is_interpreted(triton.language.cdiv):
        return False, ("TRITON_INTERPRET=1 was set after triton was first imported; set it before "
                       "anything imports triton (e.g. at the top of conftest.py)")
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"


# ----------------------------------------------------------------------------- plans and launches
@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device, sms: Optional[int]) -> int:
    """SMs to plan the vocabulary splits for: ``sms`` when given, the device's on CUDA, else 0."""
    if sms is not None:
        return int(sms)
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _n_splits(row_blocks: int, n_tiles: int, sms: int) -> int:
    """Vocabulary splits of one launch (``triton_plan.vocab_splits``; tests replace this to
    force splits under the interpreter)."""
    return vocab_splits(row_blocks, n_tiles, sms)


def _precision(*weights) -> str:
    """fp32 dots follow torch's matmul setting: full fp32 ("ieee") unless TF32 is allowed.

    Only fp32 operands are affected; bf16/fp16 dots always run on tensor cores.
    """
    fp32 = any(w is not None and w.dtype == torch.float32 for w in weights)
    if fp32 and (_interpreted() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


AUTOTUNE = os.environ.get("OPD_TRITON_AUTOTUNE", "0") == "1" and triton is not None


def _autotuned(kernel, key, reset=None):
    if not AUTOTUNE or _interpreted():
        return None
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bn, bv, bk, w, st in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                                         (128, 64, 64, 4, 4), (64, 128, 32, 4, 4), (32, 64, 32, 4, 2)]]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(kernel)


if triton is not None:
    _TUNED = {
        fused_row_stats_kernel: _autotuned(fused_row_stats_kernel, ["V", "DS", "DT", "DR"]),
        fused_jsd_sums_kernel: _autotuned(fused_jsd_sums_kernel, ["V", "DS", "DT"]),
        fused_grad_dh_kernel: _autotuned(fused_grad_dh_kernel, ["V", "DS", "DT", "DR"], reset=["dh_ptr"]),
        fused_grad_dw_kernel: _autotuned(fused_grad_dw_kernel, ["V", "DS", "DT", "DR"],
                                         reset=["dw_ptr", "db_ptr"]),
    }


def _logits_launch(kernel, cfg, row_blocks, splits, args, constexprs) -> Launch:
    return Launch(kernel, (row_blocks, splits), args,
                  dict(constexprs, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v), dict(num_warps=cfg.num_warps))


def _fused_launch(kernel, cfg, grid_for, args, constexprs) -> Launch:
    """A fused kernel's launch; with ``OPD_TRITON_AUTOTUNE=1`` its autotuned twin runs instead."""
    return Launch(kernel, grid_for(cfg.block_n, cfg.block_v), args,
                  dict(constexprs, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k),
                  dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), _TUNED[kernel], grid_for)


# ------------------------------------------------------------------------------------- helpers
def _last_dim_contiguous(x: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """2-D view whose last dim is contiguous (row stride arbitrary, e.g. a ``vocab_size`` slice)."""
    if x is None:
        return None
    if x.dim() != 2:
        raise ValueError(f"triton backend: {name} must be 2-D, got shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _contiguous_or_none(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _fp32_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _merge_splits(per_split: torch.Tensor) -> torch.Tensor:
    """[splits, N, 8] per-split row stats -> [N, 8], merged like vocab shards (no host sync):
    each split's sums are rebased onto the row maxima over splits, then added."""
    if per_split.shape[0] == 1:
        return per_split[0]
    m_a, m_b = per_split[:, :, STAT_M_A].amax(0), per_split[:, :, STAT_M_B].amax(0)
    out = rebase(per_split, m_a, m_b).sum(0)
    out[:, STAT_M_A], out[:, STAT_M_B] = m_a, m_b
    return out


def _transforms(tfs: dict, present: dict):
    """Kernel arguments of the logit transforms: ((pre_s, post_s, pre_t, ...), {HAS_CAP_S: ...}).

    ``tfs`` maps "s"/"t"/"r" to (scale, cap); absent models get a flag of False (their constants
    are still checked and passed, never read)."""
    args, flags = [], {}
    for m, tf in tfs.items():
        k = transform_consts(tf, f"tf_{m}")
        args += [k.pre, k.post]
        flags[f"HAS_CAP_{m.upper()}"] = bool(k.capped and present[m])
    return tuple(args), flags


def _log_betas(beta: float) -> tuple[float, float]:
    """log(beta), log(1 - beta) for the JSD mixture (only used with 0 < beta < 1)."""
    return (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)


def _check_kind(kind):
    if kind not in KIND_IDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(KIND_IDS)}")


# --------------------------------------------------------------------------- logits level
def plan_row_stats(s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0, tf_s=IDENTITY, tf_t=IDENTITY,
                   tf_r=IDENTITY, sms=None) -> Plan:
    """Outputs: the per-split stats ``[splits, N, 8]`` (``row_stats`` merges them)."""
    s, t, r = (_last_dim_contiguous(x, n) for x, n in ((s, "s"), (t, "t"), (r, "r")))
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t, r=tf_r), dict(s=True, t=t is not None, r=r is not None))
    N, V = s.shape
    cfg = logits_config(N, V, s.dtype.itemsize, reduction=True, interpreted=_interpreted())
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), _device_sms(s.device, sms))
    per_split = torch.empty(splits, N, N_STATS, dtype=torch.float32, device=s.device)
    targets = _contiguous_or_none(targets)
    args = (s, s if t is None else t, s if r is None else r, s if targets is None else targets, per_split,
            N, V, s.stride(0), 0 if t is None else t.stride(0), 0 if r is None else r.stride(0),
            float(inv_temp), *tfa, float(lam), int(vocab_start), splits)
    flags = dict(HAS_T=t is not None, HAS_R=r is not None, HAS_Y=targets is not None, **caps)
    return Plan((_logits_launch(row_stats_kernel, cfg, row_blocks, splits, args, flags),), (per_split,))


def row_stats(s, t, r, targets, **kw):
    """Runs ``plan_row_stats`` (same arguments) and merges the splits: ``[N, 8]``."""
    return _merge_splits(plan_row_stats(s, t, r, targets, **kw).run()[0])


def plan_jsd_sums(s, t, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY, sms=None) -> Plan:
    """Outputs: the per-split sums ``[splits, N, 2]`` (``jsd_sums`` adds them)."""
    s, t = _last_dim_contiguous(s, "s"), _last_dim_contiguous(t, "t")
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t), dict(s=True, t=True))
    N, V = s.shape
    cfg = logits_config(N, V, s.dtype.itemsize, reduction=True, interpreted=_interpreted())
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), _device_sms(s.device, sms))
    per_split = torch.empty(splits, N, 2, dtype=torch.float32, device=s.device)
    log_beta, log_1m_beta = _log_betas(beta)
    args = (s, t, _fp32_contiguous(AB), per_split, N, V, s.stride(0), t.stride(0), float(inv_temp), *tfa,
            log_beta, log_1m_beta, splits)
    return Plan((_logits_launch(jsd_sums_kernel, cfg, row_blocks, splits, args, caps),), (per_split,))


def jsd_sums(s, t, AB, **kw):
    """Runs ``plan_jsd_sums`` (same arguments) and adds the splits: ``[N, 2]``."""
    return plan_jsd_sums(s, t, AB, **kw).run()[0].sum(0)


def plan_grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                     out=None, with_entropy=False, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY,
                     sms=None) -> Plan:
    """Outputs: ``(ds,)`` (``out`` when given)."""
    _check_kind(kind)
    s, t, r = (_last_dim_contiguous(x, n) for x, n in ((s, "s"), (t, "t"), (r, "r")))
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t, r=tf_r), dict(s=True, t=t is not None, r=r is not None))
    N, V = s.shape
    if out is None:
        out = torch.empty_like(s)
    elif out.shape != s.shape or out.stride(1) != 1:
        raise ValueError(f"triton backend: out must be {tuple(s.shape)} with a contiguous last dim, "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    cfg = logits_config(N, V, s.dtype.itemsize, interpreted=_interpreted())
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), _device_sms(s.device, sms))
    log_beta, log_1m_beta = _log_betas(beta)
    targets = _contiguous_or_none(targets)
    args = (s, s if t is None else t, s if r is None else r, s if targets is None else targets,
            _fp32_contiguous(rs), _fp32_contiguous(g), out, N, V, s.stride(0), 0 if t is None else t.stride(0),
            0 if r is None else r.stride(0), out.stride(0), float(inv_temp), *tfa, float(lam), float(beta),
            log_beta, log_1m_beta, int(vocab_start), splits)
    flags = dict(KIND=KIND_IDS[kind], HAS_T=t is not None, HAS_R=r is not None,
                 HAS_Y=targets is not None, HAS_ENT=bool(with_entropy), **caps)
    return Plan((_logits_launch(grad_logits_kernel, cfg, row_blocks, splits, args, flags),), (out,))


def grad_logits(s, t, r, targets, rs, g, **kw):
    """Runs ``plan_grad_logits`` (same arguments): ``ds`` in ``s.dtype`` (into ``out`` when given;
    ``out`` may be ``s`` for an in-place backward). ``with_entropy`` adds ``g_ent * dH/da`` (as in
    the torch backend; False skips that work)."""
    return plan_grad_logits(s, t, r, targets, rs, g, **kw).run()[0]


# ----------------------------------------------------------------------- fused with lm_head
def _model(h, w, b, name):
    """(hidden, weight, bias) with contiguous last dims; the dims are checked against each other."""
    if h is None:
        return None, None, None
    h, w = _last_dim_contiguous(h, f"{name} hidden"), _last_dim_contiguous(w, f"{name} weight")
    if h.shape[1] != w.shape[1]:
        raise ValueError(f"triton backend: {name} hidden {tuple(h.shape)} and weight "
                         f"{tuple(w.shape)} disagree on the hidden size")
    return h, w, _contiguous_or_none(b)


def _fused_operands(hs, ws, bs, ht, wt, bt, hr, wr, br):
    """Kernel pointer/size/stride arguments; absent models get dummies (never dereferenced)."""
    hs, ws, bs = _model(hs, ws, bs, "student")
    ht, wt, bt = _model(ht, wt, bt, "teacher")
    hr, wr, br = _model(hr, wr, br, "reference")
    dummy = hs
    ptrs = [x if x is not None else dummy for x in (hs, ws, bs, ht, wt, bt, hr, wr, br)]
    dims = [hs.shape[1], 0 if ht is None else ht.shape[1], 0 if hr is None else hr.shape[1]]
    strides = [hs.stride(0), ws.stride(0), 0 if ht is None else ht.stride(0),
               0 if wt is None else wt.stride(0), 0 if hr is None else hr.stride(0),
               0 if wr is None else wr.stride(0)]
    flags = dict(HAS_T=ht is not None, HAS_R=hr is not None, HAS_BS=bs is not None,
                 HAS_BT=bt is not None, HAS_BR=br is not None)
    return ptrs, dims, strides, flags


def plan_fused_row_stats(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, *, inv_temp, lam=1.0,
                         vocab_start=0, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY, sms=None) -> Plan:
    """Outputs: the per-split stats ``[splits, N, 8]``."""
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, hr, wr, br)
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t, r=tf_r),
                            dict(s=True, t=flags["HAS_T"], r=flags["HAS_R"]))
    N, V, device = ptrs[0].shape[0], ptrs[1].shape[0], ptrs[0].device
    cfg = fused_config(N, V, max(dims), ptrs[1].dtype.itemsize, interpreted=_interpreted())
    splits = _n_splits(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v), _device_sms(device, sms))
    per_split = torch.empty(splits, N, N_STATS, dtype=torch.float32, device=device)
    targets = _contiguous_or_none(targets)
    args = (*ptrs, ptrs[0] if targets is None else targets, per_split, N, V, *dims, *strides,
            float(inv_temp), *tfa, float(lam), int(vocab_start), splits)
    consts = dict(flags, **caps, HAS_Y=targets is not None, PRECISION=_precision(ws, wt, wr))
    return Plan((_fused_launch(fused_row_stats_kernel, cfg, lambda bn, bv: (triton.cdiv(N, bn), splits),
                               args, consts),), (per_split,))


def fused_row_stats(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, **kw):
    """Runs ``plan_fused_row_stats`` (same arguments) and merges the splits: ``[N, 8]``."""
    return _merge_splits(plan_fused_row_stats(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, **kw).run()[0])


def plan_fused_jsd_sums(hs, ws, bs, ht, wt, bt, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY,
                        sms=None) -> Plan:
    """Outputs: the per-split sums ``[splits, N, 2]``."""
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, None, None, None)
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t), dict(s=True, t=True))
    N, V, device = ptrs[0].shape[0], ptrs[1].shape[0], ptrs[0].device
    cfg = fused_config(N, V, max(dims), ptrs[1].dtype.itemsize, wide=True, interpreted=_interpreted())
    splits = _n_splits(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v), _device_sms(device, sms))
    per_split = torch.empty(splits, N, 2, dtype=torch.float32, device=device)
    log_beta, log_1m_beta = _log_betas(beta)
    args = (*ptrs[:6], _fp32_contiguous(AB), per_split, N, V, *dims[:2], *strides[:4], float(inv_temp), *tfa, log_beta,
            log_1m_beta, splits)
    consts = dict(HAS_BS=flags["HAS_BS"], HAS_BT=flags["HAS_BT"], **caps, PRECISION=_precision(ws, wt))
    return Plan((_fused_launch(fused_jsd_sums_kernel, cfg, lambda bn, bv: (triton.cdiv(N, bn), splits),
                               args, consts),), (per_split,))


def fused_jsd_sums(hs, ws, bs, ht, wt, bt, AB, **kw):
    """Runs ``plan_fused_jsd_sums`` (same arguments) and adds the splits: ``[N, 2]``."""
    return plan_fused_jsd_sums(hs, ws, bs, ht, wt, bt, AB, **kw).run()[0].sum(0)


def plan_fused_grad(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, rs, g, *, kind, inv_temp, lam=1.0,
                    beta=0.5, vocab_start=0, need_dw=True, need_db=False, with_entropy=True,
                    tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY, sms=None) -> Plan:
    """Outputs: ``(dh, dw or None, db or None)``; the ``dW``/``db`` kernel only when one is needed."""
    _check_kind(kind)
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, hr, wr, br)
    tfa, caps = _transforms(dict(s=tf_s, t=tf_t, r=tf_r),
                            dict(s=True, t=flags["HAS_T"], r=flags["HAS_R"]))
    N, V, device = ptrs[0].shape[0], ptrs[1].shape[0], ptrs[0].device
    cfg = fused_config(N, V, max(dims), ptrs[1].dtype.itemsize, interpreted=_interpreted())
    log_beta, log_1m_beta = _log_betas(beta)
    targets = _contiguous_or_none(targets)
    dh = torch.zeros(N, dims[0], dtype=torch.float32, device=device)
    dw = torch.zeros(V, dims[0], dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=device) if need_db else None
    common = (ptrs[0] if targets is None else targets, _fp32_contiguous(rs), _fp32_contiguous(g))
    scalars = (N, V, *dims, *strides, float(inv_temp), *tfa, float(lam), float(beta), log_beta,
               log_1m_beta, int(vocab_start))
    consts = dict(flags, **caps, KIND=KIND_IDS[kind], HAS_Y=targets is not None,
                  HAS_ENT=bool(with_entropy), PRECISION=_precision(ws, wt, wr))
    launches = [_fused_launch(fused_grad_dh_kernel, cfg, lambda bn, bv: (triton.cdiv(N, bn),),
                              (*ptrs, *common, dh, *scalars), consts)]
    if need_dw or need_db:
        unused = torch.zeros(1, dtype=torch.float32, device=device)  # stands in for dw or db
        launches.append(_fused_launch(
            fused_grad_dw_kernel, cfg, lambda bn, bv: (triton.cdiv(V, bv),),
            (*ptrs, *common, unused if dw is None else dw, unused if db is None else db, *scalars),
            dict(consts, NEED_DW=bool(need_dw), NEED_DB=bool(need_db))))
    return Plan(tuple(launches), (dh, dw, db))


def fused_grad(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, rs, g, **kw):
    """Runs ``plan_fused_grad`` (same arguments): (dh [N, d] fp32, dw [V, d] fp32 or None,
    db [V] fp32 or None) of ``sum_i g_main_i main_i + g_ent_i H_i`` (``with_entropy=False``
    skips the entropy term)."""
    return plan_fused_grad(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, rs, g, **kw).run()


PLANS = dict(row_stats=plan_row_stats, jsd_sums=plan_jsd_sums, grad_logits=plan_grad_logits,
             fused_row_stats=plan_fused_row_stats, fused_jsd_sums=plan_fused_jsd_sums,
             fused_grad=plan_fused_grad)
"""Each primitive's plan: ``PLANS[name](*args, sms=..., **kw)`` takes the primitive's arguments."""
