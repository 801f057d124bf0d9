"""Row statistics of the student softmax (and a target softmax) in one streaming pass.

What it computes -- the backend contract's ``row_stats`` columns, per row ``i`` over the
vocabulary columns a program owns (``a = s / tau`` student, ``b`` the target's scaled logits,
``b = (lam t + (1 - lam) r) / tau`` for G-OPD)::

    m_a = max a   S_a = sum e^(a-m_a)   U_a = sum e^(a-m_a) (a-m_a)
    m_b = max b   S_b = sum e^(b-m_b)   D_q = sum e^(a-m_a) ((a-m_a) - (b-m_b))
                                        D_p = sum e^(b-m_b) ((b-m_b) - (a-m_a))
    a_y = a[y]  (the target's scaled logit, 0 when y is not in this program's columns)

``U_a, D_q, D_p`` take the logits relative to the maxima, so a common offset of the logits
never enters them (the absolute ``sum e^(a-m_a) a`` would lose a small KL to cancellation).

Online max/rescale recurrence, one tile ``x[:, j0:j0+BLOCK_V]`` at a time (the softmax of
flash-attention / Milakov & Gimelshein 2018). Both maxima move first; with ``d = m - m'``
(``<= 0``) and ``f = e^d`` the old sums are re-expressed relative to the new maxima, then the
tile's terms (weights ``e^(x - m')``) are added::

    S_a' = f_a S_a                      U_a' = f_a (U_a + d_a S_a)
    D_q' = f_a (D_q + (d_a - d_b) S_a)  D_p' = f_b (D_p + (d_b - d_a) S_b)   (S_b' = f_b S_b)

``-inf`` logits and the padded columns of the last tile (loaded as ``-inf``) have weight exactly
0; their terms are dropped with ``tl.where`` so ``0 * inf`` never makes NaN. While a row has
seen only ``-inf``, ``m`` stays ``-inf``, ``d`` is 0 and the sums stay 0 (the ``d * S`` products
are dropped for ``S = 0``, where ``d`` may be ``-inf``). A factor that underflows to 0 drops the
old sum even if it is ``+inf`` (as the reference does: a term whose weight underflows
contributes 0). Nothing here is saved for backward: the backward kernels (``grad.py``)
recompute tiles from ``A = m_a + log S_a`` and ``B = m_b + log S_b``.

Logit transforms (``opd_kernels.backends``): each model's logits are transformed as they are
loaded, in the same tile. Every kernel takes ``inv_temp`` (``1 / temperature``) and each model's
``pre_*``/``post_*`` (``transform_consts``: ``post = scale`` without a cap; ``pre = scale / cap``,
``post = cap`` with one) and multiplies each ``post_*`` by ``inv_temp`` on entry; the helpers get
that product as ``post``: ``post * x`` without a cap (exactly ``x * inv_temp`` for the identity) or
``post * tanh(pre * x)`` with one (``-inf`` stays ``-inf``), chosen by the constexpr ``HAS_CAP_*`` flags so
the uncapped kernels hold no transform code. ``tanh(u) = 1 - 2 / (e^(2u) + 1)``: exact limits +-1,
absolute error ~1e-7 (what the logits' rounding costs anyway), the same code in the interpreter.

The vocabulary may be split across the second grid axis (``n_splits`` ranges of whole tiles) to
fill the GPU when N is small; the launcher merges the per-split rows exactly like vocab shards.
"""
import triton
import triton.language as tl


@triton.jit
def move_max(x, m_old):
    """New running max ``m = max(m_old, max_j x_j)``, the gap ``d = m_old - m`` (0 when the max
    did not move, also -inf -> -inf), ``x - m`` (-inf where x is, also while m is -inf) and the
    weights ``e^(x - m)`` (exactly 0 for -inf; NaN for a NaN logit, so that S carries it)."""
    m = tl.maximum(m_old, tl.max(x, 1))
    d = tl.where(m_old == m, 0.0, m_old - m)
    rel = x - tl.where(m == float("-inf"), 0.0, m)[:, None]
    w = tl.where(x == float("-inf"), 0.0, tl.exp(rel))
    return m, d, rel, w


@triton.jit
def rebased_sum(x, s, d, f):
    """``f * (x + d * s)``: a sum ``x`` of total weight ``s`` re-expressed relative to a max that
    moved by ``-d``. ``d * s`` is 0 for ``s = 0`` (d may be -inf); ``f = 0`` drops x even if +inf."""
    return tl.where(f == 0.0, 0.0, f * (x + tl.where(s == 0.0, 0.0, d * s)))


@triton.jit
def weighted_sum(w, x):
    """``sum_j w_j x_j`` over terms with ``w > 0`` (no ``0 * inf``)."""
    return tl.sum(tl.where(w > 0, w * x, 0.0), 1)


@triton.jit
def stats_update(a, b, m_a, s_a, u_a, m_b, s_b, d_q, d_p, HAS_T: tl.constexpr):
    """Fold one ``[BLOCK_N, BLOCK_V]`` tile of fp32 scaled logits into the running row stats."""
    m_a, d_a, ra, w_a = move_max(a, m_a)
    f_a = tl.exp(d_a)
    if HAS_T:
        m_b, d_b, rb, w_b = move_max(b, m_b)
        f_b = tl.exp(d_b)
        diff = ra - rb  # (a - m_a) - (b - m_b)
        d_q = rebased_sum(d_q, s_a, d_a - d_b, f_a) + weighted_sum(w_a, diff)
        d_p = rebased_sum(d_p, s_b, d_b - d_a, f_b) - weighted_sum(w_b, diff)
        s_b = f_b * s_b + tl.sum(w_b, 1)
    u_a = rebased_sum(u_a, s_a, d_a, f_a) + weighted_sum(w_a, ra)
    s_a = f_a * s_a + tl.sum(w_a, 1)
    return m_a, s_a, u_a, m_b, s_b, d_q, d_p


@triton.jit
def store_stats(out_ptr, rows, row_ok, m_a, s_a, u_a, m_b, s_b, d_q, d_p, a_y,
                HAS_T: tl.constexpr):
    """Write the 8 contract columns of ``out[rows, :]`` (teacher columns 0 without a teacher)."""
    o = out_ptr + rows * 8
    tl.store(o + 0, m_a, mask=row_ok)
    tl.store(o + 1, s_a, mask=row_ok)
    tl.store(o + 2, u_a, mask=row_ok)
    if HAS_T:
        tl.store(o + 3, m_b, mask=row_ok)
        tl.store(o + 4, s_b, mask=row_ok)
        tl.store(o + 5, d_q, mask=row_ok)
        tl.store(o + 6, d_p, mask=row_ok)
    else:
        zero = tl.zeros_like(m_a)
        tl.store(o + 3, zero, mask=row_ok)
        tl.store(o + 4, zero, mask=row_ok)
        tl.store(o + 5, zero, mask=row_ok)
        tl.store(o + 6, zero, mask=row_ok)
    tl.store(o + 7, a_y, mask=row_ok)


@triton.jit
def split_range(V, n_splits, BLOCK_V: tl.constexpr):
    """Vocabulary columns ``[lo, hi)`` owned by this program (grid axis 1 = vocab split)."""
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    lo = tl.program_id(1) * tiles_per_split * BLOCK_V
    hi = tl.minimum(V, lo + tiles_per_split * BLOCK_V)
    return lo, hi


@triton.jit
def load_scaled(ptr, rows, cols, stride, mask, post):
    """fp32 ``x[rows, cols] * post`` with ``-inf`` outside ``mask`` (rows are int64); ``post`` is
    ``scale * inv_temp`` (``transform_consts``), or 1.0 for raw logits."""
    x = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=float("-inf"))
    return x.to(tl.float32) * post


@triton.jit
def tanh(u):
    """``tanh(u) = 1 - 2 / (e^(2u) + 1)``: exactly +-1 in the limits, NaN for NaN."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def softcap(x, pre, post):
    """``post * tanh(pre * x)``, with ``-inf`` kept ``-inf`` (a banned token stays banned)."""
    return tl.where(x == float("-inf"), float("-inf"), post * tanh(x * pre))


@triton.jit
def softcap_slope(x, pre, post):
    """(``softcap(x)``, its derivative ``pre * post * (1 - tanh^2(pre * x))``, 0 at -inf)."""
    th = tanh(x * pre)
    return tl.where(x == float("-inf"), float("-inf"), post * th), (pre * post) * (1.0 - th * th)


@triton.jit
def load_logits(ptr, rows, cols, stride, mask, pre, post, HAS_CAP: tl.constexpr):
    """fp32 transformed scaled logits (``-inf`` outside ``mask``): softcap or ``x * post``."""
    if HAS_CAP:
        return softcap(load_scaled(ptr, rows, cols, stride, mask, 1.0), pre, post)
    return load_scaled(ptr, rows, cols, stride, mask, post)


@triton.jit
def load_target(t_ptr, r_ptr, rows, cols, stride_t, stride_r, mask, pre_t, post_t, pre_r, post_r,
                lam, HAS_R: tl.constexpr, HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr):
    """Target scaled logits ``b``: ``T_t(t) / tau``, or ``(lam T_t(t) + (1 - lam) T_r(r)) / tau``."""
    b = load_logits(t_ptr, rows, cols, stride_t, mask, pre_t, post_t, HAS_CAP_T)
    if HAS_R:
        r = load_logits(r_ptr, rows, cols, stride_r, mask, pre_r, post_r, HAS_CAP_R)
        # padding, and tokens banned (-inf) by either model, are banned in the target
        # (lam*(-inf) + (1-lam)*(-inf) would be NaN, and +inf for a reference-only ban)
        banned = (b == float("-inf")) | (r == float("-inf"))
        b = tl.where(mask & ~banned, lam * b + (1.0 - lam) * r, float("-inf"))
    return b


@triton.jit
def row_stats_kernel(s_ptr, t_ptr, r_ptr, y_ptr, out_ptr,
                     N, V, stride_s, stride_t, stride_r,
                     inv_temp, pre_s, post_s, pre_t, post_t, pre_r, post_r, lam, vocab_start, n_splits,
                     HAS_T: tl.constexpr, HAS_R: tl.constexpr, HAS_Y: tl.constexpr,
                     HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr, HAS_CAP_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[split, rows, :] = row stats of s (and t / r) over this program's vocabulary split."""
    post_s, post_t, post_r = post_s * inv_temp, post_t * inv_temp, post_r * inv_temp  # times 1/temperature
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)  # int64 before multiplying strides: N * stride may exceed 2^31
    lo, hi = split_range(V, n_splits, BLOCK_V)

    m_a = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_b = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    u_a, s_b, d_q, d_p = s_a, s_a, s_a, s_a
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        a = load_logits(s_ptr, rows, cols, stride_s, mask, pre_s, post_s, HAS_CAP_S)
        b = a
        if HAS_T:
            b = load_target(t_ptr, r_ptr, rows, cols, stride_t, stride_r, mask, pre_t, post_t,
                            pre_r, post_r, lam, HAS_R, HAS_CAP_T, HAS_CAP_R)
        m_a, s_a, u_a, m_b, s_b, d_q, d_p = stats_update(a, b, m_a, s_a, u_a, m_b, s_b, d_q, d_p,
                                                         HAS_T)

    a_y = tl.zeros([BLOCK_N], tl.float32)
    if HAS_Y:  # gather the target logit directly (the split that owns it adds it, others add 0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
        inside = row_ok & (y >= lo) & (y < hi)
        x_y = tl.load(s_ptr + rows * stride_s + y, mask=inside, other=0.0).to(tl.float32)
        if HAS_CAP_S:
            a_y = softcap(x_y, pre_s, post_s)
        else:
            a_y = x_y * post_s
    out_rows = tl.program_id(1).to(tl.int64) * N + rows
    store_stats(out_ptr, out_rows, row_ok, m_a, s_a, u_a, m_b, s_b, d_q, d_p, a_y, HAS_T)
