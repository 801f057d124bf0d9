"""Backend contract: the few row-level primitives every backend (torch, triton, cuda) implements.

The public ops (``opd_kernels.ops``) do validation, flattening, masking, reductions, autograd
and vocab-parallel communication once, in Python. A backend only supplies these primitives on
2-D inputs. ``get(impl, device)`` below is the one backend lookup (the ops use it too). Everything below is per row ``i`` (a token position), over the *local* vocabulary
columns ``0..V-1`` of the tensors given (one vocabulary shard when running vocab-parallel).

Notation: ``a = s * inv_temp`` (student), ``b = t * inv_temp`` (teacher) or, when a reference
``r`` is given, ``b = (lam * t + (1 - lam) * r) * inv_temp`` (G-OPD target), each of s, t, r
first passed through its logit transform (below; the identity by default). Inputs may be
fp32/bf16/fp16 (student and teacher may differ); all math is fp32; the last dim is contiguous,
the row stride is arbitrary (``vocab_size=`` slices are views); offsets must be int64-safe.
Terms whose weight ``e^(x - m)`` is exactly 0 (``-inf`` logits) contribute 0, never NaN.

Logits level (required)::

    row_stats(s, t, r, targets, *, inv_temp, lam, vocab_start, tf_s, tf_t, tf_r) -> Tensor[N, 8] float32
        t, r, targets may be None (t None => columns 3..6 are 0; r requires t).
        columns (STAT_* below), with the logits taken relative to the maxima in 2, 5, 6:
          0 m_a  = max_v a                      1 S_a = sum e^(a-m_a)
          2 U_a  = sum e^(a-m_a) * (a-m_a)      3 m_b = max_v b
          4 S_b  = sum e^(b-m_b)                5 D_q = sum e^(a-m_a) * ((a-m_a) - (b-m_b))
          6 D_p  = sum e^(b-m_b) * ((b-m_b) - (a-m_a))
          7 a_y  = a[targets-vocab_start] if that index is in [0, V) else 0
        (a common offset of the logits never enters U_a, D_q, D_p, so a small KL is not lost
        to cancellation between large sums.) One streaming pass with the online max/rescale
        recurrence: when the maxima move from (m_a, m_b) to (M_a, M_b), with d = m - M and
        f = e^d, the partial sums become
          S_a -> f_a S_a,  U_a -> f_a (U_a + d_a S_a),  D_q -> f_a (D_q + (d_a - d_b) S_a),
          S_b -> f_b S_b,  D_p -> f_b (D_p + (d_b - d_a) S_b)
        (a part with S = 0, m = -inf contributes 0); the same rule merges vocab splits and, in
        ``opd_kernels.parallel.merge_shards``, shards. ``finish`` then gives
        A = m_a + log S_a = logsumexp(a), B = m_b + log S_b, entropy = log S_a - U_a/S_a,
        reverse_kl = D_q/S_a - log S_a + log S_b, forward_kl = D_p/S_b - log S_b + log S_a,
        logprob = a_y - A.

    jsd_sums(s, t, AB, *, inv_temp, beta, tf_s, tf_t) -> Tensor[N, 2] float32
        with A = AB[:, 0], B = AB[:, 1] the *global* log-normalizers, p = e^(b-B),
        q = e^(a-A), M = beta*p + (1-beta)*q:
          col 0 = sum p * (log p - log M),   col 1 = sum q * (log q - log M)
        (only called with 0 < beta < 1; beta=0/1 are mapped to forward/reverse KL.)

    grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam, beta, vocab_start, out=None,
                with_entropy=False, tf_s, tf_t, tf_r)
        -> Tensor[N, V] in s.dtype (written into ``out`` when given; ``out`` may be ``s`` itself)
        rs: [N, 4] float32 = (A, B, C, H): log-normalizers, the row constant C
            (reverse_kl value for "reverse_kl", KL(q||M) for "jsd", else unused) and entropy H.
        g:  [N, 2] float32 = (g_main, g_ent) upstream coefficients per row (0 for masked rows).
        returns inv_temp * (g_main * d(main)/da + g_ent * dH/da), where main is:
          "logprob":    d/da = onehot(y) - q          (y = targets - vocab_start, may be off-shard)
          "forward_kl": d/da = q - p
          "reverse_kl": d/da = q * (log q - log p - C)      (G-OPD: p from the combined target)
          "jsd":        d/da = (1-beta) * q * (log q - log M - C)
        and dH/da = -q * (log q + H). Terms with q == 0 give 0. With ``with_entropy=False``
        the g_ent column is ignored (the entropy term is skipped entirely).

Fused with the lm_head (optional; ``opd_kernels.ops`` falls back to chunked matmuls feeding
the logits-level primitives when a backend lacks them)::

    fused_row_stats(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, *, inv_temp, lam, vocab_start,
                    tf_s, tf_t, tf_r)
        -> [N, 8] as row_stats with s = hs @ ws.T + bs, t = ht @ wt.T + bt, r = hr @ wr.T + br
    fused_jsd_sums(hs, ws, bs, ht, wt, bt, AB, *, inv_temp, beta, tf_s, tf_t) -> [N, 2]
    fused_grad(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, rs, g, *, kind, inv_temp, lam, beta,
               vocab_start, need_dw, need_db, with_entropy, tf_s, tf_t, tf_r)
        -> (dh [N, d] float32, dw [V, d] float32 or None, db [V] float32 or None)
        gradients of sum_i (g_main_i * main_i + g_ent_i * H_i) w.r.t. hs, ws, bs. The ops always
        pass ``with_entropy`` explicitly (a launcher's default for it is not part of the contract).

The ops hand every primitive *local* ids (``targets`` already shifted to the shard, see
``opd_kernels.parallel``), so they call these with the default ``vocab_start=0``.

Logit transforms (every primitive above, keyword-only, default the identity)::

    tf_s, tf_t, tf_r = (scale, cap)   for the student s, the teacher t, the reference r
                                      (row_stats / grad_logits / fused_row_stats / fused_grad take
                                      all three; jsd_sums / fused_jsd_sums take tf_s and tf_t)

    each model's raw logits x become  x -> cap * tanh(scale * x / cap)   (cap > 0: softcap)
                                      x -> scale * x                     (cap = 0 or None: none)
    *before* the temperature, so a = inv_temp * T_s(s), b = inv_temp * T_t(t), and the G-OPD
    target is lam * inv_temp * T_t(t) + (1 - lam) * inv_temp * T_r(r). ``scale`` is a Cohere-style
    ``logit_scale`` (applied first), ``cap`` Gemma 2/3's ``final_logit_softcapping``. Every
    statistic, ``a_y`` included, is of the transformed logits. ``scale`` must be finite and > 0,
    ``cap`` finite and >= 0 (``ValueError`` otherwise; see ``transform_consts``).
    ``-inf`` (a banned token) stays ``-inf`` through the transform (cap * tanh(-inf) would be
    -cap, which would un-ban it); +inf maps to +cap.
    Gradients stay w.r.t. the raw student logits s (teacher and reference are constants):
    ds = (d/da) * inv_temp * scale * (1 - tanh^2(scale * s / cap)) with a cap, (d/da) * inv_temp *
    scale without; at a banned (-inf) student logit the capped slope is 0 (the limit). Where the
    capped slope is exactly 0 (-inf, or tanh rounded to +-1) ds is 0 even if d/da is infinite.
    In-kernel form (``transform_consts``, the Triton launchers): capped ``a = inv_temp * post *
    tanh(pre * x)`` with ``pre = scale / cap``, ``post = cap`` and slope ``inv_temp * pre * post *
    (1 - tanh^2)``; uncapped ``a = inv_temp * post * x`` with ``post = scale`` (so the identity
    transform is exactly ``x * inv_temp``). ``inv_temp`` reaches each kernel as its own argument.

A backend is a module exposing these names plus ``NAME`` and ``available() -> (bool, reason)``.
"""
from typing import NamedTuple

import torch

from .._dispatch import resolve

# the row-statistics columns (``_stats.py``, the algebra that reads them) and the transform check
# (``_validate.py``) live in the shared modules below this contract; re-exported here
from .._stats import (N_STATS, STAT_A_Y, STAT_D_P, STAT_D_Q, STAT_M_A, STAT_M_B, STAT_S_A,  # noqa: F401
                      STAT_S_B, STAT_U_A)
from .._validate import IDENTITY, check_transform  # noqa: F401

KINDS = ("logprob", "forward_kl", "reverse_kl", "jsd")


class TransformConsts(NamedTuple):
    """A model's logit transform in its in-kernel form (see the module docstring)."""
    capped: bool  # cap > 0
    pre: float    # scale / cap (capped), else 0.0 (unused)
    post: float   # cap (capped), else scale


def transform_consts(tf, name: str = "tf") -> TransformConsts:
    """(capped, pre, post) of ``tf = (scale, cap)``, checked (``ValueError``/``TypeError`` name ``name``)."""
    scale, cap = check_transform(tf, name)
    if cap > 0.0:
        return TransformConsts(True, scale / cap, cap)
    return TransformConsts(False, 0.0, scale)


def get(impl: str = "auto", device="cpu"):
    """The backend module that ``impl`` ("auto" | "torch" | "triton" | "cuda") resolves to for
    tensors on ``device`` -- the lookup every op does; raises ``ValueError`` with the reason when
    that backend is not available here."""
    return resolve(impl, torch.device(device))
