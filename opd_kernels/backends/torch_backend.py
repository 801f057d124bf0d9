"""Pure-PyTorch backend: the CPU path, the baseline and (run in float64) the test oracle.

Implements the contract of ``opd_kernels.backends`` with row chunks, so that the transient
fp32 buffers stay near ``OPD_CHUNK_BYTES`` (default 64 MB) whatever N is. Each chunk sees the
whole local vocabulary, so the statistics are computed directly (max, then sums), which is the
same quantity the kernels' online recurrence produces:

    m = max_v x,  S = sum_v e^(x - m),  and weighted sums  sum_v e^(x - m) * f(v).

Terms whose weight e^(x - m) is 0 (``-inf`` logits) are masked to 0 so that ``0 * inf`` never
produces NaN.
"""
from __future__ import annotations

import os

import torch

from . import N_STATS

NAME = "torch"
CHUNK_BYTES = int(os.environ.get("OPD_CHUNK_BYTES", 64 * 2**20))


def available():
    return True, ""


def rows_per_chunk(V: int, bytes_per_elem: int = 4, budget: int | None = None) -> int:
    """Rows whose ``[rows, V]`` fp32 buffer fits the chunk budget (at least 1)."""
    return max(1, (budget or CHUNK_BYTES) // max(1, V * bytes_per_elem))


def _f(x: torch.Tensor) -> torch.Tensor:
    """fp32 compute copy (float64 stays float64 so the oracle keeps its precision)."""
    return x if x.dtype == torch.float64 else x.float()


def _wsum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_v w * x with zero-weight terms dropped (so -inf in x under w == 0 gives 0)."""
    return torch.where(w > 0, w * x, 0.0).sum(-1)


def _target_logits(a, b_t, b_r, lam):
    if b_t is None:
        return None
    return b_t if b_r is None else lam * b_t + (1.0 - lam) * b_r


def _local_target(targets, vocab_start, V):
    y = targets - vocab_start
    inside = (y >= 0) & (y < V)
    return y.clamp(0, V - 1), inside


def _chunks(N, V):
    step = rows_per_chunk(V)
    return [(i, min(N, i + step)) for i in range(0, N, step)]


def row_stats(s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0):
    N, V = s.shape
    out = torch.zeros(N, N_STATS, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                      device=s.device)
    for i, j in _chunks(N, V):
        a = _f(s[i:j]) * inv_temp
        m_a = a.amax(-1, keepdim=True)
        e_a = torch.exp(a - m_a)
        out[i:j, 0] = m_a[:, 0]
        out[i:j, 1] = e_a.sum(-1)
        out[i:j, 2] = _wsum(e_a, a)
        if t is not None:
            b = _target_logits(a, _f(t[i:j]) * inv_temp, None if r is None else _f(r[i:j]) * inv_temp, lam)
            m_b = b.amax(-1, keepdim=True)
            e_b = torch.exp(b - m_b)
            out[i:j, 3] = m_b[:, 0]
            out[i:j, 4] = e_b.sum(-1)
            out[i:j, 5] = _wsum(e_a, a - b)
            out[i:j, 6] = _wsum(e_b, b - a)
        if targets is not None:
            y, inside = _local_target(targets[i:j], vocab_start, V)
            out[i:j, 7] = torch.where(inside, a.gather(1, y[:, None])[:, 0], 0.0)
    return out


def _log_mixture(a, b, A, B, beta):
    """log q, log p and log M = log(beta p + (1 - beta) q), stable via logaddexp."""
    log_q, log_p = a - A[:, None], b - B[:, None]
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=a.dtype)),
                            log_q + torch.log(torch.tensor(1.0 - beta, dtype=a.dtype)))
    return log_q, log_p, log_m


def jsd_sums(s, t, AB, *, inv_temp, beta):
    N, V = s.shape
    out = torch.zeros(N, 2, dtype=AB.dtype, device=s.device)
    for i, j in _chunks(N, V):
        a, b = _f(s[i:j]) * inv_temp, _f(t[i:j]) * inv_temp
        log_q, log_p, log_m = _log_mixture(a, b, AB[i:j, 0], AB[i:j, 1], beta)
        out[i:j, 0] = _wsum(log_p.exp(), log_p - log_m)
        out[i:j, 1] = _wsum(log_q.exp(), log_q - log_m)
    return out


def grad_logits_chunk(a, b, targets, rs, g, *, kind, inv_temp, beta=0.5, vocab_start=0):
    """d(loss)/ds for one chunk of scaled logits ``a`` (and target logits ``b``), fp32/fp64."""
    A, B, C, H = rs.unbind(-1)
    log_q = a - A[:, None]
    q = log_q.exp()
    if kind == "logprob":
        y, inside = _local_target(targets, vocab_start, a.shape[1])
        d = -q
        d.scatter_add_(1, y[:, None], inside[:, None].to(q.dtype))
    elif kind == "forward_kl":
        d = q - (b - B[:, None]).exp()
    elif kind == "reverse_kl":
        d = torch.where(q > 0, q * (log_q - (b - B[:, None]) - C[:, None]), 0.0)
    elif kind == "jsd":
        _, _, log_m = _log_mixture(a, b, A, B, beta)
        d = torch.where(q > 0, (1.0 - beta) * q * (log_q - log_m - C[:, None]), 0.0)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return d * g[:, :1]


def _entropy_grad(a, A, H):
    log_q = a - A[:, None]
    q = log_q.exp()
    return torch.where(q > 0, -q * (log_q + H[:, None]), 0.0)


def grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                out=None, with_entropy=False):
    N, V = s.shape
    out = torch.empty_like(s) if out is None else out
    for i, j in _chunks(N, V):
        a = _f(s[i:j]) * inv_temp
        b = None
        if t is not None:
            b = _target_logits(a, _f(t[i:j]) * inv_temp, None if r is None else _f(r[i:j]) * inv_temp, lam)
        tg = None if targets is None else targets[i:j]
        d = grad_logits_chunk(a, b, tg, rs[i:j], g[i:j], kind=kind, inv_temp=inv_temp, beta=beta,
                              vocab_start=vocab_start)
        if with_entropy:
            d = d + g[i:j, 1:2] * _entropy_grad(a, rs[i:j, 0], rs[i:j, 3])
        out[i:j] = (d * inv_temp).to(out.dtype)
    return out
