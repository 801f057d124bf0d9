"""Second pass of the beta-skewed Jensen-Shannon divergence.

What it computes -- the backend contract's ``jsd_sums``: given the *global* log-normalizers
``A = logsumexp(a)``, ``B = logsumexp(b)`` from the first pass (``stats.py``), per row::

    log q = a - A,  log p = b - B,  log M = log(beta p + (1 - beta) q)
    col 0 = sum p (log p - log M)   (KL(p || M))
    col 1 = sum q (log q - log M)   (KL(q || M))

so that ``jsd = beta * col0 + (1 - beta) * col1``. ``M`` depends on both normalizers, so JSD
cannot be folded into the single online pass; with ``A`` and ``B`` known every term is
independent and this is a plain streaming sum over vocabulary tiles (no rescaling).

``log M`` is a two-term logaddexp, ``m + log(e^(x - m) + e^(y - m))`` with ``m = max(x, y)``;
where both terms are ``-inf`` (a token neither distribution supports) it is ``-inf`` and the
tile terms, weighted by ``p = 0`` / ``q = 0``, are dropped with ``tl.where``.
Backward (``grad.py``) recomputes ``log M`` tile by tile from the same ``A, B``.
"""
import triton
import triton.language as tl

from .stats import load_logits, split_range


@triton.jit
def log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """``log(beta p + (1 - beta) q)`` elementwise, ``-inf`` where both ``p`` and ``q`` are 0."""
    x = log_p + log_beta
    y = log_q + log_1m_beta
    m = tl.maximum(x, y)
    finite = m > float("-inf")
    m_safe = tl.where(finite, m, 0.0)
    return tl.where(finite, m_safe + tl.log(tl.exp(x - m_safe) + tl.exp(y - m_safe)), float("-inf"))


@triton.jit
def jsd_terms(a, b, A, B, log_beta, log_1m_beta):
    """Per-element ``p (log p - log M)`` and ``q (log q - log M)`` for a tile (0 where weight 0)."""
    log_q = a - A[:, None]
    log_p = b - B[:, None]
    log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    kl_p = tl.where(p > 0, p * (log_p - log_m), 0.0)
    kl_q = tl.where(q > 0, q * (log_q - log_m), 0.0)
    return kl_p, kl_q


@triton.jit
def jsd_row_block(ab_ptr, N, V, n_splits, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's rows (int64) and their mask, its vocabulary split ``[lo, hi)`` and the
    rows' global ``A, B`` (``ab`` [N, 2]; 0 in padded rows)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    lo, hi = split_range(V, n_splits, BLOCK_V)
    A = tl.load(ab_ptr + rows * 2, mask=row_ok, other=0.0)
    B = tl.load(ab_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    return rows, row_ok, lo, hi, A, B


@triton.jit
def store_jsd_sums(out_ptr, N, rows, row_ok, acc_p, acc_q):
    """Write this split's ``(KL(p||M), KL(q||M))`` row sums to ``out[split, rows, 0:2]``."""
    o = out_ptr + (tl.program_id(1).to(tl.int64) * N + rows) * 2
    tl.store(o, acc_p, mask=row_ok)
    tl.store(o + 1, acc_q, mask=row_ok)


@triton.jit
def jsd_sums_kernel(s_ptr, t_ptr, ab_ptr, out_ptr,
                    N, V, stride_s, stride_t, inv_temp, pre_s, post_s, pre_t, post_t, log_beta,
                    log_1m_beta, n_splits, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[split, rows, 0:2] = (KL(p||M), KL(q||M)) summed over this program's vocab split."""
    post_s, post_t = post_s * inv_temp, post_t * inv_temp  # times 1/temperature
    rows, row_ok, lo, hi, A, B = jsd_row_block(ab_ptr, N, V, n_splits, BLOCK_N, BLOCK_V)
    acc_p = tl.zeros([BLOCK_N], tl.float32)
    acc_q = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        a = load_logits(s_ptr, rows, cols, stride_s, mask, pre_s, post_s, HAS_CAP_S)
        b = load_logits(t_ptr, rows, cols, stride_t, mask, pre_t, post_t, HAS_CAP_T)
        kl_p, kl_q = jsd_terms(a, b, A, B, log_beta, log_1m_beta)
        acc_p += tl.sum(kl_p, 1)
        acc_q += tl.sum(kl_q, 1)
    store_jsd_sums(out_ptr, N, rows, row_ok, acc_p, acc_q)
