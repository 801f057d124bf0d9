"""Compiled chunk math of the torch backend: the CPU fast path of ``impl="torch"``.

The uncompiled torch backend (``torch_backend``) computes a chunk's statistics and gradient
with a dozen eager elementwise passes over ``[c, V]`` buffers; on a CPU those passes, not the
GEMMs, dominate (measured: 2.2-3.7x the GEMM floor for the fused-linear losses). Here the whole
per-chunk computation of one op is a single function compiled by inductor, which fuses it into
a few vectorized loops over the chunk (reductions for ``logsumexp`` and the row sums, then one
pointwise loop for the gradient). Per row, with ``a = inv_temp * T_s(s)`` and ``b`` the target's
scaled logits (``lam b_T + (1 - lam) b_ref`` for G-OPD; ``T`` the logit transform below)::

    A = logsumexp(a), B = logsumexp(b), la = a - A, lb = b - B, q = e^la, p = e^lb
    logprob     main = a_y - A                          d = onehot(y) - q
    forward_kl  main = sum p (lb - la)                  d = q - p
    reverse_kl  main = C = sum q (la - lb)              d = q (la - lb - C)
    jsd         lm = log(beta p + (1 - beta) q), C = sum q (la - lm)
                main = beta sum p (lb - lm) + (1 - beta) C      d = (1 - beta) q (la - lm - C)
    entropy     H = -sum q la                           dH = -q (la + H)
    ds = inv_temp * T_s'(s) * (g_main d + g_ent dH)

Terms with zero weight (``q = 0`` or ``p = 0``: ``-inf`` logits) are 0, never ``0 * inf``; a
row with ``g = 0`` (masked) gets a zero gradient even where ``d`` is infinite; a NaN gradient
term is 0, as in the uncompiled backend. Four entry points, one per need of the ops:
``rows`` (forward: main, entropy and the saved row state ``rs = (A, B, C, H)``), ``grad``
(backward from ``rs``, into a new tensor: the logits-level ops, whose logits are the caller's),
``grad_`` (the same, written over the chunk's logits: the fused-linear backward) and
``rows_and_grad_`` (rows and the gradient over the logits in one pass, so a chunk is read once
instead of twice: the scalar-loss ops' gradient-in-forward and the kept gradient of rule 4).
Writing over the logits saves a ``[c, V]`` output per chunk; inductor stores the gradient into
the input's buffer directly (``copy_`` of a graph input), after the row reductions that read it.

Logit transform ``T`` per model, ``tf = (scale, cap)``: ``x -> cap tanh(scale x / cap)`` (cap > 0)
or ``scale x``; ``-inf`` stays ``-inf``; ``T'`` is recomputed from ``s``. The transforms come from
the spec (``RowSpec.tf = (tf_s, tf_t, tf_r)``).

When it runs is rule 3 of ``ops/_decide.py``: the torch backend, CPU tensors in fp32/bf16/fp16
(float64 is the test oracle and stays uncompiled), no process group, at least
``OPD_COMPILE_MIN_ELEMENTS`` (default 2**21) logits in the call, and ``OPD_TORCH_COMPILE`` not
"0". Small calls stay eager,
so the tests (which compare the eager path with float64) and the bundled trainer's tiny
vocabulary never pay inductor's compile time (~10-40 s per op variant on 2 cores, once per
process). Each (op kind, entry point) is its own compiled function, i.e. its own dynamo cache,
so the variants of one op never evict another's; the row count is dynamic (chunks differ).
"""
from __future__ import annotations

import math
import types
from functools import lru_cache

import torch

# Rows per compiled call: inductor's kernel makes several passes over ALL the rows it is given
# (one loop per row reduction, then the pointwise loop), so a call on a whole chunk streams the
# chunk from memory once per loop; ~1 MiB per model stays in cache between the loops. Measured
# (2-core EPYC, fp32 reverse KL fwd+bwd, N=2048, V=32000, d=256, 524-row chunks): 925 ms with
# one call per chunk, 843 ms with 8-row calls, 867 ms with 32-row calls.
PASS_BYTES = 2 ** 20

# ----------------------------------------------------------------------------- the math
def _transform(x, tf, inv_temp):
    """``(inv_temp * T(x), dT/dx * inv_temp)`` in fp32; the slope is a float without a cap."""
    scale, cap = tf
    x = x.float()
    if not cap:
        return x * (scale * inv_temp), scale * inv_temp
    th = torch.tanh(x * (scale / cap))
    a = torch.where(torch.isneginf(x), -math.inf, th * (cap * inv_temp))
    return a, (1.0 - th * th) * (scale * inv_temp)


def _lse(x):
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    return m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))


def _weighted_sum(w, x):
    """``sum_v w x`` with zero-weight terms dropped (no ``0 * inf``); NaN propagates."""
    return torch.where(w == 0, 0.0, w * x).sum(-1, keepdim=True)


def _weighted(w, x):
    return torch.where(w == 0, 0.0, w * x)


def _chunk(s, t, r, y, g, rs, kind: str, want: str, inv_temp: float, lam: float, beta: float,
           entropy: bool, tf_s, tf_t, tf_r):
    """The body of every compiled entry point (``want``: "rows", "grad" (returned), or "grad_" |
    "both_" (rows and the gradient, written into ``s`` in place))."""
    a, slope = _transform(s, tf_s, inv_temp)
    b = None
    if t is not None:
        b, _ = _transform(t, tf_t, inv_temp)
        if r is not None:
            br, _ = _transform(r, tf_r, inv_temp)
            b = torch.where(torch.isneginf(b) | torch.isneginf(br), -math.inf, lam * b + (1.0 - lam) * br)
    if want in ("grad", "grad_"):
        A, B, C, H = (x[:, None] for x in rs.unbind(-1))
    else:
        A = _lse(a)
        B = _lse(b) if b is not None else torch.zeros_like(A)
    la = a - A
    q = torch.exp(la)
    lb = b - B if b is not None else None
    p = torch.exp(lb) if kind in ("forward_kl", "jsd") else None
    lm = None
    if kind == "jsd":  # log M from p and q (one log, not logaddexp's exp + log1p); M >= each
        lp_, lq_ = lb + math.log(beta), la + math.log(1.0 - beta)  # term, which bounds log M below
        lm = torch.maximum(torch.log(beta * p + (1.0 - beta) * q), torch.maximum(lp_, lq_))
    onehot = inside = None
    if kind == "logprob":
        V = a.shape[1]
        inside = ((y >= 0) & (y < V))[:, None]
        onehot = (torch.arange(V, device=a.device)[None, :] == y[:, None]) & inside
    if want not in ("grad", "grad_"):
        C = torch.zeros_like(A)
        if kind == "logprob":  # a gather, not a masked sum over the row: one read of a_y
            a_y = a.gather(1, torch.where(inside, y[:, None], 0))
            main = torch.where(inside, a_y, 0.0) - A
        elif kind == "log_normalizer":
            main = A
        elif kind == "forward_kl":
            main = _weighted_sum(p, lb - la)
        elif kind == "reverse_kl":
            main = C = _weighted_sum(q, la - lb)
        else:
            C = _weighted_sum(q, la - lm)
            main = beta * _weighted_sum(p, lb - lm) + (1.0 - beta) * C
        H = -_weighted_sum(q, la) if entropy else torch.zeros_like(A)
        if want == "rows":
            return main[:, 0], H[:, 0], torch.cat([A, B, C, H], 1)
    if kind == "logprob":
        d = onehot.float() - q
    elif kind == "log_normalizer":
        d = q
    elif kind == "forward_kl":
        d = q - p
    elif kind == "reverse_kl":
        d = _weighted(q, la - lb - C)
    else:
        d = (1.0 - beta) * _weighted(q, la - lm - C)
    grad = d if g is None else _weighted(g[:, 0:1], d)  # None: a unit upstream for main alone
    if entropy:
        grad = grad - _weighted(g[:, 1:2], _weighted(q, la + H))
    grad = torch.nan_to_num(_weighted(slope, grad) if isinstance(slope, torch.Tensor) else grad * slope, nan=0.0)
    if want == "grad_":
        s.copy_(grad)  # inductor stores the gradient straight into the logits buffer
        return None
    if want == "both_":
        s.copy_(grad)
        return main[:, 0], H[:, 0], torch.cat([A, B, C, H], 1)
    return grad


@lru_cache(maxsize=None)
def _compiled(kind: str, want: str):
    """``torch.compile`` of ``_chunk`` under a code object of its own (name ``opd_<kind>_<want>``),
    so that each (kind, want) keeps its own dynamo cache and recompile budget."""
    code = _chunk.__code__.replace(co_name=f"opd_{kind}_{want}")
    fn = types.FunctionType(code, _chunk.__globals__, code.co_name, _chunk.__defaults__)
    return torch.compile(fn, dynamic=True)


def pass_rows(V: int) -> int:
    """Rows per compiled call: about ``PASS_BYTES`` of fp32 logits per model, at least 8 rows."""
    return max(8, PASS_BYTES // (4 * max(1, V)))


def _call(want, s, t, r, y, g, rs, spec, out=None):
    """The compiled ``_chunk`` over ``pass_rows`` rows at a time; per-row outputs concatenated,
    a ``"grad"`` written into ``out``."""
    fn, step = _compiled(spec.kind, want), pass_rows(s.shape[1])
    outs = []
    for i in range(0, max(1, s.shape[0]), step):  # one call even for no rows
        j = min(s.shape[0], i + step)
        res = fn(s[i:j], *(None if x is None else x[i:j] for x in (t, r, y, g, rs)), spec.kind, want,
                 spec.inv_temp, spec.reward_scale, spec.beta, spec.entropy, *spec.tf)
        if want == "grad":
            out[i:j] = res
        elif want != "grad_":
            outs.append(res)
    if want in ("grad", "grad_"):
        return out
    return tuple(x[0] if len(outs) == 1 else torch.cat(x) for x in zip(*outs))


# ----------------------------------------------------------------------------- entry points
def rows(s, t, r, y, spec):
    """``(main [c], entropy [c], rs [c, 4])`` of one chunk of logits (fp32)."""
    return _call("rows", s, t, r, y, None, None, spec)


def grad(s, t, r, y, rs, g, spec, out):
    """``d(sum_i g_i . (main_i, H_i)) / ds`` of one chunk from the saved ``rs``, written into ``out``
    (``[c, V]``; ``s`` is the caller's and stays as it is)."""
    return _call("grad", s, t, r, y, g, rs, spec, out)


def grad_(s, t, r, y, rs, g, spec):
    """``grad`` written into ``s`` (a contiguous chunk of logits, overwritten): no ``[c, V]`` output
    buffer (on a CPU a fresh one costs its page faults on every chunk)."""
    _call("grad_", s, t, r, y, g, rs, spec)
    return s


def rows_and_grad_(s, t, r, y, g, spec):
    """``(main, entropy, rs)`` of one chunk (``rows``), with ``d(sum_i g_i . (main_i, H_i)) / ds``
    written into ``s`` in place: the gradient-in-forward of the scalar-loss ops, and (``g=None``:
    ``d main_i / ds``, no entropy) the kept unit gradient of the per-token ops
    (``_fused.fl_forward_kept``), in one pass over the chunk."""
    return _call("both_", s, t, r, y, g, None, spec)
