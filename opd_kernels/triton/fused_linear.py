"""The same row statistics and gradients, fused with the lm_head projection.

What it computes -- the contract's ``fused_row_stats``, ``fused_jsd_sums`` and ``fused_grad``
for ``s = hs ws^T + bs`` (student, ``[N, d_s] x [V, d_s]``), ``t = ht wt^T + bt`` (teacher,
its own hidden size ``d_t`` and dtype) and, for G-OPD, ``r = hr wr^T + br`` (reference).

Forward: a program owns ``BLOCK_N`` rows and streams over its vocabulary tiles. Each logits
tile ``hs[rows, :] @ ws[cols, :]^T`` is accumulated in fp32 registers by ``tl.dot`` over
``BLOCK_K``-wide slices of the hidden dimension (for the teacher and the reference likewise),
scaled by ``1/tau`` and folded straight into the online max/rescale recurrence of
``stats.py`` (or the JSD sums of ``jsd.py``); the logits never reach global memory.

Backward (``fused_grad``): recompute each logits tile the same way, turn it into
``ds = d loss / d s`` with ``grad.py``'s ``grad_tile_for`` (it needs only the saved per-row
``A, B, C, H`` and ``g``), and consume it at once::

    dh[rows, :] += ds @ ws[cols, :]      dw[cols, :] += ds^T @ hs[rows, :]      db[cols] += sum_rows ds

``ds`` of one tile feeds both a row block of ``dh`` and a vocabulary block of ``dw``, so one of
the two would have to be reduced across programs. Two kernels avoid that without any ``[N, V]``
buffer and without atomics: ``fused_grad_dh_kernel`` (grid over row blocks, loop over vocab
tiles; each program owns its ``dh`` rows) and ``fused_grad_dw_kernel`` (grid over vocab blocks,
loop over row blocks; each program owns its ``dw``/``db`` rows). The price is recomputing the
logits tiles twice (one extra ``2 N V d`` GEMM pass per model) instead of contended fp32 atomics
(``N/BLOCK_N`` or ``V/BLOCK_V`` adds per element of ``dw`` or ``dh``), and the result is
deterministic. The fp32 ``dh``/``dw`` accumulators live in global memory (a ``[BLOCK_N, d]``
slab does not fit registers for d = 4096) and are read-modify-written per tile, with a CTA
barrier between tiles because the dot's register layout need not give each element to the
thread that wrote it; their extra memory is the O(N d + V d) outputs themselves. ``ds`` is cast to the weight dtype for the
tensor-core ``tl.dot`` (as autograd through a bf16 matmul would).

Logit transforms (``stats.py``): each projected tile is transformed in registers --
``tile * post`` without a softcap (``tile * inv_temp`` for the identity; ``post`` is the model's
factor times ``inv_temp``, formed on kernel entry), ``softcap(tile, pre, post)`` with
one (``model_logits_tile``); the backward recomputes the raw tile and applies the chain rule in
the same tile (``grad.py``'s ``grad_tile_capped``).

Memory: nothing in this file allocates or writes anything of size ``N x V``: the only global
writes are ``out`` ([splits, N, 8] or [splits, N, 2]), ``dh`` [N, d], ``dw`` [V, d], ``db`` [V].
"""
import triton
import triton.language as tl

from .grad import grad_tile_for, load_row_grad_inputs
from .jsd import jsd_row_block, jsd_terms, store_jsd_sums
from .stats import softcap, split_range, stats_update, store_stats


@triton.jit
def tile_cols(v0, end, BLOCK_V: tl.constexpr):
    """int64 vocabulary columns ``v0 + [0, BLOCK_V)`` of a tile and their mask ``< end``."""
    cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    return cols, cols < end


@triton.jit
def scaled_logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                       post, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``(h[rows] @ w[cols]^T + bias[cols]) * post``, ``-inf`` in padded columns (``post``:
    ``scale * inv_temp``, or 1.0 for raw logits).

    ``rows`` and ``cols`` are int64. The hidden tile is cast to the weight's dtype for tl.dot.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * post, float("-inf"))


@triton.jit
def model_logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                      pre, post, HAS_CAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One model's transformed scaled logits tile: ``softcap(x, pre, post)`` or ``x * post``."""
    if HAS_CAP:
        x = scaled_logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h,
                               stride_w, 1.0, HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        return softcap(x, pre, post)
    return scaled_logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h,
                              stride_w, post, HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)


@triton.jit
def target_logits_tile(ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DT, DR,
                       stride_ht, stride_wt, stride_hr, stride_wr, pre_t, post_t, pre_r, post_r,
                       lam, HAS_R: tl.constexpr, HAS_BT: tl.constexpr, HAS_BR: tl.constexpr,
                       HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Target scaled logits ``b = T_t(t) / tau`` or ``(lam T_t(t) + (1 - lam) T_r(r)) / tau``."""
    b = model_logits_tile(ht, wt, bt, rows, cols, row_ok, col_ok, DT, stride_ht, stride_wt,
                          pre_t, post_t, HAS_CAP_T, HAS_BT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_R:
        r = model_logits_tile(hr, wr, br, rows, cols, row_ok, col_ok, DR, stride_hr, stride_wr,
                              pre_r, post_r, HAS_CAP_R, HAS_BR, PRECISION, BLOCK_N, BLOCK_V,
                              BLOCK_K)
        banned = (b == float("-inf")) | (r == float("-inf"))  # banned by either model: banned
        b = tl.where(col_ok[None, :] & ~banned, lam * b + (1.0 - lam) * r, float("-inf"))
    return b


@triton.jit
def fused_row_stats_kernel(hs, ws, bs, ht, wt, bt, hr, wr, br, y_ptr, out_ptr,
                           N, V, DS, DT, DR, stride_hs, stride_ws, stride_ht, stride_wt,
                           stride_hr, stride_wr, inv_temp, pre_s, post_s, pre_t, post_t, pre_r, post_r,
                           lam, vocab_start, n_splits,
                           HAS_T: tl.constexpr, HAS_R: tl.constexpr, HAS_Y: tl.constexpr,
                           HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_BR: tl.constexpr,
                           HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                           HAS_CAP_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, rows, :] = row stats (stats.py) of the projected logits over one vocab split."""
    post_s, post_t, post_r = post_s * inv_temp, post_t * inv_temp, post_r * inv_temp  # times 1/temperature
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    lo, hi = split_range(V, n_splits, BLOCK_V)
    y = tl.full([BLOCK_N], -1, tl.int64)
    if HAS_Y:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start

    m_a = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_b = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    u_a, s_b, d_q, d_p, a_y = s_a, s_a, s_a, s_a, s_a
    for v0 in range(lo, hi, BLOCK_V):
        cols, col_ok = tile_cols(v0, hi, BLOCK_V)
        a = model_logits_tile(hs, ws, bs, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                              pre_s, post_s, HAS_CAP_S, HAS_BS, PRECISION, BLOCK_N, BLOCK_V,
                              BLOCK_K)
        if HAS_Y:  # only the column holding the target matches (padded columns never do)
            hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
            a_y += tl.sum(tl.where(hit, a, 0.0), 1)
        b = a
        if HAS_T:
            b = target_logits_tile(ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DT, DR,
                                   stride_ht, stride_wt, stride_hr, stride_wr, pre_t, post_t,
                                   pre_r, post_r, lam, HAS_R, HAS_BT, HAS_BR, HAS_CAP_T,
                                   HAS_CAP_R, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        m_a, s_a, u_a, m_b, s_b, d_q, d_p = stats_update(a, b, m_a, s_a, u_a, m_b, s_b, d_q, d_p,
                                                         HAS_T)
    out_rows = tl.program_id(1).to(tl.int64) * N + rows
    store_stats(out_ptr, out_rows, row_ok, m_a, s_a, u_a, m_b, s_b, d_q, d_p, a_y, HAS_T)


@triton.jit
def fused_jsd_sums_kernel(hs, ws, bs, ht, wt, bt, ab_ptr, out_ptr,
                          N, V, DS, DT, stride_hs, stride_ws, stride_ht, stride_wt,
                          inv_temp, pre_s, post_s, pre_t, post_t, log_beta, log_1m_beta, n_splits,
                          HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_CAP_S: tl.constexpr,
                          HAS_CAP_T: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, rows, 0:2] = (KL(p||M), KL(q||M)) (jsd.py) of the projected logits."""
    post_s, post_t = post_s * inv_temp, post_t * inv_temp  # times 1/temperature
    rows, row_ok, lo, hi, A, B = jsd_row_block(ab_ptr, N, V, n_splits, BLOCK_N, BLOCK_V)
    acc_p = tl.zeros([BLOCK_N], tl.float32)
    acc_q = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols, col_ok = tile_cols(v0, hi, BLOCK_V)
        a = model_logits_tile(hs, ws, bs, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                              pre_s, post_s, HAS_CAP_S, HAS_BS, PRECISION, BLOCK_N, BLOCK_V,
                              BLOCK_K)
        b = model_logits_tile(ht, wt, bt, rows, cols, row_ok, col_ok, DT, stride_ht, stride_wt,
                              pre_t, post_t, HAS_CAP_T, HAS_BT, PRECISION, BLOCK_N, BLOCK_V,
                              BLOCK_K)
        kl_p, kl_q = jsd_terms(a, b, A, B, log_beta, log_1m_beta)
        acc_p += tl.sum(kl_p, 1)
        acc_q += tl.sum(kl_q, 1)
    store_jsd_sums(out_ptr, N, rows, row_ok, acc_p, acc_q)


@triton.jit
def fused_ds_tile(hs, ws, bs, ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DS, DT, DR,
                  stride_hs, stride_ws, stride_ht, stride_wt, stride_hr, stride_wr,
                  row_in, pre_s, post_s, pre_t, post_t, pre_r, post_r, lam, beta, log_beta,
                  log_1m_beta,
                  KIND: tl.constexpr, HAS_T: tl.constexpr, HAS_R: tl.constexpr,
                  HAS_ENT: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                  HAS_BR: tl.constexpr, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                  HAS_CAP_R: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute one logits tile and return fp32 ``ds`` (exactly 0 in padded rows/columns);
    ``row_in`` is the ``load_row_grad_inputs`` tuple of ``rows``."""
    A, B, C, H, g_main, g_ent, y = row_in
    if HAS_CAP_S:  # `a` holds the raw logits; grad_tile_capped transforms them (chain rule too)
        a = scaled_logits_tile(hs, ws, bs, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                               1.0, HAS_BS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    else:
        a = scaled_logits_tile(hs, ws, bs, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                               post_s, HAS_BS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    b = a
    if HAS_T:
        b = target_logits_tile(ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DT, DR,
                               stride_ht, stride_wt, stride_hr, stride_wr, pre_t, post_t, pre_r,
                               post_r, lam, HAS_R, HAS_BT, HAS_BR, HAS_CAP_T, HAS_CAP_R,
                               PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    ds = grad_tile_for(a, b, cols, y, A, B, C, H, g_main, g_ent, pre_s, post_s, beta, log_beta,
                       log_1m_beta, KIND, HAS_ENT, HAS_CAP_S)
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


@triton.jit
def add_dot(acc_ptr, acc_rows, acc_ok, lhs, x_ptr, x_rows, x_ok, stride_x, D,
            PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc[acc_rows, :] += lhs @ x[x_rows, :]`` for an fp32 ``[., D]`` contiguous ``acc`` in
    global memory, ``BLOCK_K`` columns at a time (read-modify-write; ``x`` cast to ``lhs``'s
    dtype for tl.dot). Rows outside ``acc_ok`` are not written; ``x`` is 0 outside ``x_ok``."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_ptr + x_rows[:, None] * stride_x + ks[None, :],
                    mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        ptrs = acc_ptr + acc_rows[:, None] * D + ks[None, :]
        mask = acc_ok[:, None] & k_ok[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        acc = tl.dot(lhs, x.to(lhs.dtype), acc, input_precision=PRECISION)
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def fused_grad_dh_kernel(hs, ws, bs, ht, wt, bt, hr, wr, br, y_ptr, rs_ptr, g_ptr, dh_ptr,
                         N, V, DS, DT, DR, stride_hs, stride_ws, stride_ht, stride_wt,
                         stride_hr, stride_wr, inv_temp, pre_s, post_s, pre_t, post_t, pre_r, post_r,
                         lam, beta, log_beta, log_1m_beta, vocab_start,
                         KIND: tl.constexpr, HAS_T: tl.constexpr, HAS_R: tl.constexpr,
                         HAS_Y: tl.constexpr, HAS_ENT: tl.constexpr, HAS_BS: tl.constexpr,
                         HAS_BT: tl.constexpr, HAS_BR: tl.constexpr, HAS_CAP_S: tl.constexpr,
                         HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh[rows, :] (fp32, zero-initialised, [N, DS] contiguous) += sum over V of ds @ ws."""
    post_s, post_t, post_r = post_s * inv_temp, post_t * inv_temp, post_r * inv_temp  # times 1/temperature
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    row_in = load_row_grad_inputs(rs_ptr, g_ptr, y_ptr, rows, row_ok, V, vocab_start, HAS_Y)
    for v0 in range(0, V, BLOCK_V):
        cols, col_ok = tile_cols(v0, V, BLOCK_V)
        ds = fused_ds_tile(hs, ws, bs, ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DS, DT,
                           DR, stride_hs, stride_ws, stride_ht, stride_wt, stride_hr, stride_wr,
                           row_in, pre_s, post_s, pre_t, post_t, pre_r, post_r, lam, beta, log_beta,
                           log_1m_beta, KIND, HAS_T, HAS_R, HAS_ENT, HAS_BS, HAS_BT, HAS_BR,
                           HAS_CAP_S, HAS_CAP_T, HAS_CAP_R, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        ds = ds.to(ws.dtype.element_ty)
        add_dot(dh_ptr, rows, row_ok, ds, ws, cols, col_ok, stride_ws, DS, PRECISION, BLOCK_K)
        tl.debug_barrier()  # next tile's read of dh may come from other threads of this program


@triton.jit
def fused_grad_dw_kernel(hs, ws, bs, ht, wt, bt, hr, wr, br, y_ptr, rs_ptr, g_ptr, dw_ptr, db_ptr,
                         N, V, DS, DT, DR, stride_hs, stride_ws, stride_ht, stride_wt,
                         stride_hr, stride_wr, inv_temp, pre_s, post_s, pre_t, post_t, pre_r, post_r,
                         lam, beta, log_beta, log_1m_beta, vocab_start,
                         NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                         KIND: tl.constexpr, HAS_T: tl.constexpr, HAS_R: tl.constexpr,
                         HAS_Y: tl.constexpr, HAS_ENT: tl.constexpr, HAS_BS: tl.constexpr,
                         HAS_BT: tl.constexpr, HAS_BR: tl.constexpr, HAS_CAP_S: tl.constexpr,
                         HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[cols, :] (fp32, zero-initialised, [V, DS]) += sum over N of ds^T @ hs; db[cols] too."""
    cols, col_ok = tile_cols(tl.program_id(0) * BLOCK_V, V, BLOCK_V)
    db = tl.zeros([BLOCK_V], tl.float32)
    post_s, post_t, post_r = post_s * inv_temp, post_t * inv_temp, post_r * inv_temp  # times 1/temperature
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = rows.to(tl.int64)
        row_in = load_row_grad_inputs(rs_ptr, g_ptr, y_ptr, rows, row_ok, V, vocab_start, HAS_Y)
        ds = fused_ds_tile(hs, ws, bs, ht, wt, bt, hr, wr, br, rows, cols, row_ok, col_ok, DS, DT,
                           DR, stride_hs, stride_ws, stride_ht, stride_wt, stride_hr, stride_wr,
                           row_in, pre_s, post_s, pre_t, post_t, pre_r, post_r, lam, beta, log_beta,
                           log_1m_beta, KIND, HAS_T, HAS_R, HAS_ENT, HAS_BS, HAS_BT, HAS_BR,
                           HAS_CAP_S, HAS_CAP_T, HAS_CAP_R, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if NEED_DB:
            db += tl.sum(ds, 0)
        if NEED_DW:
            ds_t = tl.trans(ds.to(ws.dtype.element_ty))
            add_dot(dw_ptr, cols, col_ok, ds_t, hs, rows, row_ok, stride_hs, DS, PRECISION,
                    BLOCK_K)
            tl.debug_barrier()  # next row block's read of dw may come from other threads
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_ok)
