"""The float64 test oracle, written from the formulas of docs/design.md, and the one tolerance table.

Nothing here imports ``opd_kernels``: every value is a float64 ``log_softmax`` / ``logsumexp`` /
sum over the full vocabulary, so a bug in the package cannot hide in its own oracle. Tests
import this module as ``oracle`` (``import reference as oracle``). Where a test compares a
backend with the package's torch backend instead (run in float64, a second implementation of
the same backend contract), that module is imported as ``torch_backend_ref``.
"""
import torch

# (rtol, atol) by input dtype and by what is compared ("kind"). The one table of the tests.
#
# value, grad: an op against this oracle. Inputs of low precision are first rounded and the
#   oracle is computed in float64 on the rounded values, so the tolerance only covers the op's
#   own arithmetic (fp32 accumulation, outputs rounded to the input dtype).
# The float32 row also holds the comparisons that are not against this oracle:
#   gemm_grad     dh / dw / db of a fused-linear primitive (each entry sums N or V gradient terms)
#   impl, impl_grad   a backend's public op against the torch backend's (values, gradients)
#   path, path_grad   fused-linear op against the logits-level op on hidden @ weight.T (one backend)
#   kernel, kernel_grad   cuda primitives against the triton ones (both fp32 kernels)
#   reorder       one backend against itself, summed in another order (vocab splits, compiled)
#   norm          norm-wise relative error ||x - y|| / ||y|| of a gradient over a large V (atol unused)
# The float64 row also holds:
#   shards        vocab-parallel ranks (uneven shards, merged statistics) against one process
TOL = {
    torch.float64: dict(value=(1e-9, 1e-10), grad=(1e-9, 1e-10), shards=(1e-7, 1e-9)),
    torch.float32: dict(value=(2e-5, 2e-5), grad=(2e-4, 2e-6), gemm_grad=(2e-4, 2e-5),
                        impl=(1e-4, 1e-5), impl_grad=(1e-3, 1e-5), path=(1e-4, 1e-5), path_grad=(1e-4, 1e-6),
                        kernel=(1e-5, 1e-5), kernel_grad=(1e-4, 1e-6), reorder=(1e-6, 1e-6), norm=(1e-5, 0.0)),
    torch.bfloat16: dict(value=(2e-4, 2e-4), grad=(1.6e-2, 2e-4), norm=(1e-2, 0.0)),
    torch.float16: dict(value=(2e-4, 2e-4), grad=(2e-3, 2e-5)),
}


def tol(dtype=torch.float32, kind="value"):
    """``dict(rtol=, atol=)`` of the table entry."""
    rtol, atol = TOL[dtype][kind]
    return dict(rtol=rtol, atol=atol)


def close(actual, expected, dtype=torch.float32, kind="value"):
    """``actual`` equals ``expected`` (compared in float64 on the CPU) within ``TOL[dtype][kind]``."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol(dtype, kind))


def log_softmax(x, T):
    return torch.log_softmax(x.double() / T, -1)


def _entropy(lq):
    """H(q) = -sum q log q, a banned token (q = 0) contributing 0."""
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, 0.0)).sum(-1)


def token_logprobs(logits, targets, T=1.0, ignore_index=-100):
    lq = log_softmax(logits, T)
    valid = targets != ignore_index
    lp = lq.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, _entropy(lq), 0.0)


def _kl(lx, ly):
    px = lx.exp()
    live = px > 0
    return torch.where(live, px * (torch.where(live, lx, 0.0) - torch.where(live, ly, 0.0)), 0.0).sum(-1)


def _target_logits(t, T, r=None, lam=1.0):
    """The teacher's scaled logits, or the G-OPD target ``lam b_T + (1 - lam) b_ref``; a token
    banned by either model is banned in the target."""
    b = t.double() / T
    if r is None:
        return b
    rr = r.double() / T
    return torch.where(torch.isneginf(b) | torch.isneginf(rr), -float("inf"), lam * b + (1 - lam) * rr)


def divergence_rows(s, t, divergence, beta=0.5, T=1.0, r=None, lam=1.0):
    lq = log_softmax(s, T)
    return _divergence(lq, torch.log_softmax(_target_logits(t, T, r, lam), -1), divergence, beta)


def _divergence(lq, lp, divergence, beta):
    """The divergence between log-distributions ``lq`` (student) and ``lp`` (teacher), per row."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return _kl(lp, lq)
    if divergence == "reverse_kl":
        return _kl(lq, lp)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)


def _log_mix(lp, lq, beta):
    """log(beta p + (1 - beta) q), -inf where both are 0, with a NaN-free gradient."""
    m = beta * lp.exp() + (1 - beta) * lq.exp()
    live = m > 0
    return torch.where(live, torch.log(torch.where(live, m, 1.0)), -float("inf"))


def sparse_rows(s, ids, teacher_lp, divergence, beta=0.5, T=1.0):
    """Buckets {top-k ids, tail}; the student's tail is exact (logsumexp outside the ids), the
    teacher's is 1 - sum of its given probabilities (float64)."""
    lq_full = log_softmax(s, T)
    lq_k = lq_full.gather(-1, ids)
    outside = torch.ones_like(lq_full, dtype=torch.bool).scatter(-1, ids, False)
    lq_tail = torch.logsumexp(torch.where(outside, lq_full, -float("inf")), -1, keepdim=True)
    lp_k = teacher_lp.double()
    lp_tail = torch.log((1 - lp_k.exp().sum(-1, keepdim=True)).clamp_min(0))
    if ids.shape[-1] >= s.shape[-1]:
        lp_tail = torch.full_like(lp_tail, -float("inf"))
    return _divergence(torch.cat([lq_k, lq_tail], -1), torch.cat([lp_k, lp_tail], -1), divergence, beta)


def reduce(rows, mask, reduction):
    rows = torch.where(mask, rows, 0.0) if mask is not None else rows
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = mask.sum().clamp(min=1) if mask is not None else rows.numel()
    return rows.sum() / n


def saved_row_state(s, t, r, kind, inv_temp, lam=1.0, beta=0.5):
    """``[N, 4]`` float64 ``(A, B, C, H)`` per row: the ``rs`` argument of the backends'
    ``grad_logits`` / ``fused_grad`` (opd_kernels/backends/__init__.py), from the formulas:
    A = logsumexp(a), B = logsumexp(b) (of the G-OPD target when ``r`` is given; -inf without a
    teacher, where it is unused), C = KL(q||p) for "reverse_kl", KL(q||M) for "jsd", else 0,
    H = H(q)."""
    T = 1.0 / inv_temp
    lq = log_softmax(s, T)
    A = torch.logsumexp(s.double() / T, -1)
    C = torch.zeros_like(A)
    if t is None:
        B = torch.full_like(A, -float("inf"))
    else:
        b = _target_logits(t, T, r, lam)
        B = torch.logsumexp(b, -1)
        lp = b - B[:, None]
        if kind == "reverse_kl":
            C = _kl(lq, lp)
        elif kind == "jsd":
            C = _kl(lq, _log_mix(lp, lq, beta))
    return torch.stack([A, B, C, _entropy(lq)], -1)


def rows_f64(s, t, T=1.0):
    """Per-row reverse KL, forward KL and entropy in float64 (the names of ``opd_kernels._stats.Rows``)."""
    lq, lp = log_softmax(s, T), log_softmax(t, T)
    return {"reverse_kl": _kl(lq, lp), "forward_kl": _kl(lp, lq), "entropy": _entropy(lq)}


def assert_not_worse_than_naive(ours: dict, exact: dict, s, t, factor=2.0):
    """Per-row reverse KL, forward KL and entropy (whichever ``exact`` names) are within
    ``factor`` x the max relative error of the naive fp32 ``log_softmax`` computation on the
    same logits (student ``s``, teacher ``t``)."""
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    naive = {"reverse_kl": (lq.exp() * (lq - lp)).sum(-1), "forward_kl": (lp.exp() * (lp - lq)).sum(-1),
             "entropy": -(lq.exp() * lq).sum(-1)}
    for name, want in exact.items():
        want = want.double()
        err, naive_err = (((x.double() - want).abs() / want.abs()).max().item() for x in (ours[name], naive[name]))
        assert err <= factor * naive_err + 1e-6, f"{name}: max relative error {err:.2e}, naive fp32 {naive_err:.2e}"


def softcap_f64(x, scale=1.0, cap=0.0):
    """float64 logit transform ``cap * tanh(scale * x / cap)`` (cap > 0) or ``scale * x``
    (cap = 0 / None): logit_scale first, then the softcap; ``-inf`` (banned) stays ``-inf``."""
    y = x.double() * scale
    if cap:
        y = torch.where(torch.isneginf(y), -float("inf"), cap * torch.tanh(y / cap))
    return y
