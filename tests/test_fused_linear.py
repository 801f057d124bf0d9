"""Fused-linear ops equal the logits path; gradients w.r.t. hidden, weight, bias; no [N, V] buffers;
a tiny HF model distilled through the fused op matches the naive full-logits loss; the logit
transforms of every model (``test_*_transforms``: the ``(impl, transform, dtype)`` axis of ``transform_cases``)."""
import pytest
import torch

import opd_kernels as ok
import reference as oracle
import transform_cases as tc
from helpers import BACKENDS
from helpers import DEV as DEVICE
from helpers import require_impl
from opd_kernels import _chunks
from opd_kernels.backends import torch_backend


def _impl(impl):
    return require_impl(impl, fused=True)


def rand(*shape, dtype=torch.float32, grad=False):
    return (torch.randn(*shape, device=DEVICE) / shape[-1] ** 0.25).to(dtype).requires_grad_(grad)


def _ref_grads(out, inputs, up):
    return torch.autograd.grad((out * up).sum(), inputs)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", .5), ("reverse_kl", .5), ("jsd", .5), ("jsd", .9)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 37])
def test_fused_linear_distill(impl, dtype, divergence, beta, reduction, chunk):
    _impl(impl)
    N, V, d, dt = 252, 507, 123, 64  # odd shapes; the teacher's hidden size differs
    hs, ws, bs = rand(N, d, dtype=dtype, grad=True), rand(V, d, dtype=dtype, grad=True), rand(V, dtype=dtype,
                                                                                              grad=True)
    ht, wt = rand(N, dt, dtype=dtype), rand(V, dt, dtype=dtype)
    mask = torch.rand(N, device=DEVICE) > 0.3
    loss = ok.fused_linear_distill_loss(hs, ws, ht, wt, student_bias=bs, divergence=divergence, beta=beta,
                                        temperature=0.8, mask=mask, reduction=reduction, chunk_size=chunk, impl=impl)
    xs = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    logits = xs[0] @ xs[1].T + xs[2]
    expected = oracle.reduce(oracle.divergence_rows(logits, ht.double() @ wt.double().T, divergence, beta, 0.8),
                             mask, reduction)
    oracle.close(loss, expected, dtype)
    up = torch.randn_like(expected) + 1.5
    grads = torch.autograd.grad((loss * up).sum(), (hs, ws, bs))
    for g, r in zip(grads, _ref_grads(expected, xs, up)):
        assert g.dtype == dtype
        oracle.close(g, r, dtype, "grad")


@pytest.mark.parametrize("impl,transform,dtype", tc.params(tc.PAIR))
def test_fused_linear_distill_loss_transforms(impl, transform, dtype):
    _impl(impl)
    name, cfg = transform, tc.PAIR[transform]
    mask = (torch.arange(tc.N) % 4 != 1).to(tc.DEV)
    for div, red in tc.fused_runs(impl, name):
        ours, refs = tc.leaves(tc.models(dtype)[:6], {0, 1, 2})
        out = ok.fused_linear_distill_loss(ours[0], ours[1], ours[3], ours[4], student_bias=ours[2],
                                           teacher_bias=ours[5], divergence=div, beta=tc.BETA, temperature=tc.TEMP,
                                           mask=mask, reduction=red, chunk_size=4, impl=impl, **tc.kw(cfg))
        _, _, db = tc.check(out, tc.fused_oracle(refs, cfg, div, mask, red), ours, refs, dtype)
        assert (db[tc.BAN] == 0).all(), (div, red)


@pytest.mark.parametrize("impl", BACKENDS)
def test_fused_linear_matches_logits_path(impl):
    _impl(impl)
    N, V, d = 41, 1271, 32
    hs, ws = rand(2, N, d, grad=True), rand(V, d, grad=True)
    ht, wt, hr, wr = rand(2, N, d), rand(V, d), rand(2, N, d), rand(V, d)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        a = ok.fused_linear_distill_loss(hs, ws, ht, wt, divergence=div, reduction="none", impl=impl)
        b = ok.distill_loss(hs @ ws.T, ht @ wt.T, divergence=div, reduction="none", impl=impl)
        oracle.close(a, b, kind="path")
    a = ok.fused_linear_gopd_loss(hs, ws, ht, wt, hr, wr, reward_scale=1.25, impl=impl)
    b = ok.gopd_loss(hs @ ws.T, ht @ wt.T, hr @ wr.T, reward_scale=1.25, impl=impl)
    oracle.close(a, b, kind="path")
    ga, gb = (torch.autograd.grad(x, (hs, ws)) for x in (a, b))
    for x, y in zip(ga, gb):
        oracle.close(x, y, kind="path_grad")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_fused_linear_token_logprobs(impl, T):
    _impl(impl)
    N, V, d = 63, 509, 40
    h, w, b = rand(3, N, d, grad=True), rand(V, d, grad=True), rand(V, grad=True)
    y = torch.randint(0, V, (3, N), device=DEVICE)
    y[0, :5] = -100
    lp, ent = ok.fused_linear_token_logprobs(h, w, y, bias=b, temperature=T, return_entropy=True, chunk_size=16,
                                             impl=impl)
    xs = [x.detach().double().requires_grad_() for x in (h, w, b)]
    rlp, rent = oracle.token_logprobs(xs[0] @ xs[1].T + xs[2], y, T)
    oracle.close(lp, rlp, torch.float32)
    oracle.close(ent, rent, torch.float32)
    u1, u2 = torch.randn_like(rlp), torch.randn_like(rent)
    grads = torch.autograd.grad((lp * u1).sum() + (ent * u2).sum(), (h, w, b))
    rgrads = torch.autograd.grad((rlp * u1).sum() + (rent * u2).sum(), xs)
    for g, r in zip(grads, rgrads):
        oracle.close(g, r, torch.float32, "grad")


@pytest.mark.parametrize("impl,transform,dtype", tc.params(tc.SINGLE))
def test_fused_linear_token_logprobs_transforms(impl, transform, dtype):
    _impl(impl)
    cfg = tc.SINGLE[transform]
    ours, refs = tc.leaves(tc.models(dtype)[:3], {0, 1, 2})
    y = tc.targets(banned=tc.BAN[0])
    lp, ent = ok.fused_linear_token_logprobs(ours[0], ours[1], y, bias=ours[2], temperature=tc.TEMP, return_entropy=True,
                                             chunk_size=4, impl=impl, **tc.kw(cfg, True))
    assert lp[3] == -tc.INF
    s = refs[0] @ refs[1].T + refs[2]
    wlp, went = oracle.token_logprobs(tc.tf(s, cfg, "student"), y.cpu(), tc.TEMP)
    _, _, db = tc.check(torch.stack([lp, ent]), torch.stack([wlp, went]), ours, refs, dtype, torch.arange(tc.N) != 3)
    assert (db[tc.BAN] == 0).all()


@pytest.mark.parametrize("impl", BACKENDS)
def test_fused_linear_gopd(impl):
    _impl(impl)
    N, V, d = 37, 301, 24
    hs, ws = rand(N, d, grad=True), rand(V, d, grad=True)
    ht, wt, bt, hr, wr = rand(N, 48), rand(V, 48), rand(V), rand(N, d), rand(V, d)
    for lam in (1.0, 1.25, 3.0):
        loss = ok.fused_linear_gopd_loss(hs, ws, ht, wt, hr, wr, teacher_bias=bt, reward_scale=lam, impl=impl)
        xs = [x.detach().double().requires_grad_() for x in (hs, ws)]
        expected = oracle.divergence_rows(xs[0] @ xs[1].T, ht.double() @ wt.double().T + bt.double(), "reverse_kl",
                                          r=hr.double() @ wr.double().T, lam=lam).mean()
        oracle.close(loss, expected, torch.float32)
        for g, r in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(expected, xs)):
            oracle.close(g, r, torch.float32, "grad")


@pytest.mark.parametrize("impl,transform,dtype", tc.params(tc.GOPD, triton={"all"}))
def test_fused_linear_gopd_loss_transforms(impl, transform, dtype):
    _impl(impl)
    name, cfg = transform, tc.GOPD[transform]
    mask = (torch.arange(tc.N) % 4 != 1).to(tc.DEV)
    for _, red in tc.fused_runs(impl, name):
        ours, refs = tc.leaves(tc.models(dtype), {0, 1, 2})
        hs, ws, bs, ht, wt, bt, hr, wr = ours
        out = ok.fused_linear_gopd_loss(hs, ws, ht, wt, hr, wr, student_bias=bs, teacher_bias=bt, reward_scale=tc.LAM,
                                        temperature=tc.TEMP, mask=mask, reduction=red, chunk_size=4, impl=impl,
                                        **tc.kw(cfg))
        _, _, db = tc.check(out, tc.fused_oracle(refs, cfg, "reverse_kl", mask, red, ref_model=True), ours, refs, dtype)
        assert (db[tc.BAN] == 0).all(), red


def test_no_full_logits_buffer(monkeypatch):
    """The chunked path never hands a backend more rows than the chunk budget allows."""
    seen = []
    for name in ("row_stats", "grad_logits", "jsd_sums"):
        fn = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda s, *a, _fn=fn, **k: (seen.append(s.shape), _fn(s, *a, **k))[1])
    monkeypatch.setattr(_chunks, "CHUNK_BYTES", 64 * 1000 * 4)  # 64 rows of V=1000 fp32
    monkeypatch.setattr(_chunks, "CPU_MIN_ROWS", 1)
    N, V, d = 1000, 1000, 16
    hs, ws = rand(N, d, grad=True), rand(V, d, grad=True)
    for reduction in ("mean", "none"):
        for div in ("reverse_kl", "jsd"):
            seen.clear()
            loss = ok.fused_linear_distill_loss(hs, ws, rand(N, d), rand(V, d), divergence=div, reduction=reduction,
                                                impl="torch")
            loss.sum().backward()
            assert seen and max(s[0] for s in seen) <= 64, (reduction, div, max(s[0] for s in seen))
    seen.clear()
    ok.fused_linear_token_logprobs(hs, ws, torch.zeros(N, dtype=torch.long), impl="torch").sum().backward()
    assert seen and max(s[0] for s in seen) <= 64


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_path_allocates_no_NxV(monkeypatch, kind, beta):
    """Every aten op of the chunk loop (forward with gradients, and the recomputing backward of
    fl_rows), torch backend, outputs at most one fp32 ``[chunk, V]`` buffer, never ``[N, V]``."""
    from helpers import output_bytes
    from opd_kernels.ops import _fused
    from opd_kernels.ops._spec import RowSpec
    monkeypatch.setattr(_chunks, "CHUNK_BYTES", 64 * 1000 * 4)  # 64 rows of V=1000 fp32
    monkeypatch.setattr(_chunks, "CPU_MIN_ROWS", 1)
    N, V, d = 1000, 1000, 16
    models = (rand(N, d), rand(V, d), rand(V), rand(N, d), rand(V, d), None, None, None, None)
    g = torch.full((N, 2), 1.0 / N)
    spec = RowSpec(kind, 0.9, beta=beta, impl="torch")
    be = _fused.backend("torch")

    def run():
        _fused.fl_loss_with_grads(be, models, None, g, spec, [True, True, True])
        _, _, rs = _fused.fl_forward(be, models, None, spec)
        _fused.fl_backward(be, models, None, rs, g, spec, [True, True, True])

    sizes = output_bytes(run)
    assert max(sizes) == 64 * V * 4 < N * V * 4, max(sizes)


def test_scalar_loss_backward_copies_nothing_when_upstream_is_one():
    """fl_loss computes its gradients in forward; a backward with upstream 1 on CPU hands them over
    as they are (no ``dW * 1`` copy, no zero-filled gradients for the non-differentiable outputs):
    no aten op of that backward outputs a ``[V, d]`` tensor. Any other upstream still scales them."""
    from helpers import output_bytes
    N, V, d = 64, 1000, 16
    hs, ws, ht, wt = rand(N, d, grad=True), rand(V, d, grad=True), rand(N, d), rand(V, d)
    loss = ok.fused_linear_distill_loss(hs, ws, ht, wt, impl="torch")
    sizes = output_bytes(loss.backward, views=False)
    assert ws.grad is not None and max(sizes, default=0) < V * d * 4, max(sizes)
    g1 = ws.grad.clone()
    ws.grad = None
    (2.5 * ok.fused_linear_distill_loss(hs, ws, ht, wt, impl="torch")).backward()
    torch.testing.assert_close(ws.grad, 2.5 * g1)


def test_hf_model_distill_matches_naive():
    """A tiny config-built Llama distilled through the fused op: same loss and parameter grads
    as the naive full-logits loss."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).double()
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "hidden_size": 48})).double()
    ids = torch.randint(0, 211, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 12:] = False

    def run(fused):
        student.zero_grad()
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=True)
        if fused:
            h = student.model(ids).last_hidden_state
            loss = ok.fused_linear_distill_loss(h, student.lm_head.weight, t_out.hidden_states[-1],
                                                teacher.lm_head.weight, divergence="jsd", beta=0.3, mask=mask)
        else:
            lq = torch.log_softmax(student(ids).logits.double(), -1)
            lp = torch.log_softmax(t_out.logits.double(), -1)
            rows = oracle.divergence_rows(lq, lp, "jsd", 0.3)
            loss = oracle.reduce(rows, mask, "mean")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    (l1, g1), (l2, g2) = run(True), run(False)
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], msg=n)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", .5), ("reverse_kl", .5), ("jsd", .3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("k,chunk", [(1, None), (13, 7)])
def test_fused_linear_sparse_distill(impl, dtype, divergence, beta, reduction, k, chunk):
    """Top-k teacher fused with the lm_head (SDPO): equals the logits-level reference on
    hidden @ weight[:vocab_size].T + bias, gradients included (padded rows get none)."""
    _impl(impl)
    N, V, pad, d = 61, 257, 7, 33
    hs, ws, bs = rand(3, N, d, dtype=dtype, grad=True), rand(V + pad, d, dtype=dtype, grad=True), \
        rand(V + pad, dtype=dtype, grad=True)
    tlp, ids = torch.log_softmax(rand(3, N, V).double() * 3, -1).topk(k, -1)
    mask = torch.rand(3, N, device=DEVICE) > 0.25
    loss = ok.fused_linear_sparse_distill_loss(hs, ws, ids, tlp, bias=bs, divergence=divergence, beta=beta,
                                               temperature=0.7, mask=mask, reduction=reduction, vocab_size=V,
                                               chunk_size=chunk, impl=impl)
    xs = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    logits = (xs[0] @ xs[1][:V].T + xs[2][:V]).reshape(-1, V)
    expected = oracle.reduce(oracle.sparse_rows(logits, ids.reshape(-1, k), tlp.reshape(-1, k), divergence, beta,
                                                0.7), mask.reshape(-1), reduction)
    expected = expected.view(3, N) if reduction == "none" else expected
    oracle.close(loss, expected, dtype)
    up = torch.randn_like(expected) + 1.5
    grads = torch.autograd.grad((loss * up).sum(), (hs, ws, bs))
    for g, r in zip(grads, _ref_grads(expected, xs, up)):
        assert g.dtype == dtype
        if dtype == torch.bfloat16:
            # The gradient is the sum of two branches (log-normalizer, top-k logits), each rounded
            # to bf16 before autograd adds them: where they cancel, the error is ~1 ulp of the
            # larger branch, not of the sum. Allow 2 ulp (2^-7) of the largest entry.
            torch.testing.assert_close(g.double(), r, rtol=1.6e-2, atol=2.0 ** -7 * r.abs().max().item())
        else:
            oracle.close(g, r, dtype, "grad")
    assert (grads[1][V:] == 0).all() and (grads[2][V:] == 0).all()


@pytest.mark.parametrize("impl,transform,dtype", tc.params(tc.SINGLE))
def test_fused_linear_sparse_distill_loss_transforms(impl, transform, dtype):
    _impl(impl)
    cfg = tc.SINGLE[transform]
    ours, refs = tc.leaves(tc.models(dtype)[:3], {0, 1, 2})
    ids, tlp = tc.topk(2, ban_col=tc.BAN[1])
    mask = (torch.arange(tc.N) % 4 != 1).to(tc.DEV)
    out = ok.fused_linear_sparse_distill_loss(ours[0], ours[1], ids, tlp.to(tc.DEV, dtype), bias=ours[2],
                                              divergence="reverse_kl", temperature=tc.TEMP, mask=mask, chunk_size=4,
                                              impl=impl, **tc.kw(cfg, True))
    s = refs[0] @ refs[1].T + refs[2]
    rows = oracle.sparse_rows(tc.tf(s, cfg, "student"), ids.cpu(), tlp.to(dtype).double(), "reverse_kl", T=tc.TEMP)
    _, _, db = tc.check(out, oracle.reduce(rows, mask.cpu(), "mean"), ours, refs, dtype)
    assert (db[tc.BAN] == 0).all()


def test_fused_linear_sparse_never_builds_full_logits(monkeypatch):
    """The top-k part gathers k weight rows per token; only the fused logprob op reads all V."""
    calls = []
    real = torch_backend.row_stats
    monkeypatch.setattr(torch_backend, "row_stats", lambda s, *a, **kw: calls.append(s.shape) or real(s, *a, **kw))
    h, w = rand(40, 16, grad=True), rand(300, 16, grad=True)
    tlp, ids = torch.log_softmax(rand(40, 300), -1).topk(5, -1)
    ok.fused_linear_sparse_distill_loss(h, w, ids, tlp, chunk_size=8, impl="torch").backward()
    assert calls and all(shape[0] <= 8 for shape in calls)


def _assert_empty_batch_loss(loss, reduction):
    """No token: "none" gives the per-token shape (0,), a scalar reduction gives exactly 0 (not NaN)."""
    if reduction == "none":
        assert loss.shape == (0,), loss.shape
    else:
        assert loss.shape == () and loss.item() == 0, loss


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(divergence, reduction):
    hs, ws = rand(0, 8, grad=True), rand(30, 8, grad=True)
    loss = ok.fused_linear_distill_loss(hs, ws, rand(0, 8), rand(30, 8), divergence=divergence, reduction=reduction)
    _assert_empty_batch_loss(loss, reduction)
    g = torch.autograd.grad(loss.sum(), ws)[0]
    assert (g == 0).all()
    ids, tlp = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)
    loss = ok.fused_linear_sparse_distill_loss(hs, ws, ids, tlp, divergence=divergence, reduction=reduction)
    _assert_empty_batch_loss(loss, reduction)
    assert (torch.autograd.grad(loss.sum(), ws)[0] == 0).all()


def test_accumulate_low_precision_weight():
    """GEMMs run in the weight's dtype (bf16 on GPU) and accumulate into fp32 buffers."""
    from opd_kernels.ops import _gemm
    h, w, gs = torch.randn(5, 8), torch.randn(7, 8).bfloat16(), torch.randn(5, 7)
    bufs = (torch.zeros(5, 8), torch.zeros(7, 8), torch.zeros(7))
    _gemm.accumulate_grads(gs, h, w, 0, 5, bufs)
    torch.testing.assert_close(bufs[1], (gs.bfloat16().T @ h.bfloat16()).float())
    torch.testing.assert_close(bufs[0], (gs.bfloat16() @ w).float())
    torch.testing.assert_close(bufs[2], gs.sum(0))
