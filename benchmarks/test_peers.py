"""Every peer provider computes the same loss and gradients as ours, on tiny shapes.

float64 where the peer computes in float64 (tolerance 1e-11), otherwise the peer's own dtype
against ours in float64 with the tolerance stated per case. Peers that cannot run here
(not installed, CUDA-only) skip with the reason. No timing.
"""
import pytest
import torch

import cases
import peers

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N, V, D = 48, 160, 24
TOL64 = dict(rtol=1e-11, atol=1e-11)

# (provider, op, divergence) for every case a peer offers
CASES = [(p, op, div) for p in peers.PEERS for op in cases.OPS for div in cases.divergences(op)
         if not op.endswith("gopd_loss")
         and not (p in ("liger_chunked", "liger_chunked_eager") and op != "fused_linear_distill_loss")
         and not (p == "cce" and op != "fused_linear_token_logprobs")
         and not (p == "trl_chunked" and not cases.is_fused(op))]


def _run(fn, x):
    out = fn(x)
    leaves = cases.grad_leaves(x)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) if out.dim() else None)
    return out.detach(), [g.detach() for g in grads]


def _tolerance(provider, dtype):
    """(dtype the peer runs in, loss tolerance, gradient tolerance) -- and why."""
    if provider == "cce":  # torch_compile: F.cross_entropy(logits.float()); Triton kernel: fp32
        return torch.float32, dict(rtol=2e-5, atol=2e-5), dict(rtol=2e-5, atol=2e-5)
    if provider == "trl_chunked":  # float32 tiles and statistics (Triton or torch) whatever the input dtype
        return torch.float32, dict(rtol=2e-5, atol=2e-6), dict(rtol=2e-5, atol=2e-6)
    if provider == "liger" or (provider.startswith("liger_chunked") and CUDA):  # Triton: fp32 math
        return torch.float32, dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-4, atol=1e-5)
    if provider.startswith("liger_chunked"):  # compiled or eager
        # float64 throughout, except the loss: Liger sums the chunk losses into
        # torch.zeros(()) (default dtype, float32), so the returned loss is float32-rounded.
        return torch.float64, dict(rtol=1e-6, atol=1e-9), TOL64
    return torch.float64, TOL64, TOL64


@pytest.mark.parametrize("provider,op,div", CASES, ids=[f"{p}-{op}-{d or '-'}" for p, op, d in CASES])
def test_peer_matches_ours(provider, op, div):
    dtype, tol_loss, tol_grad = _tolerance(provider, torch.float64)
    x = cases.make_inputs(op, N, V, D, dtype, DEVICE, seed=3)
    try:
        fn = cases.build(op, div, provider, DEVICE)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    out, grads = _run(fn, x)
    # ours in float64 on the same values
    x64 = {k: (t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
           for k, t in x.items()}
    ref, ref_grads = _run(cases.build(op, div, "torch", DEVICE), x64)
    assert out.shape == ref.shape, f"{provider} {op}: output shape {tuple(out.shape)} vs ours {tuple(ref.shape)}"
    torch.testing.assert_close(out.double(), ref, **tol_loss,
                               msg=lambda m: f"{provider} {op} {div}: loss differs from ours\n{m}")
    for name, g, r in zip([k for k in x if x[k].requires_grad], grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **tol_grad,
                                   msg=lambda m, name=name: f"{provider} {op} {div}: d/d{name} differs\n{m}")


def test_liger_beta_mapping_is_the_endpoint_convention():
    """beta=0 -> forward KL, beta=1 -> reverse KL, in between JSD with the same beta."""
    assert peers.liger_beta("forward_kl", 0.5) == 0.0
    assert peers.liger_beta("reverse_kl", 0.5) == 1.0
    assert peers.liger_beta("jsd", 0.3) == 0.3


@pytest.mark.parametrize("provider,op,why", [
    ("liger_chunked", "distill_loss", "no distill_loss"),
    ("liger_chunked", "fused_linear_gopd_loss", "no G-OPD"),
    ("liger_chunked_eager", "fused_linear_token_logprobs", "no fused_linear_token_logprobs"),
    ("cce", "fused_linear_distill_loss", "no fused_linear_distill_loss"),
    ("trl", "gopd_loss", "no G-OPD"),
    ("trl_chunked", "distill_loss", r"trl.kernels has no distill_loss \(fused-linear divergence and token logprobs"),
    ("trl_chunked", "token_logprobs", "trl.kernels has no token_logprobs"),
    ("trl_chunked", "fused_linear_gopd_loss", "trl_chunked has no G-OPD loss"),
])
def test_peer_without_the_op_is_unavailable_with_reason(provider, op, why):
    with pytest.raises(cases.Unavailable, match=why):
        cases.build(op, cases.divergences(op)[0], provider, DEVICE)


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_liger_triton_refuses_cpu_with_reason():
    try:
        cases.build("fused_linear_distill_loss", "jsd", "liger", "cpu")
    except cases.Unavailable as exc:
        assert "CUDA" in str(exc) or "not importable" in str(exc), str(exc)
    else:
        pytest.fail("liger (Triton) built on CPU")


def test_trl_chunked_too_old_is_unavailable_with_reason(monkeypatch):
    trl = pytest.importorskip("trl", reason="needs the bench extra: pip install -e '.[bench]'")
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(cases.Unavailable, match=r"trl not importable \(ImportError: trl 1.15.2 has no trl.kernels "
                                                r"chunked divergence \(needs trl>=1.16\)\)"):
        cases.build("fused_linear_distill_loss", "jsd", "trl_chunked", DEVICE)
