"""The compiled chunk math of the torch backend (``ops._compiled``) against the
float64 oracle and against the eager torch path, through the public ops.

The compiled path normally starts at ``OPD_COMPILE_MIN_ELEMENTS`` logits per call; here the
threshold is lowered to 0 so that small shapes take it. Each (op kind, entry point) compiles
once per process (seconds each), so the matrix is kept to one case per entry point and kind.
"""
import pytest
import torch

import opd_kernels as ok
import reference as oracle
import transform_cases as tc
from opd_kernels.ops import _compiled
from opd_kernels.ops import _decide

pytestmark = pytest.mark.filterwarnings("ignore")
N, V, d = 67, 389, 24
T = 0.8


def _models(seed=0, ban=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, d, generator=g, dtype=torch.float64)
    ws = torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5 * 1.5
    bs = torch.randn(V, generator=g, dtype=torch.float64)
    if ban:
        bs[[3, 50]] = -float("inf")  # banned tokens: -inf logits for every row
    ht = torch.randn(N, d + 5, generator=g, dtype=torch.float64)
    wt = torch.randn(V, d + 5, generator=g, dtype=torch.float64) / d ** 0.5 * 1.5
    return hs, ws, bs, ht, wt


def _f32(*xs, grad=()):
    return [x.float().requires_grad_(i in grad) for i, x in enumerate(xs)]


def _mask():
    return torch.arange(N) % 5 != 1


def _check(out32, out64, inputs32, inputs64, up):
    oracle.close(out32, out64)
    g32 = torch.autograd.grad((out32 * up.float()).sum(), inputs32)
    g64 = torch.autograd.grad((out64 * up).sum(), inputs64)
    for a, b in zip(g32, g64):
        oracle.close(a, b, kind="grad")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_distill_scalar_loss(compiled, divergence):
    """reduction="mean": statistics and gradient in one compiled pass (``rows_and_grad_``)."""
    hs, ws, bs, ht, wt = _models()
    x32 = _f32(hs, ws, bs, ht, wt, grad=(0, 1))
    x64 = [x.clone().requires_grad_(i in (0, 1)) for i, x in enumerate((hs, ws, bs, ht, wt))]
    kw = dict(divergence=divergence, beta=0.4, temperature=T, mask=_mask())
    out32 = ok.fused_linear_distill_loss(x32[0], x32[1], x32[3], x32[4], student_bias=x32[2], impl="torch", **kw)
    s64, t64 = (x64[0] @ x64[1].T + x64[2]), x64[3] @ x64[4].T
    out64 = oracle.reduce(oracle.divergence_rows(s64, t64, divergence, beta=0.4, T=T), _mask(), "mean")
    _check(out32, out64, x32[:2], x64[:2], torch.tensor(1.7, dtype=torch.float64))
    assert compiled == ["both_"]


def test_fused_gopd_per_token(compiled):
    """reduction="none": compiled rows in forward, compiled gradient in backward; reference model."""
    hs, ws, bs, ht, wt = _models()
    hr, wr = ht[:, :d] * 0.5, ws.flip(0)
    x32 = _f32(hs, ws, ht, wt, hr, wr, grad=(0, 1))
    x64 = [x.clone().requires_grad_(i in (0, 1)) for i, x in enumerate((hs, ws, ht, wt, hr, wr))]
    out32 = ok.fused_linear_gopd_loss(*x32, reward_scale=1.25, temperature=T, reduction="none", impl="torch")
    s64, t64, r64 = x64[0] @ x64[1].T, x64[2] @ x64[3].T, x64[4] @ x64[5].T
    out64 = oracle.divergence_rows(s64, t64, "reverse_kl", T=T, r=r64, lam=1.25)
    _check(out32, out64, x32[:2], x64[:2], torch.randn(N, dtype=torch.float64))
    assert compiled == ["rows", "grad_"]


def test_fused_token_logprobs_with_entropy(compiled):
    hs, ws, bs, *_ = _models()
    y = torch.randint(0, V, (N,))
    y[4], y[9] = -100, 3  # an ignored position; a banned target (logprob -inf)
    x32 = _f32(hs, ws, bs, grad=(0, 1))
    x64 = [x.clone().requires_grad_(i in (0, 1)) for i, x in enumerate((hs, ws, bs))]
    lp32, ent32 = ok.fused_linear_token_logprobs(x32[0], x32[1], y, bias=x32[2], temperature=T,
                                                 return_entropy=True, impl="torch")
    lp64, ent64 = oracle.token_logprobs(x64[0] @ x64[1].T + x64[2], y, T=T)
    assert torch.isneginf(lp32[9]) and torch.isneginf(lp64[9])
    keep = torch.arange(N) != 9
    up = torch.randn(N, dtype=torch.float64)
    _check(torch.stack([lp32[keep], ent32[keep]]), torch.stack([lp64[keep], ent64[keep]]), x32[:2], x64[:2],
           torch.stack([up[keep], -up[keep]]))
    assert compiled == ["rows", "grad_"]  # entropy asked for: nothing kept (rule 4)


@pytest.mark.parametrize("keep_bytes", [2**30, 0])
def test_fused_token_logprobs_kept_gradient(compiled, monkeypatch, keep_bytes):
    """No entropy: the unit gradient ``[N, V]`` is kept from forward (one compiled pass) and backward is
    two GEMMs on it (rule 4); with ``KEEP_BYTES = 0`` the logits are recomputed instead. Both agree
    with float64, for an upstream with zeros (masked rows), an ignored and a banned target, a bias."""
    monkeypatch.setattr(_decide, "KEEP_BYTES", keep_bytes)
    hs, ws, bs, *_ = _models()
    y = torch.randint(0, V, (N,))
    y[4], y[9] = -100, 3
    x32 = _f32(hs, ws, bs, grad=(0, 1, 2))
    x64 = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    lp32 = ok.fused_linear_token_logprobs(x32[0], x32[1], y, bias=x32[2], temperature=T, impl="torch")
    lp64, _ = oracle.token_logprobs(x64[0] @ x64[1].T + x64[2], y, T=T)
    assert torch.isneginf(lp32[9]) and lp32[4] == 0
    keep = torch.arange(N) != 9
    up = torch.randn(N, dtype=torch.float64) * _mask()
    up[9] = 0.0
    _check(lp32[keep], lp64[keep], x32, x64, up[keep])
    assert compiled == (["both_"] if keep_bytes else ["rows", "grad_"])


@pytest.mark.parametrize("keep_bytes", [0, 2**30])
def test_fused_sparse_log_normalizer(compiled, monkeypatch, keep_bytes):
    monkeypatch.setattr(_decide, "KEEP_BYTES", keep_bytes)
    hs, ws, *_ = _models(ban=False)
    k = 7
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(N)])
    tlp = torch.log_softmax(torch.randn(N, V, dtype=torch.float64), -1).gather(1, ids)
    x32 = _f32(hs, ws, grad=(0, 1))
    x64 = [x.clone().requires_grad_() for x in (hs, ws)]
    out32 = ok.fused_linear_sparse_distill_loss(x32[0], x32[1], ids, tlp.float(), divergence="jsd", impl="torch")
    out64 = oracle.reduce(oracle.sparse_rows(x64[0] @ x64[1].T, ids, tlp, "jsd"), torch.ones(N, dtype=torch.bool),
                          "mean")
    _check(out32, out64, x32, x64, torch.tensor(0.6, dtype=torch.float64))
    assert compiled == (["both_"] if keep_bytes else ["rows", "grad_"])  # kept only when opted in (rule 4)


def test_logits_level_distill_and_eager_agree(compiled, monkeypatch):
    """Logits level (row chunks of a materialized [N, V]): compiled and eager torch paths agree."""
    s = torch.randn(N, V) * 3
    s[:, 5] = -float("inf")
    t = torch.randn(N, V) * 3
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv("OPD_TORCH_COMPILE", on)
        x = s.clone().requires_grad_()
        loss = ok.distill_loss(x, t, divergence="jsd", beta=0.3, temperature=T, reduction="none")
        outs.append((loss, torch.autograd.grad((loss * torch.linspace(-1, 1, N)).sum(), x)[0]))
    oracle.close(outs[0][0], outs[1][0])
    oracle.close(outs[0][1], outs[1][1], kind="grad")
    assert (outs[0][1][:, 5] == 0).all()
    assert compiled == ["rows", "grad"]


def test_threshold_keeps_small_calls_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(_compiled, "_call", lambda *a, **k: calls.append(a[0]))
    hs, ws, _, ht, wt = _models()
    ok.fused_linear_distill_loss(hs.float(), ws.float(), ht.float(), wt.float(), impl="torch")
    ok.fused_linear_distill_loss(hs, ws, ht, wt, impl="torch")  # float64: never compiled
    assert calls == [] and N * V < _decide.COMPILE_MIN_ELEMENTS


@pytest.mark.filterwarnings("ignore")
def test_compiled_fused_scalar_loss(compiled):
    """fp32 CPU torch above the (lowered) threshold: statistics and gradient in one compiled pass."""
    cfg = tc.PAIR["both_s"] | tc.PAIR["cap_t"]
    mask = torch.arange(tc.N) % 4 != 1
    ours, refs = tc.leaves(tc.models(torch.float32, "cpu")[:6], {0, 1})
    out = ok.fused_linear_distill_loss(ours[0], ours[1], ours[3], ours[4], student_bias=ours[2], teacher_bias=ours[5],
                                       divergence="reverse_kl", temperature=tc.TEMP, mask=mask, impl="torch", **tc.kw(cfg))
    tc.check(out, tc.fused_oracle(refs, cfg, "reverse_kl", mask, "mean"), ours, refs, torch.float32)
    assert compiled == ["both_"]


@pytest.mark.filterwarnings("ignore")
def test_compiled_logits_token_logprobs(compiled):
    cfg = tc.SINGLE["both"]
    (s,), (x,) = tc.leaves([tc.logits(0, torch.float32, "cpu")], {0})
    y = tc.targets(banned=4, dev="cpu")
    lp = ok.token_logprobs(s, y, temperature=tc.TEMP, impl="torch", **tc.kw(cfg, True))
    assert lp[3] == -tc.INF
    tc.check(lp, oracle.token_logprobs(tc.tf(x, cfg, "student"), y, tc.TEMP)[0], [s], [x], torch.float32,
           torch.arange(tc.N) != 3)
    assert compiled == ["rows", "grad"]
