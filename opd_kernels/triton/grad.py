"""Backward: the gradient with respect to the student logits, recomputed tile by tile.

What it computes -- the backend contract's ``grad_logits``: with saved per-row
``(A, B, C, H)`` (log-normalizers, the row constant ``C``, the entropy) and upstream
``(g_main, g_ent)``, for ``q = e^(a - A)``, ``p = e^(b - B)``::

    ds = inv_temp * (g_main * d(main)/da + g_ent * dH/da)
    logprob     d/da = onehot(y) - q
    forward_kl  d/da = q - p
    reverse_kl  d/da = q (log q - log p - C)           C = KL(q || p)   (G-OPD: p from lam, ref)
    jsd         d/da = (1 - beta) q (log q - log M - C) C = KL(q || M)
    entropy     dH/da = -q (log q + H)

Derivation: for a softmax ``q = softmax(a)`` and any ``L(q)``, ``dL/da_v = q_v (g_v - sum_u q_u g_u)``
with ``g_u = dL/dq_u``. Reverse KL: ``g_u = log q_u - log p_u + 1``, so ``dL/da_v =
q_v (log q_v - log p_v - KL(q||p))``. JSD: with ``M = beta p + (1 - beta) q``, the ``M``-terms
of both halves sum to ``-(1 - beta) (beta p_u + (1 - beta) q_u) / M_u = -(1 - beta)``, leaving
``g_u = (1 - beta) log(q_u / M_u)`` (+ a constant that the softmax Jacobian removes).

Logit transforms: ``a = T_s(s) / tau``, so ``ds = d/da * da/ds`` -- the constant ``post`` without a
softcap (``grad_tile``'s factor), or with one the slope ``pre * post * (1 - tanh^2)``
recomputed from the loaded ``s`` in the same tile (``grad_tile_capped``; where the slope is
exactly 0, at -inf or where tanh rounds to +-1, ``ds`` is 0 even if ``d/da`` is infinite).

Everything is recomputed from the logits and the four row scalars, so backward needs no
``[N, V]`` saved tensor. Each element depends only on its own logits: programs stream over
vocabulary tiles (split over the second grid axis like the forward) and write ``ds`` in the
output dtype; ``out`` may be the logits buffer itself (each tile is read before it is
overwritten by the same program), which makes the backward in place. Zero-probability
(``-inf``) columns give exactly 0.
"""
import triton
import triton.language as tl

from .jsd import log_mixture
from .stats import load_scaled, load_target, softcap_slope, split_range

KIND_LOGPROB, KIND_FORWARD_KL, KIND_REVERSE_KL, KIND_JSD = 0, 1, 2, 3
KIND_IDS = {"logprob": KIND_LOGPROB, "forward_kl": KIND_FORWARD_KL,
            "reverse_kl": KIND_REVERSE_KL, "jsd": KIND_JSD}


@triton.jit
def load_row_grad_inputs(rs_ptr, g_ptr, y_ptr, rows, row_ok, V, vocab_start, HAS_Y: tl.constexpr):
    """Per-row ``A, B, C, H`` (rs [N, 4]), ``g_main, g_ent`` (g [N, 2]) and the local target.

    Padded rows get ``g = 0`` and ``A = +inf`` (so ``q = 0``); the local target is -1 when the
    target is not in ``[0, V)`` of this shard (ignored or owned by another rank).
    """
    rs = rs_ptr + rows * 4
    A = tl.load(rs, mask=row_ok, other=float("inf"))
    B = tl.load(rs + 1, mask=row_ok, other=0.0)
    C = tl.load(rs + 2, mask=row_ok, other=0.0)
    H = tl.load(rs + 3, mask=row_ok, other=0.0)
    g_main = tl.load(g_ptr + rows * 2, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    y = tl.full(rows.shape, -1, tl.int64)
    if HAS_Y:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
        y = tl.where((y >= 0) & (y < V), y, -1)
    return A, B, C, H, g_main, g_ent, y


@triton.jit
def grad_tile(a, b, cols, y, A, B, C, H, g_main, g_ent, post, beta, log_beta, log_1m_beta,
              KIND: tl.constexpr, HAS_ENT: tl.constexpr):
    """fp32 ``ds`` for one tile of scaled student logits ``a`` and target logits ``b``; ``post``
    is ``da/ds`` without a cap (``scale * inv_temp``; 1.0 when the caller applies the slope)."""
    log_q = a - A[:, None]
    q = tl.exp(log_q)
    if KIND == 0:  # logprob
        d = tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - q
    elif KIND == 1:  # forward_kl
        d = q - tl.exp(b - B[:, None])
    elif KIND == 2:  # reverse_kl (and G-OPD)
        d = tl.where(q > 0, q * (log_q - (b - B[:, None]) - C[:, None]), 0.0)
    else:  # jsd, 0 < beta < 1
        log_m = log_mixture(b - B[:, None], log_q, log_beta, log_1m_beta)
        d = tl.where(q > 0, (1.0 - beta) * q * (log_q - log_m - C[:, None]), 0.0)
    # rows with g = 0 (masked) give exact zeros, even where a term is infinite (0 * inf)
    d = tl.where(g_main[:, None] != 0, d * g_main[:, None], 0.0)
    if HAS_ENT:
        d += tl.where(g_ent[:, None] != 0, g_ent[:, None] * tl.where(q > 0, -q * (log_q + H[:, None]), 0.0), 0.0)
    return d * post


@triton.jit
def grad_tile_capped(x, b, cols, y, A, B, C, H, g_main, g_ent, pre, post, beta, log_beta,
                     log_1m_beta, KIND: tl.constexpr, HAS_ENT: tl.constexpr):
    """``grad_tile`` for raw student logits ``x`` under a softcap, chain rule included."""
    a, slope = softcap_slope(x, pre, post)
    d = grad_tile(a, b, cols, y, A, B, C, H, g_main, g_ent, 1.0, beta, log_beta, log_1m_beta,
                  KIND, HAS_ENT)
    return tl.where(slope == 0.0, 0.0, d * slope)


@triton.jit
def grad_tile_for(a, b, cols, y, A, B, C, H, g_main, g_ent, pre, post, beta, log_beta,
                  log_1m_beta, KIND: tl.constexpr, HAS_ENT: tl.constexpr, HAS_CAP: tl.constexpr):
    """``ds`` for a student tile as loaded for ``HAS_CAP``: raw logits ``a`` under a softcap
    (``grad_tile_capped``, chain rule included), else ``a = post * s`` (``grad_tile``, factor
    ``post``)."""
    if HAS_CAP:
        return grad_tile_capped(a, b, cols, y, A, B, C, H, g_main, g_ent, pre, post, beta,
                                log_beta, log_1m_beta, KIND, HAS_ENT)
    return grad_tile(a, b, cols, y, A, B, C, H, g_main, g_ent, post, beta, log_beta, log_1m_beta,
                     KIND, HAS_ENT)


@triton.jit
def grad_logits_kernel(s_ptr, t_ptr, r_ptr, y_ptr, rs_ptr, g_ptr, out_ptr,
                       N, V, stride_s, stride_t, stride_r, stride_o,
                       inv_temp, pre_s, post_s, pre_t, post_t, pre_r, post_r, lam, beta, log_beta,
                       log_1m_beta, vocab_start, n_splits,
                       KIND: tl.constexpr, HAS_T: tl.constexpr, HAS_R: tl.constexpr,
                       HAS_Y: tl.constexpr, HAS_ENT: tl.constexpr, HAS_CAP_S: tl.constexpr,
                       HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[rows, split columns] = ds in out's dtype (out may alias s)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    lo, hi = split_range(V, n_splits, BLOCK_V)
    post_s, post_t, post_r = post_s * inv_temp, post_t * inv_temp, post_r * inv_temp  # times 1/temperature
    A, B, C, H, g_main, g_ent, y = load_row_grad_inputs(rs_ptr, g_ptr, y_ptr, rows, row_ok, V,
                                                        vocab_start, HAS_Y)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        if HAS_CAP_S:  # `a` holds the raw logits; grad_tile_capped transforms them
            a = load_scaled(s_ptr, rows, cols, stride_s, mask, 1.0)
        else:
            a = load_scaled(s_ptr, rows, cols, stride_s, mask, post_s)
        b = a
        if HAS_T:
            b = load_target(t_ptr, r_ptr, rows, cols, stride_t, stride_r, mask, pre_t, post_t,
                            pre_r, post_r, lam, HAS_R, HAS_CAP_T, HAS_CAP_R)
        d = grad_tile_for(a, b, cols, y, A, B, C, H, g_main, g_ent, pre_s, post_s, beta, log_beta,
                          log_1m_beta, KIND, HAS_ENT, HAS_CAP_S)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :],
                 d.to(out_ptr.dtype.element_ty), mask=mask)
