"""Triton backend: launchers for the kernels in ``opd_kernels.triton`` (contract: ``backends``).

Each launcher checks layouts (last dim contiguous, int64-safe row strides), picks block sizes
with a small heuristic per (N, V, d, dtype) -- passed as ``tl.constexpr`` -- and launches without
any host-device sync. ``OPD_TRITON_AUTOTUNE=1`` (read at import) autotunes the fused-linear
kernels over a few configs instead (keyed on V and the hidden sizes, not on N).

Logit transforms (``tf_s``/``tf_t``/``tf_r``, see ``opd_kernels.backends``) reach the kernels as
runtime ``pre_*``/``post_*`` floats (``transform_consts``, temperature folded in) plus constexpr
``HAS_CAP_*`` flags, set only for a model that is present and capped, so uncapped calls launch
the specialisations that have no transform code.

Runs on CUDA tensors, or on CPU tensors in the Triton interpreter when ``TRITON_INTERPRET=1``
was set before triton was first imported (tests on machines without a GPU).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .._stats import rebase
from . import IDENTITY, N_STATS, STAT_M_A, STAT_M_B, transform_consts

try:
    import triton

    from ..triton import fused_linear as _fl
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


# ----------------------------------------------------------------------------------- heuristics
@dataclass(frozen=True)
class _Cfg:
    block_n: int
    block_v: int
    block_k: int = 16
    num_warps: int = 4
    num_stages: int = 2


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_splits(row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits (grid axis 1) so that about 2 programs per SM exist when N is small."""
    if device.type != "cuda":
        return 1
    want = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tiles, want // max(1, row_blocks)))


def _logits_cfg(N: int, V: int, dtype: torch.dtype, *, reduction: bool = False) -> _Cfg:
    """Memory-bound logits-level kernels: one row (or a few, for small V) x a wide vocab tile.

    The row reductions (``reduction``: row_stats, jsd_sums) keep per-row running sums and
    several fp32 temporaries per element: 16 warps for a 4096-element tile (8 elements per
    thread) use ~60 registers instead of ~100-120 at 8 warps (ptxas, sm_80 / sm_90a), i.e. two
    resident CTAs of 16 warps per SM instead of two of 8. The elementwise gradient kernel needs
    few registers (30-85) and keeps 8 warps.
    """
    if _interpreted():  # the interpreter's cost is per program and op: few, large tiles
        return _Cfg(block_n=min(16, _pow2(N)), block_v=min(256, _pow2(V)))
    block_v = min(_pow2(V), 4096 if dtype.itemsize <= 2 else 2048)
    block_n = max(1, min(_pow2(N), 4096 // block_v))
    tile = block_n * block_v
    warps = 16 if reduction and tile >= 4096 else 8 if tile >= 2048 else 4
    return _Cfg(block_n, block_v, num_warps=warps)


def fused_tiles(N: int, V: int, itemsize: int, wide: bool = False) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_V)`` of the fused kernels on a GPU (``_fused_cfg``), also read by the
    routing model (``ops/_route.py``: the fused backward's accumulator traffic scales with
    ``1/BLOCK_N + 1/BLOCK_V``). Pure Python, so the model works without triton."""
    def pow2(x):
        return 1 << (max(1, int(x)) - 1).bit_length()
    block_n = max(16, min(64, pow2(N)))
    if itemsize <= 2:
        return block_n, max(16, min(128 if wide else 64, pow2(V)))
    return min(block_n, 32), max(16, min(64, pow2(V)))


def _fused_cfg(N: int, V: int, d: int, dtype: torch.dtype, *, wide: bool = False) -> _Cfg:
    """GEMM-shaped fused kernels: tl.dot tiles (every block dimension >= 16).

    With 16-bit weights the tiles are 64 x 64: the row-stats and gradient kernels keep up to
    three fp32 logits tiles (student, teacher, reference) live with the online-softmax or
    gradient temporaries and the dh/dw accumulator, and at 64 x 128 they sat at 255 registers
    and spilled on sm_80 (``python -m opd_kernels.triton.aot`` shows it). ``wide`` (the JSD
    second pass: no running stats, spill-free at 128, spilling at 64 on sm_80) keeps 64 x 128.
    """
    block_n = max(16, min(64, _pow2(N)))
    # fp32 weights: FMA dots ("ieee") hold both operand slices in registers; 16-wide K slices
    # spill in 4 of 32 variants (<= 32 B) where 32-wide ones spilled in 13 (up to 160 B)
    block_k = max(16, min(64, _pow2(d))) if dtype.itemsize <= 2 else 16
    if _interpreted():
        return _Cfg(block_n, block_v=max(16, min(128, _pow2(V))), block_k=max(16, min(64, _pow2(d))))
    bn, bv = fused_tiles(N, V, dtype.itemsize, wide)
    if dtype.itemsize <= 2:
        return _Cfg(bn, bv, block_k, num_warps=8, num_stages=3)
    return _Cfg(bn, bv, block_k, num_warps=4, num_stages=2)


def _precision(*weights) -> str:
    """fp32 dots follow torch's matmul setting: full fp32 ("ieee") unless TF32 is allowed.

    Only fp32 operands are affected; bf16/fp16 dots always run on tensor cores.
    """
    fp32 = any(w is not None and w.dtype == torch.float32 for w in weights)
    if fp32 and (_interpreted() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


_AUTOTUNE = os.environ.get("OPD_TRITON_AUTOTUNE", "0") == "1" and triton is not None


def _autotuned(kernel, key, reset=None):
    if not _AUTOTUNE or _interpreted():
        return None
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bn, bv, bk, w, st in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                                         (128, 64, 64, 4, 4), (64, 128, 32, 4, 4), (32, 64, 32, 4, 2)]]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(kernel)


if triton is not None:
    _TUNED = {
        "stats": _autotuned(_fl.fused_row_stats_kernel, ["V", "DS", "DT", "DR"]),
        "jsd": _autotuned(_fl.fused_jsd_sums_kernel, ["V", "DS", "DT"]),
        "dh": _autotuned(_fl.fused_grad_dh_kernel, ["V", "DS", "DT", "DR"], reset=["dh_ptr"]),
        "dw": _autotuned(_fl.fused_grad_dw_kernel, ["V", "DS", "DT", "DR"], reset=["dw_ptr", "db_ptr"]),
    }


def _launch_fused(name, kernel, grid, cfg: _Cfg, args, consts):
    """Launch ``kernel`` with the heuristic config, or its autotuned twin when enabled.

    ``grid(block_n, block_v)`` gives the launch grid for a choice of block sizes.
    """
    tuned = _TUNED[name]
    if tuned is not None:
        tuned[lambda meta: grid(meta["BLOCK_N"], meta["BLOCK_V"])](*args, **consts)
    else:
        kernel[grid(cfg.block_n, cfg.block_v)](
            *args, **consts, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------------------------------- helpers
def _rows(x: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """2-D view whose last dim is contiguous (row stride arbitrary, e.g. a ``vocab_size`` slice)."""
    if x is None:
        return None
    if x.dim() != 2:
        raise ValueError(f"triton backend: {name} must be 2-D, got shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _vec(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _merge_splits(part: torch.Tensor) -> torch.Tensor:
    """[splits, N, 8] per-split row stats -> [N, 8], merged like vocab shards (no host sync):
    each split's sums are rebased onto the row maxima over splits, then added."""
    if part.shape[0] == 1:
        return part[0]
    m_a, m_b = part[:, :, STAT_M_A].amax(0), part[:, :, STAT_M_B].amax(0)
    out = rebase(part, m_a, m_b).sum(0)
    out[:, STAT_M_A], out[:, STAT_M_B] = m_a, m_b
    return out


def _transforms(inv_temp, tfs: dict, present: dict):
    """Kernel arguments of the logit transforms: ((pre_s, post_s, pre_t, ...), {HAS_CAP_S: ...}).

    ``tfs`` maps "s"/"t"/"r" to (scale, cap); absent models get a flag of False (their constants
    are still checked and passed, never read)."""
    args, flags = [], {}
    for m, tf in tfs.items():
        k = transform_consts(tf, inv_temp, f"tf_{m}")
        args += [k.pre, k.post]
        flags[f"HAS_CAP_{m.upper()}"] = bool(k.capped and present[m])
    return tuple(args), flags


def _log_betas(beta: float) -> tuple[float, float]:
    """log(beta), log(1 - beta) for the JSD mixture (only used with 0 < beta < 1)."""
    return (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)


# --------------------------------------------------------------------------- logits level
def row_stats(s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0, tf_s=IDENTITY, tf_t=IDENTITY,
              tf_r=IDENTITY):
    s, t, r = _rows(s, "s"), _rows(t, "t"), _rows(r, "r")
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t, r=tf_r), dict(s=True, t=t is not None, r=r is not None))
    N, V = s.shape
    cfg = _logits_cfg(N, V, s.dtype, reduction=True)
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), s.device)
    part = torch.empty(splits, N, N_STATS, dtype=torch.float32, device=s.device)
    targets = _vec(targets)
    row_stats_kernel[(row_blocks, splits)](
        s, s if t is None else t, s if r is None else r, s if targets is None else targets, part,
        N, V, s.stride(0), 0 if t is None else t.stride(0), 0 if r is None else r.stride(0),
        *tfa, float(lam), int(vocab_start), splits,
        HAS_T=t is not None, HAS_R=r is not None, HAS_Y=targets is not None, **caps,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return _merge_splits(part)


def jsd_sums(s, t, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY):
    s, t = _rows(s, "s"), _rows(t, "t")
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t), dict(s=True, t=True))
    N, V = s.shape
    cfg = _logits_cfg(N, V, s.dtype, reduction=True)
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), s.device)
    part = torch.empty(splits, N, 2, dtype=torch.float32, device=s.device)
    log_beta, log_1m_beta = _log_betas(beta)
    jsd_sums_kernel[(row_blocks, splits)](
        s, t, _f32(AB), part, N, V, s.stride(0), t.stride(0), *tfa, log_beta,
        log_1m_beta, splits, **caps, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return part.sum(0)


def grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                out=None, with_entropy=False, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
    """``ds`` in ``s.dtype`` (into ``out`` when given; ``out`` may be ``s`` for an in-place backward).

    ``with_entropy`` adds ``g_ent * dH/da`` (as in the torch backend; False skips that work).
    """
    if kind not in KIND_IDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(KIND_IDS)}")
    s, t, r = _rows(s, "s"), _rows(t, "t"), _rows(r, "r")
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t, r=tf_r), dict(s=True, t=t is not None, r=r is not None))
    N, V = s.shape
    if out is None:
        out = torch.empty_like(s)
    elif out.shape != s.shape or out.stride(1) != 1:
        raise ValueError(f"triton backend: out must be {tuple(s.shape)} with a contiguous last dim, "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    cfg = _logits_cfg(N, V, s.dtype)
    row_blocks = triton.cdiv(N, cfg.block_n)
    splits = _n_splits(row_blocks, triton.cdiv(V, cfg.block_v), s.device)
    log_beta, log_1m_beta = _log_betas(beta)
    targets = _vec(targets)
    grad_logits_kernel[(row_blocks, splits)](
        s, s if t is None else t, s if r is None else r, s if targets is None else targets,
        _f32(rs), _f32(g), out, N, V, s.stride(0), 0 if t is None else t.stride(0),
        0 if r is None else r.stride(0), out.stride(0), *tfa, float(lam), float(beta),
        log_beta, log_1m_beta, int(vocab_start), splits,
        KIND=KIND_IDS[kind], HAS_T=t is not None, HAS_R=r is not None,
        HAS_Y=targets is not None, HAS_ENT=bool(with_entropy), **caps,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return out


# ----------------------------------------------------------------------- fused with lm_head
def _model(h, w, b, name):
    """(hidden, weight, bias) with contiguous last dims; the dims are checked against each other."""
    if h is None:
        return None, None, None
    h, w = _rows(h, f"{name} hidden"), _rows(w, f"{name} weight")
    if h.shape[1] != w.shape[1]:
        raise ValueError(f"triton backend: {name} hidden {tuple(h.shape)} and weight "
                         f"{tuple(w.shape)} disagree on the hidden size")
    return h, w, _vec(b)


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


def fused_row_stats(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, *, inv_temp, lam=1.0,
                    vocab_start=0, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, hr, wr, br)
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t, r=tf_r),
                            dict(s=True, t=flags["HAS_T"], r=flags["HAS_R"]))
    N, V = ptrs[0].shape[0], ptrs[1].shape[0]
    cfg = _fused_cfg(N, V, max(dims), ptrs[1].dtype)
    splits = _n_splits(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v), ptrs[0].device)
    part = torch.empty(splits, N, N_STATS, dtype=torch.float32, device=ptrs[0].device)
    targets = _vec(targets)
    args = (*ptrs, ptrs[0] if targets is None else targets, part, N, V, *dims, *strides,
            *tfa, float(lam), int(vocab_start), splits)
    consts = dict(flags, **caps, HAS_Y=targets is not None, PRECISION=_precision(ws, wt, wr))
    _launch_fused("stats", _fl.fused_row_stats_kernel,
                  lambda bn, bv: (triton.cdiv(N, bn), splits), cfg, args, consts)
    return _merge_splits(part)


def fused_jsd_sums(hs, ws, bs, ht, wt, bt, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY):
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, None, None, None)
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t), dict(s=True, t=True))
    N, V = ptrs[0].shape[0], ptrs[1].shape[0]
    cfg = _fused_cfg(N, V, max(dims), ptrs[1].dtype, wide=True)
    splits = _n_splits(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v), ptrs[0].device)
    part = torch.empty(splits, N, 2, dtype=torch.float32, device=ptrs[0].device)
    log_beta, log_1m_beta = _log_betas(beta)
    args = (*ptrs[:6], _f32(AB), part, N, V, *dims[:2], *strides[:4], *tfa, log_beta,
            log_1m_beta, splits)
    consts = dict(HAS_BS=flags["HAS_BS"], HAS_BT=flags["HAS_BT"], **caps, PRECISION=_precision(ws, wt))
    _launch_fused("jsd", _fl.fused_jsd_sums_kernel,
                  lambda bn, bv: (triton.cdiv(N, bn), splits), cfg, args, consts)
    return part.sum(0)


def fused_grad(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, rs, g, *, kind, inv_temp, lam=1.0,
               beta=0.5, vocab_start=0, need_dw=True, need_db=False, with_entropy=True,
               tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
    """(dh [N, d] fp32, dw [V, d] fp32 or None, db [V] fp32 or None) of
    ``sum_i g_main_i main_i + g_ent_i H_i`` (``with_entropy=False`` skips the entropy term)."""
    if kind not in KIND_IDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(KIND_IDS)}")
    ptrs, dims, strides, flags = _fused_operands(hs, ws, bs, ht, wt, bt, hr, wr, br)
    tfa, caps = _transforms(inv_temp, dict(s=tf_s, t=tf_t, r=tf_r),
                            dict(s=True, t=flags["HAS_T"], r=flags["HAS_R"]))
    N, V = ptrs[0].shape[0], ptrs[1].shape[0]
    device = ptrs[0].device
    cfg = _fused_cfg(N, V, max(dims), ptrs[1].dtype)
    log_beta, log_1m_beta = _log_betas(beta)
    targets = _vec(targets)
    dh = torch.zeros(N, dims[0], dtype=torch.float32, device=device)
    dw = torch.zeros(V, dims[0], dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=device) if need_db else None
    common = (ptrs[0] if targets is None else targets, _f32(rs), _f32(g))
    scalars = (N, V, *dims, *strides, *tfa, float(lam), float(beta), log_beta,
               log_1m_beta, int(vocab_start))
    consts = dict(flags, **caps, KIND=KIND_IDS[kind], HAS_Y=targets is not None,
                  HAS_ENT=bool(with_entropy), PRECISION=_precision(ws, wt, wr))
    _launch_fused("dh", _fl.fused_grad_dh_kernel, lambda bn, bv: (triton.cdiv(N, bn),), cfg,
                  (*ptrs, *common, dh, *scalars), consts)
    if need_dw or need_db:
        unused = torch.zeros(1, dtype=torch.float32, device=device)  # stands in for dw or db
        _launch_fused("dw", _fl.fused_grad_dw_kernel, lambda bn, bv: (triton.cdiv(V, bv),), cfg,
                      (*ptrs, *common, unused if dw is None else dw, unused if db is None else db,
                       *scalars),
                      dict(consts, NEED_DW=bool(need_dw), NEED_DB=bool(need_db)))
    return dh, dw, db
