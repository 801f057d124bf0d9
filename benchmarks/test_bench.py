"""Small pytest-benchmark cases: every op x divergence x provider, fwd / bwd / fwd+bwd.

``naive_compile`` is left to ``run.py`` (a compile per case would dominate this quick set).
Unavailable providers skip with the reason (no CUDA device, liger-kernel not installed, ...).
"""
import pytest
import torch

import cases

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
N, V, D = (4096, 32000, 1024) if CUDA else (256, 8192, 128)
VARIANTS = [(op, div) for op in cases.OPS for div in cases.divergences(op)]
PROVIDERS = [p for p in cases.PROVIDERS if p != "naive_compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(params=VARIANTS, ids=lambda v: v[0] + (f"-{v[1]}" if v[1] else ""))
def variant(request):
    return request.param


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", cases.PASSES)
def test_bench(benchmark, variant, provider, pass_):
    op, div = variant
    try:
        fn = cases.probe(op, div, provider, DEVICE, DTYPE)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    x = cases.make_inputs(op, N, V, D, DTYPE, DEVICE)
    leaves = cases.grad_leaves(x)

    def clear():
        for t in leaves:
            t.grad = None

    def fwd():
        out = fn(x)
        _sync()
        return out

    def fwd_bwd():
        cases.backward(fn(x))
        _sync()

    def bwd(out):
        cases.backward(out)
        _sync()

    def fresh_forward():
        clear()
        return (fwd(),), {}

    benchmark.group = f"{op}/{div or '-'}/{pass_} N={N} V={V}" + (f" d={D}" if cases.is_fused(op) else "")
    benchmark.extra_info.update(op=op, divergence=div, provider=provider, N=N, V=V, dtype=str(DTYPE))
    if pass_ == "fwd":
        out = benchmark.pedantic(fwd, setup=clear, rounds=5, warmup_rounds=1)
    elif pass_ == "bwd":
        out = benchmark.pedantic(bwd, setup=fresh_forward, rounds=5, warmup_rounds=1)
    else:
        out = benchmark.pedantic(fwd_bwd, setup=clear, rounds=5, warmup_rounds=1)
    if pass_ == "fwd":
        assert torch.isfinite(out).all()
    else:
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
