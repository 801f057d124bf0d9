"""The ops are torch.library custom ops: a function calling them compiles with fullgraph=True."""
import pytest
import torch

import opd_kernels as ok


def loss_fn(s, t, h, w, ht, wt, y, mask):
    a = ok.distill_loss(s, t, divergence="jsd", beta=0.3, mask=mask)
    b = ok.fused_linear_distill_loss(h, w, ht, wt, divergence="reverse_kl", mask=mask)
    c = ok.token_logprobs(s, y).sum() + ok.fused_linear_token_logprobs(h, w, y).sum()
    d = ok.fused_linear_distill_loss(h, w, ht, wt, divergence="forward_kl", reduction="none").sum()
    lp, ent = ok.token_logprobs(s, y, return_entropy=True)
    tlp, ids = torch.log_softmax(t, -1).topk(4, -1)
    e = ok.sparse_distill_loss(s, ids, tlp, divergence="jsd") + ok.gopd_loss(s, t, t * 0.5, reward_scale=1.25) \
        + ok.fused_linear_sparse_distill_loss(h, w, ids, tlp, divergence="forward_kl", mask=mask) \
        + ok.fused_linear_gopd_loss(h, w, ht, wt, ht, wt * 0.5, reward_scale=1.5) + (lp + ent).sum()
    return a + b + c + d + e


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    N, V, d = 12, 97, 16
    s, t = torch.randn(N, V, requires_grad=True), torch.randn(N, V)
    h, w, ht, wt = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True), \
        torch.randn(N, d), torch.randn(V, d)
    y, mask = torch.randint(0, V, (N,)), torch.rand(N) > 0.2
    eager = loss_fn(s, t, h, w, ht, wt, y, mask)
    ge = torch.autograd.grad(eager, (s, h, w))
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    out = compiled(s, t, h, w, ht, wt, y, mask)
    gc = torch.autograd.grad(out, (s, h, w))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_value_checks_are_device_asserts():
    """Under torch.compile the value checks (ids in range, top-k logprobs <= 0) cannot read the
    tensor on the host; they become device-side asserts that still stop a bad call."""
    torch._dynamo.reset()
    s, ids = torch.randn(4, 10), torch.zeros(4, 2, dtype=torch.long)
    sparse = torch.compile(lambda s, i, lp: ok.sparse_distill_loss(s, i, lp), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(sparse(s, ids, torch.full((4, 2), -1.0)))
    with pytest.raises(RuntimeError, match=r"teacher_topk_logprobs must be log-probabilities <= 0"):
        sparse(s, ids, torch.full((4, 2), 1.0))
    logprobs = torch.compile(lambda s, y: ok.token_logprobs(s, y), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 10\)"):
        logprobs(s, torch.tensor([0, 1, 10, 2]))


def test_custom_op_schemas_follow_rowspec():
    """Every custom op ends with the RowSpec fields, in order, so a new option (e.g. a logit
    transform) is one new field; backward's None padding comes from the input count."""
    import dataclasses

    from opd_kernels.ops import _spec
    names = tuple(f.name for f in dataclasses.fields(_spec.RowSpec))
    for op in ("rows", "rows_backward", "fl_rows", "fl_rows_backward", "fl_loss"):
        args = getattr(torch.ops.opd_kernels, op).default._schema.arguments
        assert tuple(a.name for a in args[-len(names):]) == names, op
    assert _spec.pad_grads(4, [1]) == (1, None, None, None)
    with pytest.raises(AssertionError, match="3 gradients for 2 inputs"):
        _spec.pad_grads(2, [1, 2, 3])
