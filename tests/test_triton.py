"""Triton backend against the float64 torch reference.

Without a GPU the kernels run in the Triton interpreter on CPU tensors: ``TRITON_INTERPRET=1``
is set here, before triton is first imported, so shapes stay tiny (N <= 16, V of 300-1100 and
never a multiple of the tile, d <= 64). With CUDA the same tests run on the GPU, plus the
``cuda``-marked larger/bf16 variants at the end.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import reference  # noqa: E402
from opd_kernels._stats import finish  # noqa: E402
from opd_kernels.backends import KINDS  # noqa: E402
from opd_kernels.backends import torch_backend as ref  # noqa: E402
from opd_kernels.backends import triton_backend as tb  # noqa: E402

_OK, _WHY = tb.available()
pytestmark = [
    pytest.mark.triton,
    # the interpreter evaluates both branches of tl.where in numpy (e.g. -inf - -inf)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _needs_backend(request):
    if not _OK and request.node.name != "test_backend_available":
        pytest.skip(f"triton backend unavailable: {_WHY}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")


def assert_close(actual, expected, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def assert_rel(actual, expected, tol):
    """Norm-wise relative error (for low-precision GEMM outputs summed over a large V or N)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def d64(*xs):
    return [None if x is None else x.double() for x in xs]


def logits(N, V, scale=3.0, dtype=torch.float32, stride_pad=0):
    """Random logits; ``stride_pad`` > 0 returns a view with row stride V + pad (like vocab_size=)."""
    x = torch.randn(N, V + stride_pad, device=DEV) * scale
    return x.to(dtype)[:, :V]


def targets(N, V, vocab_start=0):
    y = torch.randint(0, V, (N,), device=DEV) + vocab_start
    y[1] = -100          # ignored
    y[2] = vocab_start + V + 5  # another shard's token
    return y


rs_ref = reference.saved_row_state


def upstream(N):
    g = torch.randn(N, 2, device=DEV, dtype=torch.float64)
    g[0] = 0.0  # a masked row
    return g


# ------------------------------------------------------------------------------ logits level
def test_backend_available():
    """Fails (rather than skipping everything) when the interpreter was enabled too late:
    TRITON_INTERPRET=1 must be set before anything imports triton (tests/conftest.py)."""
    ok, why = tb.available()
    assert ok and why == "", why
    assert tb.NAME == "triton"


@pytest.mark.parametrize("case", ["student", "teacher", "gopd"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_row_stats(case, temp):
    N, V, start = 13, 700, 50
    s = logits(N, V, stride_pad=9)
    t = logits(N, V) if case != "student" else None
    r = logits(N, V) if case == "gopd" else None
    s[3, 10:20] = -INF                     # banned for the student only
    if case == "teacher":
        t[3, 10:15] = -INF                 # banned for both
        t[4, 100] = -INF                   # student supports it: reverse KL = +inf
        s[5, 200:] = -INF                  # teacher supports it: forward KL = +inf
    y = targets(N, V, start)
    y[3] = start + 12                      # a target the student bans: a_y = -inf
    kw = dict(inv_temp=1 / temp, lam=1.25, vocab_start=start)
    got = tb.row_stats(s, t, r, y, **kw)
    want = ref.row_stats(*d64(s, t, r), y, **kw)
    assert got.dtype == torch.float32 and got.shape == (N, 8)
    assert_close(got, want)
    assert got[3, 7] == -INF
    if case == "teacher":
        assert got[4, 5] == INF and got[5, 6] == INF


def test_row_stats_all_neg_inf_row_and_splits(monkeypatch):
    """A row that is all -inf on this shard gives m=-inf and zero sums (never NaN); vocab
    splits (grid axis 1) merge to the same statistics as one pass."""
    N, V = 9, 1100
    s, t = logits(N, V), logits(N, V)
    y = targets(N, V)
    s[4] = -INF
    t[4] = -INF
    y[4] = -100
    one = tb.row_stats(s, t, None, y, inv_temp=1.0)
    assert one[4, 0] == -INF and one[4, 3] == -INF
    assert torch.all(one[4, [1, 2, 4, 5, 6, 7]] == 0)
    assert not one.isnan().any()
    monkeypatch.setattr(tb, "_n_splits", lambda row_blocks, n_tiles, device: min(3, n_tiles))
    split = tb.row_stats(s, t, None, y, inv_temp=1.0)
    assert_close(split, one, rtol=1e-6, atol=1e-6)
    keep = torch.arange(N, device=DEV) != 4
    assert_close(split[keep], ref.row_stats(*d64(s, t), None, y, inv_temp=1.0)[keep])


def test_row_stats_nan_propagates():
    """A NaN logit makes its row's statistics NaN (through S), in the student or the teacher."""
    s, t = logits(4, 700), logits(4, 700)
    s[0, 5] = float("nan")
    t[1, 600] = float("nan")
    rows = finish(tb.row_stats(s, t, None, None, inv_temp=1.0))
    assert rows.reverse_kl[:2].isnan().all() and rows.forward_kl[:2].isnan().all() and rows.entropy[0].isnan()
    assert torch.isfinite(torch.stack([rows.reverse_kl[2:], rows.forward_kl[2:], rows.entropy[1:3]])).all()


def test_row_stats_offset_accuracy(monkeypatch):
    """Student ~ teacher with logits offset by +50: the small KLs (~5e-5) and the entropy from
    the online recurrence and the split merge are as accurate as naive fp32 log_softmax."""
    monkeypatch.setattr(tb, "_n_splits", lambda row_blocks, n_tiles, device: min(3, n_tiles))
    N, V = 8, 1100
    s = logits(N, V, scale=2.0) + 50.0
    t = s + 0.01 * torch.randn_like(s)
    got = finish(tb.row_stats(s, t, None, None, inv_temp=1.0))
    want = finish(ref.row_stats(*d64(s, t), None, None, inv_temp=1.0))
    reference.assert_not_worse_than_naive({n: getattr(got, n) for n in ("reverse_kl", "forward_kl", "entropy")},
                                          {n: getattr(want, n) for n in ("reverse_kl", "forward_kl", "entropy")}, s, t)


@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_jsd_sums(beta):
    N, V = 11, 517
    s, t = logits(N, V), logits(N, V, stride_pad=3)
    s[2, :30] = -INF
    t[2, 10:40] = -INF
    t[5, 7] = -INF
    rows = finish(ref.row_stats(*d64(s, t), None, None, inv_temp=1 / 0.9))
    AB = torch.stack([rows.A, rows.B], -1)
    got = tb.jsd_sums(s, t, AB.float(), inv_temp=1 / 0.9, beta=beta)
    assert_close(got, ref.jsd_sums(*d64(s, t), AB, inv_temp=1 / 0.9, beta=beta))


def grad_case(kind, N=12, V=650, gopd=False):
    s = logits(N, V, stride_pad=5)
    t = None if kind == "logprob" else logits(N, V)
    r = logits(N, V) if gopd else None
    s[3, :40] = -INF                       # banned for the student (teacher may support them)
    if t is not None and not gopd:
        t[3, 10:30] = -INF                 # banned for both (teacher supports 0..9, 30..39)
        s[4, 100:110] = -INF
        t[4, 100:110] = -INF
    return s, t, r


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_grad_logits(kind, entropy):
    temp, beta, start = 0.8, 0.4, 10
    s, t, r = grad_case(kind)
    y = targets(s.shape[0], s.shape[1], start) if kind == "logprob" else None
    rs = rs_ref(s, t, r, y, kind, 1 / temp, beta=beta, vocab_start=start)
    g = upstream(s.shape[0])
    kw = dict(kind=kind, inv_temp=1 / temp, beta=beta, vocab_start=start, with_entropy=entropy)
    got = tb.grad_logits(s, t, r, y, rs.float(), g.float(), **kw)
    want = ref.grad_logits(*d64(s, t, r), y, rs, g, **kw)
    assert got.dtype == s.dtype and got.shape == s.shape
    assert_close(got, want, rtol=2e-4, atol=2e-6)


def test_grad_logits_gopd():
    s, t, r = grad_case("reverse_kl", gopd=True)
    kw = dict(inv_temp=1.0, lam=1.5)
    rs = rs_ref(s, t, r, None, "reverse_kl", **kw)
    g = upstream(s.shape[0])
    got = tb.grad_logits(s, t, r, None, rs.float(), g.float(), kind="reverse_kl", with_entropy=True, **kw)
    want = ref.grad_logits(*d64(s, t, r), None, rs, g, kind="reverse_kl", with_entropy=True, **kw)
    assert_close(got, want, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_logits_in_place(dtype):
    """out=s overwrites the logits with their gradient, equal to the out-of-place result."""
    N, V = 10, 333
    s, t = logits(N, V, dtype=dtype), logits(N, V, dtype=dtype)
    rs = rs_ref(s, t, None, None, "forward_kl", 1.0)
    g = upstream(N).float()
    kw = dict(kind="forward_kl", inv_temp=1.0)
    fresh = tb.grad_logits(s, t, None, None, rs.float(), g, **kw)
    want = ref.grad_logits(*d64(s, t), None, None, rs, g.double(), **kw)
    buf = s.clone()
    got = tb.grad_logits(buf, t, None, None, rs.float(), g, out=buf, **kw)
    assert got.data_ptr() == buf.data_ptr() and got.dtype == dtype
    assert torch.equal(got, fresh)
    tol = dict(rtol=1.6e-2, atol=2e-4) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-6)
    assert_close(got, want, **tol)


def test_bf16_inputs_stats():
    """bf16 student, fp16 teacher (mixed dtypes): fp32 math on the rounded values."""
    N, V = 8, 901
    s, t = logits(N, V, dtype=torch.bfloat16), logits(N, V, dtype=torch.float16)
    y = targets(N, V)
    got = tb.row_stats(s, t, None, y, inv_temp=1.0)
    assert_close(got, ref.row_stats(*d64(s, t), None, y, inv_temp=1.0))


# ---------------------------------------------------------------------------- fused lm_head
def model(N, V, d, bias=False, ban=None):
    h = torch.randn(N, d, device=DEV)
    w = torch.randn(V, d, device=DEV) / math.sqrt(d) * 2
    b = torch.randn(V, device=DEV) if bias else None
    if ban is not None:
        b = torch.zeros(V, device=DEV) if b is None else b
        b[ban] = -INF                      # banned tokens through the bias
    return h, w, b


def x64(h, w, b):
    out = h.double() @ w.double().T
    return out if b is None else out + b.double()


FUSED_CASES = {
    # name: (has teacher, has ref, biases)
    "student": (False, False, True),
    "teacher": (True, False, False),
    "teacher_bias": (True, False, True),
    "gopd": (True, True, True),
}


def fused_models(case, N=13, V=515, ds=48, dt=40, dr=24):
    has_t, has_r, bias = FUSED_CASES[case]
    ban = torch.tensor([3, 77, V - 2])
    S = model(N, V, ds, bias, ban)
    T = model(N, V, dt, bias, ban if case != "gopd" else None) if has_t else (None,) * 3
    R = model(N, V, dr, bias) if has_r else (None,) * 3
    return (*S, *T, *R)


def logits_of(args):
    return [None if args[k] is None else x64(*args[k:k + 3]) for k in (0, 3, 6)]


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_row_stats(case):
    args = fused_models(case)
    N, V = args[0].shape[0], args[1].shape[0]
    y = targets(N, V, vocab_start=7)
    y[6] = 7 + 77                          # a banned target: logprob -inf
    kw = dict(inv_temp=1 / 0.9, lam=1.25, vocab_start=7)
    got = tb.fused_row_stats(*args, y, **kw)
    assert_close(got, ref.row_stats(*logits_of(args), y, **kw))
    assert got[6, 7] == -INF


def test_fused_row_stats_splits(monkeypatch):
    args = fused_models("teacher_bias", V=700)
    y = targets(13, 700)
    one = tb.fused_row_stats(*args, y, inv_temp=1.0)
    monkeypatch.setattr(tb, "_n_splits", lambda row_blocks, n_tiles, device: min(4, n_tiles))
    assert_close(tb.fused_row_stats(*args, y, inv_temp=1.0), one, rtol=1e-6, atol=1e-6)


def test_fused_jsd_sums():
    args = fused_models("teacher_bias")
    s, t, _ = logits_of(args)
    rows = finish(ref.row_stats(s, t, None, None, inv_temp=1.0))
    AB = torch.stack([rows.A, rows.B], -1)
    got = tb.fused_jsd_sums(*args[:6], AB.float(), inv_temp=1.0, beta=0.25)
    assert_close(got, ref.jsd_sums(s, t, AB, inv_temp=1.0, beta=0.25))


def test_fused_row_stats_mixed_dtypes():
    """fp16 student hidden with an fp32 weight (cast to the weight's dtype in the kernel) and
    an fp16 teacher. The interpreter's fp16 tl.dot accumulates in fp16, hence the tolerance."""
    hs, ws, bs = model(12, 410, 32, bias=True)
    ht, wt, _ = model(12, 410, 48)
    args = (hs.half(), ws, bs, ht.half(), wt.half(), None, None, None, None)
    y = targets(12, 410)
    got = tb.fused_row_stats(*args, y, inv_temp=1.0)
    rtol = 3e-2 if DEV == "cpu" else 1e-3
    assert_close(got, ref.row_stats(*logits_of(args), y, inv_temp=1.0), rtol=rtol, atol=rtol)


def fused_grad_ref(args, y, rs, g, need_db, **kw):
    s, t, r = logits_of(args)
    ds = ref.grad_logits(s, t, r, y, rs, g, **kw)
    hs, ws = args[0].double(), args[1].double()
    return ds @ ws, ds.T @ hs, ds.sum(0) if need_db else None


@pytest.mark.parametrize("kind,case", [("logprob", "student"), ("forward_kl", "teacher"),
                                       ("reverse_kl", "teacher_bias"), ("jsd", "teacher"),
                                       ("reverse_kl", "gopd")])
@pytest.mark.parametrize("entropy", [False, True])
def test_fused_grad(kind, case, entropy):
    args = fused_models(case, N=14, V=389)
    N, V = args[0].shape[0], args[1].shape[0]
    y = targets(N, V, vocab_start=3) if kind == "logprob" else None
    kw = dict(kind=kind, inv_temp=1 / 0.8, lam=1.25, beta=0.35, vocab_start=3)
    s, t, r = logits_of(args)
    rs = rs_ref(s, t, r, y, kind, kw["inv_temp"], lam=1.25, beta=0.35, vocab_start=3)
    g = upstream(N)
    need_db = args[2] is not None
    dh, dw, db = tb.fused_grad(*args, y, rs.float(), g.float(), need_dw=True, need_db=need_db,
                               with_entropy=entropy, **kw)
    want = fused_grad_ref(args, y, rs, g, need_db, with_entropy=entropy, **kw)
    for got, exp in zip((dh, dw, db), want):
        if exp is None:
            assert got is None
        else:
            assert got.dtype == torch.float32 and got.shape == exp.shape
            assert_close(got, exp, rtol=2e-4, atol=2e-5)


def test_fused_grad_needs():
    """need_dw/need_db False return None and leave dh unchanged (db alone still works)."""
    args = fused_models("teacher_bias", N=9, V=300)
    s, t, _ = logits_of(args)
    rs, g = rs_ref(s, t, None, None, "forward_kl", 1.0), upstream(9)
    kw = dict(kind="forward_kl", inv_temp=1.0, with_entropy=False)
    dh, dw, db = tb.fused_grad(*args, None, rs.float(), g.float(), need_dw=False, need_db=True, **kw)
    dh_ref, _, db_ref = fused_grad_ref(args, None, rs, g, True, **kw)
    assert dw is None
    assert_close(dh, dh_ref, rtol=2e-4, atol=2e-5)
    assert_close(db, db_ref, rtol=2e-4, atol=2e-5)
    _, dw2, db2 = tb.fused_grad(*args, None, rs.float(), g.float(), need_dw=False, need_db=False, **kw)
    assert dw2 is None and db2 is None


def test_fused_grad_allocates_no_NxV_and_never_syncs():
    """No torch allocation made by the fused path is as large as an [N, V] bf16 buffer (no .item()).

    The kernels cannot allocate global memory, so recording every aten op (the launchers' and,
    on CPU, the interpreter's copies of the arguments) covers the whole path: nothing is bigger
    than the largest input (the [V, d] fp32 weight, or the dw it produces).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    N, V, d = 48, 1000, 16                 # [N, V] bf16 = 96 kB > [V, d] fp32 = 64 kB
    args = (*model(N, V, d), *model(N, V, d), None, None, None)
    s, t, _ = logits_of(args)
    rs, g = rs_ref(s, t, None, None, "reverse_kl", 1.0).float(), upstream(N).float()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            nbytes = [o.nbytes for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            seen.append((str(func), max(nbytes, default=0)))
            return out

    with Record():
        stats = tb.fused_row_stats(*args, None, inv_temp=1.0)
        tb.fused_grad(*args, None, rs, g, kind="reverse_kl", inv_temp=1.0, need_dw=True, need_db=False)
    assert stats.shape == (N, 8)
    biggest = max(n for _, n in seen)
    assert biggest <= V * d * 4 < N * V * 2, [x for x in seen if x[1] > V * d * 4]
    assert not [f for f, _ in seen if "_local_scalar_dense" in f or "item" in f]


# ------------------------------------------------------------------ public ops, impl="triton"
ok = pytest.importorskip("opd_kernels")


def both_impls(fn, inputs, grad_of):
    """Run ``fn(*inputs, impl)`` for torch and triton; return values and grads of ``grad_of``."""
    out = {}
    for impl in ("torch", "triton"):
        xs = [x.detach().clone().requires_grad_(i in grad_of) if isinstance(x, torch.Tensor)
              and x.is_floating_point() else x for i, x in enumerate(inputs)]
        val = fn(*xs, impl)
        val = val if isinstance(val, tuple) else (val,)
        w = [torch.randn_like(v) for v in val] if impl == "torch" else out["torch"][2]
        sum((v * wi).sum() for v, wi in zip(val, w)).backward()
        out[impl] = ([v.detach() for v in val], [xs[i].grad for i in grad_of], w)
    return out["triton"][:2], out["torch"][:2]


def check_impls(fn, inputs, grad_of):
    (v1, g1), (v0, g0) = both_impls(fn, inputs, grad_of)
    for a, b in zip(v1, v0):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_op_token_logprobs():
    x = logits(12, 640).reshape(3, 4, 640)
    y = torch.randint(0, 640, (3, 4), device=DEV)
    y[0, 1] = -100
    check_impls(lambda x, y, impl: ok.token_logprobs(x, y, temperature=0.9, return_entropy=True, impl=impl),
                [x, y], [0])


@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_op_distill_loss(div, beta):
    s, t = logits(10, 600), logits(10, 600)
    mask = torch.rand(10, device=DEV) > 0.3
    check_impls(lambda s, t, impl: ok.distill_loss(s, t, divergence=div, beta=beta, temperature=1.1, mask=mask,
                                                   impl=impl), [s, t], [0])


def test_op_gopd_loss():
    s, t, r = logits(9, 420), logits(9, 420), logits(9, 420)
    check_impls(lambda s, t, r, impl: ok.gopd_loss(s, t, r, reward_scale=1.25, reduction="none", impl=impl),
                [s, t, r], [0])


def test_op_sparse_distill_loss():
    s = logits(8, 500)
    ids = torch.stack([torch.randperm(500, device=DEV)[:6] for _ in range(8)])
    lp = torch.log_softmax(torch.randn(8, 500, device=DEV), -1).gather(1, ids)
    check_impls(lambda s, lp, impl: ok.sparse_distill_loss(s, ids, lp, divergence="jsd", impl=impl), [s, lp], [0])


def test_op_fused_linear_token_logprobs():
    h, w, b = model(12, 450, 32, bias=True)
    y = torch.randint(0, 450, (12,), device=DEV)
    check_impls(lambda h, w, b, impl: ok.fused_linear_token_logprobs(h, w, y, bias=b, return_entropy=True,
                                                                     impl=impl), [h, w, b], [0, 1, 2])


@pytest.mark.parametrize("div", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_fused_linear_distill_loss(div, reduction):
    hs, ws, _ = model(11, 390, 40)
    ht, wt, _ = model(11, 390, 24)
    check_impls(lambda hs, ws, ht, wt, impl: ok.fused_linear_distill_loss(
        hs, ws, ht, wt, divergence=div, reduction=reduction, temperature=0.8, impl=impl),
        [hs, ws, ht, wt], [0, 1])


def test_op_fused_linear_gopd_loss():
    S, T, R = model(10, 333, 32), model(10, 333, 16), model(10, 333, 16)
    check_impls(lambda hs, ws, ht, wt, hr, wr, impl: ok.fused_linear_gopd_loss(
        hs, ws, ht, wt, hr, wr, reward_scale=1.5, impl=impl), [S[0], S[1], T[0], T[1], R[0], R[1]], [0, 1])


# ------------------------------------------------------------------------ CUDA-only variants
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_logits(dtype):
    N, V = 257, 50257
    s, t = logits(N, V, dtype=dtype), logits(N, V, dtype=dtype)
    y = targets(N, V)
    got = tb.row_stats(s, t, None, y, inv_temp=1.0)
    assert_close(got, ref.row_stats(*d64(s, t), None, y, inv_temp=1.0), rtol=1e-4, atol=1e-3)
    rs, g = rs_ref(s, t, None, None, "reverse_kl", 1.0), upstream(N)
    ds = tb.grad_logits(s, t, None, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0)
    want = ref.grad_logits(*d64(s, t), None, None, rs, g, kind="reverse_kl", inv_temp=1.0)
    assert_rel(ds, want, 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_fused(dtype):
    N, V, d = 300, 32011, 256
    args = [x if x is None else x.to(dtype) for x in (*model(N, V, d), *model(N, V, 192), None, None, None)]
    s, t, _ = logits_of(args)
    rs, g = rs_ref(s, t, None, None, "reverse_kl", 1.0), upstream(N)
    stats = tb.fused_row_stats(*args, None, inv_temp=1.0)
    assert_close(stats, ref.row_stats(s, t, None, None, inv_temp=1.0), rtol=1e-3, atol=1e-2)
    dh, dw, _ = tb.fused_grad(*args, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0,
                              need_dw=True, need_db=False)
    dh_ref, dw_ref, _ = fused_grad_ref(args, None, rs, g, False, kind="reverse_kl", inv_temp=1.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_rel(dh, dh_ref, tol)
    assert_rel(dw, dw_ref, tol)


@pytest.mark.cuda
def test_cuda_fused_reverse_kl_memory():
    """Fused reverse-KL fwd+bwd peak extra memory is O(N d + V d), far below one [N, V] bf16."""
    N, V, d = 4096, 32768, 512
    args = (*model(N, V, d), *model(N, V, d), None, None, None)
    args = [x if x is None else x.bfloat16() for x in args]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stats = tb.fused_row_stats(*args, None, inv_temp=1.0)
    rows = finish(stats)
    rs = torch.stack([rows.A, rows.B, rows.reverse_kl, rows.entropy], -1)
    g = torch.ones(N, 2, device=DEV)
    tb.fused_grad(*args, None, rs, g, kind="reverse_kl", inv_temp=1.0, need_dw=True, need_db=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * 4 * (N * d + V * d) + 2**20 < N * V * 2, extra
