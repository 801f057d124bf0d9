"""Pure-PyTorch backend: the CPU path, the baseline and (run in float64) the test oracle.

Implements the contract of ``opd_kernels.backends`` with row chunks, so that the transient
fp32 buffers stay near ``OPD_CHUNK_BYTES`` (default 64 MB) whatever N is. Each chunk sees the
whole local vocabulary, so the statistics are computed directly (max, then sums), which is the
same quantity the kernels' online recurrence produces:

    m = max_v x,  S = sum_v e^(x - m),  and weighted sums  sum_v e^(x - m) * f(v),

where ``f`` uses the logits relative to the maxima (``x - m``), never the raw logits.

Terms whose weight e^(x - m) is 0 (``-inf`` logits) are masked to 0 so that ``0 * inf`` never
produces NaN.

Logit transforms (``tf_s``, ``tf_t``, ``tf_r`` = (scale, cap), see ``opd_kernels.backends``) are
applied per chunk as the logits are turned into fp32, together with the temperature (``_transformed``):
``cap * inv_temp * tanh(scale * x / cap)`` with ``-inf`` kept ``-inf`` when capped, else
``scale * inv_temp * x``; the identity costs nothing extra.
"""
from __future__ import annotations

import torch

from .._chunks import row_ranges
from . import IDENTITY, N_STATS, check_transform

NAME = "torch"


def available():
    return True, ""


def _compute_copy(x: torch.Tensor) -> torch.Tensor:
    """fp32 compute copy (float64 stays float64 so the oracle keeps its precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _scaled(x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return _compute_copy(x) if inv_temp == 1.0 else _compute_copy(x) * inv_temp


def _transformed(x: torch.Tensor, inv_temp: float, tf, name: str) -> torch.Tensor:
    """``inv_temp * T(x)`` in fp32 (fp64 stays): ``x`` itself for the identity on an fp32 input
    with ``inv_temp = 1`` (so callers must not write into it), otherwise a fresh buffer."""
    scale, cap = check_transform(tf, name)
    if not cap:
        return _scaled(x, scale * inv_temp)
    a = _compute_copy(x).mul(scale / cap).tanh_().mul_(cap * inv_temp)
    return a.masked_fill_(torch.isneginf(x), -float("inf"))  # banned stays banned


def _transformed_slope(x: torch.Tensor, inv_temp: float, tf, name: str):
    """(``a = inv_temp * T(x)``, ``da/dx``): the slope is a float without a cap, else the tensor
    ``inv_temp * scale * (1 - tanh^2(scale * x / cap))`` (0 at -inf, where tanh = -1)."""
    scale, cap = check_transform(tf, name)
    if not cap:
        return _scaled(x, scale * inv_temp), scale * inv_temp
    th = _compute_copy(x).mul(scale / cap).tanh_()
    a = th.mul(cap * inv_temp).masked_fill_(torch.isneginf(x), -float("inf"))
    return a, th.square_().neg_().add_(1.0).mul_((scale / cap) * (cap * inv_temp))


def _weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_v w * x where terms with w == 0 and x = +-inf (0 * inf = NaN) count as 0.
    A NaN input still propagates: it makes the row max, hence S, NaN."""
    return torch.nansum(w * x, -1)


def _relative(x: torch.Tensor, inp: torch.Tensor):
    """(m, x - m, e^(x - m)) per row; ``x - m`` is -inf where x is, also in an all -inf row
    (m = -inf). ``x - m`` is written into ``x`` unless ``x`` is the input ``inp`` itself."""
    m = x.amax(-1, keepdim=True)
    shift = m.masked_fill(m == -float("inf"), 0.0)
    rel = x - shift if x is inp else x.sub_(shift)
    return m, rel, rel.exp()


def _target_logits(b_t, b_r, lam):
    """G-OPD target ``lam b_T + (1 - lam) b_ref``; a token banned (-inf) by either model is
    banned in the target (instead of -inf + inf = NaN, or +inf for lam > 1)."""
    if b_r is None:
        return b_t
    return torch.where(torch.isneginf(b_t) | torch.isneginf(b_r), -float("inf"), lam * b_t + (1.0 - lam) * b_r)


def _local_target(targets, vocab_start, V):
    y = targets - vocab_start
    inside = (y >= 0) & (y < V)
    return y.clamp(0, V - 1), inside


# Columns a given op needs (the engine passes ``need=`` to this backend only; the kernels of
# the other backends compute all eight in the same memory-bound pass).
ACCEPTS_NEED = True
NEED = {"logprob": {"a_y"}, "logprob+entropy": {"a_y", "U_a"}, "forward_kl": {"D_p"},
        "reverse_kl": {"D_q"}, "jsd": {"b"}}


def row_stats(s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0, need=None, tf_s=IDENTITY,
              tf_t=IDENTITY, tf_r=IDENTITY):
    N, V = s.shape
    need = need or {"U_a", "D_q", "D_p", "a_y"}
    out = torch.zeros(N, N_STATS, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                      device=s.device)
    for i, j in row_ranges(N, V):
        # a, b below are the logits relative to their row max (temporaries, reused in place)
        s_i = s[i:j]
        m_a, a, e_a = _relative(_transformed(s_i, inv_temp, tf_s, "tf_s"), s_i)
        out[i:j, 0], out[i:j, 1] = m_a[:, 0], e_a.sum(-1)
        diff = None
        if t is not None:
            t_i = t[i:j]
            b = _target_logits(_transformed(t_i, inv_temp, tf_t, "tf_t"),
                               None if r is None else _transformed(r[i:j], inv_temp, tf_r, "tf_r"), lam)
            m_b, b, e_b = _relative(b, t_i)
            out[i:j, 3], out[i:j, 4] = m_b[:, 0], e_b.sum(-1)
            if "D_q" in need or "D_p" in need:
                diff = torch.sub(a, b, out=b)  # (a - m_a) - (b - m_b)
        if "U_a" in need:
            out[i:j, 2] = torch.nansum(a.mul_(e_a), -1)  # nansum: 0 * -inf terms count as 0
        if diff is not None:
            if "D_q" in need:
                out[i:j, 5] = torch.nansum(e_a.mul_(diff), -1)
            if "D_p" in need:
                out[i:j, 6] = -torch.nansum(diff.mul_(e_b), -1)
        if targets is not None:
            y, inside = _local_target(targets[i:j], vocab_start, V)
            a_y = _transformed(s_i.gather(1, y[:, None])[:, 0], inv_temp, tf_s, "tf_s")
            out[i:j, 7] = torch.where(inside, a_y, 0.0)
    return out


def _log_mixture(a, b, A, B, beta):
    """log q, log p and log M = log(beta p + (1 - beta) q), stable via logaddexp."""
    log_q, log_p = a - A[:, None], b - B[:, None]
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=a.dtype)),
                            log_q + torch.log(torch.tensor(1.0 - beta, dtype=a.dtype)))
    return log_q, log_p, log_m


def jsd_sums(s, t, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY):
    N, V = s.shape
    out = torch.zeros(N, 2, dtype=AB.dtype, device=s.device)
    for i, j in row_ranges(N, V):
        a, b = _transformed(s[i:j], inv_temp, tf_s, "tf_s"), _transformed(t[i:j], inv_temp, tf_t, "tf_t")
        log_q, log_p, log_m = _log_mixture(a, b, AB[i:j, 0], AB[i:j, 1], beta)
        out[i:j, 0] = _weighted_sum(log_p.exp(), log_p - log_m)
        out[i:j, 1] = _weighted_sum(log_q.exp(), log_q - log_m)
    return out


def _zero_nan_(x: torch.Tensor) -> torch.Tensor:
    """0 * inf terms (zero probability times an infinite log-ratio) are 0."""
    return x.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=-float("inf"))


def grad_logits_chunk(a, b, targets, rs, g, *, kind, beta=0.5, vocab_start=0, with_entropy=False):
    """g_main * d(main)/da (+ g_ent * dH/da) for one chunk of scaled logits ``a`` (fp32/fp64).

    ``0 * inf`` terms (a zero probability times an infinite log-ratio, or a masked row with
    g = 0 times an infinite term) are 0. A NaN input gives a NaN loss; its gradient here is 0.
    """
    A, B, C, H = (x[:, None] for x in rs.unbind(-1))
    q = (a - A).exp_()
    if kind == "logprob":
        y, inside = _local_target(targets, vocab_start, a.shape[1])
        d = q.neg()
        d.scatter_add_(1, y[:, None], inside[:, None].to(q.dtype))
    elif kind == "forward_kl":
        d = q - (b - B).exp_()
    elif kind == "reverse_kl":  # q (log q - log p - C) = q ((a - b) - (A - B + C))
        d = (a - b).sub_(A - B + C).mul_(q)
    elif kind == "jsd":
        _, _, log_m = _log_mixture(a, b, A[:, 0], B[:, 0], beta)
        d = (a - A).sub_(log_m).sub_(C).mul_(q).mul_(1.0 - beta)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    d = _zero_nan_(d.mul_(g[:, :1]))
    if with_entropy:  # dH/da = -q (log q + H)
        d.add_(_zero_nan_((a - A).add_(H).mul_(q).mul_(-g[:, 1:2])))
    return d


def grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                out=None, with_entropy=False, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
    N, V = s.shape
    out = torch.empty_like(s) if out is None else out
    for i, j in row_ranges(N, V):
        a, slope = _transformed_slope(s[i:j], inv_temp, tf_s, "tf_s")
        b = None
        if t is not None:
            b = _target_logits(_transformed(t[i:j], inv_temp, tf_t, "tf_t"),
                               None if r is None else _transformed(r[i:j], inv_temp, tf_r, "tf_r"), lam)
        tg = None if targets is None else targets[i:j]
        d = grad_logits_chunk(a, b, tg, rs[i:j], g[i:j], kind=kind, beta=beta, vocab_start=vocab_start,
                              with_entropy=with_entropy)
        if isinstance(slope, torch.Tensor):  # chain rule through the softcap (0 * inf -> 0)
            d.mul_(slope).masked_fill_(slope == 0, 0.0)
        elif slope != 1.0:
            d.mul_(slope)
        out[i:j] = d
    return out
