"""Float64 reference implementations written from the DESIGN.md formulas (the test oracle),
independent of the package's code paths, plus the single tolerance table."""
import torch

# dtype -> (rtol, atol) for values and for gradients. Inputs of low precision are first
# rounded, and the reference is computed in float64 on the rounded values, so the tolerance
# only covers the op's own arithmetic (fp32 accumulation, outputs rounded to the input dtype).
TOL = {
    torch.float64: dict(value=(1e-9, 1e-10), grad=(1e-9, 1e-10)),
    torch.float32: dict(value=(2e-5, 2e-5), grad=(2e-4, 2e-6)),
    torch.bfloat16: dict(value=(2e-4, 2e-4), grad=(1.6e-2, 2e-4)),
    torch.float16: dict(value=(2e-4, 2e-4), grad=(2e-3, 2e-5)),
}


def close(actual, expected, dtype, kind="value"):
    rtol, atol = TOL[dtype][kind]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def log_softmax(x, T):
    return torch.log_softmax(x.double() / T, -1)


def token_logprobs(logits, targets, T=1.0, ignore_index=-100):
    lq = log_softmax(logits, T)
    valid = targets != ignore_index
    lp = lq.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(lq.exp() * torch.where(lq.exp() > 0, lq, 0.0)).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _kl(lx, ly):
    px = lx.exp()
    live = px > 0
    return torch.where(live, px * (torch.where(live, lx, 0.0) - torch.where(live, ly, 0.0)), 0.0).sum(-1)


def divergence_rows(s, t, divergence, beta=0.5, T=1.0, r=None, lam=1.0):
    lq = log_softmax(s, T)
    b = t.double() / T
    if r is not None:  # G-OPD target; a token banned by either model is banned
        rr = r.double() / T
        b = torch.where(torch.isneginf(b) | torch.isneginf(rr), -float("inf"), lam * b + (1 - lam) * rr)
    return _divergence(lq, torch.log_softmax(b, -1), divergence, beta)


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


def saved_row_state(s, t, r, y, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0):
    """(A, B, C, H) per row, as the ops save them for backward, from the float64 torch backend."""
    from opd_kernels._stats import finish
    from opd_kernels.backends import torch_backend

    s, t, r = (None if x is None else x.double() for x in (s, t, r))
    rows = finish(torch_backend.row_stats(s, t, r, y, inv_temp=inv_temp, lam=lam, vocab_start=vocab_start))
    C = torch.zeros_like(rows.A)
    if kind == "reverse_kl":
        C = rows.reverse_kl
    elif kind == "jsd":
        C = torch_backend.jsd_sums(s, t, torch.stack([rows.A, rows.B], -1), inv_temp=inv_temp, beta=beta)[:, 1]
    return torch.stack([rows.A, rows.B, C, rows.entropy], -1)


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
