"""Pure math from per-shard row statistics to per-row results (no communication here).

A backend's ``row_stats`` gives, per row and over its local vocabulary columns,
``(m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y)`` (see ``opd_kernels.backends``); every sum is
weighted by ``e^(a - m_a)`` or ``e^(b - m_b)`` and ``U_a, D_q, D_p`` sum logits *relative to
the maxima* (``a - m_a``, ``b - m_b``), so a common offset of the logits never enters them and
a small KL does not come out of the cancellation of large absolute sums. Shards merge like the
online-softmax recurrence itself (``rebase``): with ``M = max_r m_r`` each shard's sums are
re-expressed relative to ``M`` and added (across ranks: ``opd_kernels.parallel.merge_shards``).
``finish`` gives the per-row quantities, ``row_outputs`` what one op kind returns and saves for
its backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns of a backend's ``row_stats`` (the contract: ``opd_kernels.backends``, which re-exports them).
STAT_M_A, STAT_S_A, STAT_U_A, STAT_M_B, STAT_S_B, STAT_D_Q, STAT_D_P, STAT_A_Y = range(8)
N_STATS = 8


@dataclass
class Rows:
    A: torch.Tensor        # logsumexp of the student's scaled logits
    B: torch.Tensor        # logsumexp of the (combined) teacher's scaled logits
    entropy: torch.Tensor  # H(q)
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    logprob: torch.Tensor  # a_y - A


def _max_shift(m: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """m - M for a max that moved from m up to M; 0 when it did not move (also -inf -> -inf)."""
    return torch.where(m == M, torch.zeros_like(m), m - M)


def _shift_times_weight(d: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """d * S, 0 for an empty part (S = 0, where d may be -inf or NaN); NaN in S propagates."""
    return torch.where(S == 0, torch.zeros_like(S), d * S)


def _scale(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x * f, where a factor that underflowed to 0 drops x even if x is +inf."""
    return torch.where(f == 0, torch.zeros_like(x), x * f)


def rebase(stats: torch.Tensor, M_a: torch.Tensor, M_b: torch.Tensor) -> torch.Tensor:
    """``stats [..., 8]`` re-expressed relative to the maxima ``M_a >= m_a``, ``M_b >= m_b``.

    With ``d_a = m_a - M_a``, ``d_b = m_b - M_b``, ``f = e^d``::

        S_a -> f_a S_a    U_a -> f_a (U_a + d_a S_a)    D_q -> f_a (D_q + (d_a - d_b) S_a)
        S_b -> f_b S_b                                   D_p -> f_b (D_p + (d_b - d_a) S_b)

    A part that saw only ``-inf`` (``S = 0``, ``m = -inf``) contributes 0. The ``m`` columns are
    set to ``M``; ``a_y`` is unchanged. The results of all parts then simply add up.
    """
    out = stats.clone()
    S_a, S_b = stats[..., STAT_S_A], stats[..., STAT_S_B]
    d_a, d_b = _max_shift(stats[..., STAT_M_A], M_a), _max_shift(stats[..., STAT_M_B], M_b)
    f_a, f_b = d_a.exp(), d_b.exp()
    out[..., STAT_M_A], out[..., STAT_M_B] = M_a, M_b
    out[..., STAT_S_A], out[..., STAT_S_B] = S_a * f_a, S_b * f_b
    out[..., STAT_U_A] = _scale(stats[..., STAT_U_A] + _shift_times_weight(d_a, S_a), f_a)
    out[..., STAT_D_Q] = _scale(stats[..., STAT_D_Q] + _shift_times_weight(d_a - d_b, S_a), f_a)
    out[..., STAT_D_P] = _scale(stats[..., STAT_D_P] + _shift_times_weight(d_b - d_a, S_b), f_b)
    return out


# columns that add up across vocabulary parts once rebased to common maxima
SUM_COLUMNS = [STAT_S_A, STAT_U_A, STAT_S_B, STAT_D_Q, STAT_D_P, STAT_A_Y]
MAX_COLUMNS = [STAT_M_A, STAT_M_B]


def finish(stats: torch.Tensor) -> Rows:
    """Per-row quantities from global statistics. Only ``log S`` (not ``A = m + log S``) enters
    the divergences and the entropy, so the maxima never have to cancel in rounding::

        entropy    = log S_a - U_a / S_a
        reverse_kl = D_q / S_a - log S_a + log S_b
        forward_kl = D_p / S_b - log S_b + log S_a

    with ``log S_b - log S_a`` taken as ``log(S_b / S_a)`` (one rounding of a value near 0
    instead of two of ``log S ~ log V``: up to ~3x smaller error for a small KL at V = 32k).
    """
    m_a, S_a, U_a, m_b, S_b, D_q, D_p, a_y = stats.unbind(-1)
    log_S_a = torch.log(S_a)
    A, B = m_a + log_S_a, m_b + torch.log(S_b)
    return Rows(A=A, B=B, entropy=log_S_a - U_a / S_a, reverse_kl=D_q / S_a + torch.log(S_b / S_a),
                forward_kl=D_p / S_b + torch.log(S_a / S_b), logprob=a_y - A)


def row_outputs(rows: Rows, kind: str, beta: float = 0.5, jsd: torch.Tensor | None = None):
    """``(main, entropy, rs)`` of one op ``kind``, with ``rs [N, 4] = (A, B, C, H)`` the row state
    its backward recomputes from (``C``: the reverse-KL value, or ``KL(q||M)`` for ``jsd``).

    ``kind`` is a backend kind or ``"log_normalizer"`` (main = ``A``); ``jsd [N, 2]`` are the
    global JSD sums (``KL(p||M)``, ``KL(q||M)``), needed for ``kind == "jsd"`` only.
    """
    C = torch.zeros_like(rows.A)
    if kind == "logprob":
        main = rows.logprob
    elif kind == "log_normalizer":
        main = rows.A
    elif kind == "forward_kl":
        main = rows.forward_kl
    elif kind == "reverse_kl":
        main = C = rows.reverse_kl
    elif kind == "jsd":  # 0 < beta < 1
        main, C = beta * jsd[:, 0] + (1.0 - beta) * jsd[:, 1], jsd[:, 1]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return main, rows.entropy, torch.stack([rows.A, rows.B, C, rows.entropy], -1)
