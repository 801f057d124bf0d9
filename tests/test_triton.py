"""Triton backend: its primitives against the torch backend's run in float64 (``torch_backend_ref``,
with saved states from the float64 oracle ``tests/reference.py``), its public ops against impl="torch".

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

import helpers  # noqa: E402
import reference as oracle  # noqa: E402
from helpers import DEV, INF, assert_close, assert_rel, d64, logits, targets, torch_backend_ref, upstream  # noqa: E402
from opd_kernels._stats import finish  # noqa: E402
from opd_kernels.backends import KINDS  # noqa: E402
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


def _splits(monkeypatch, n):
    """Make the kernels split the vocabulary over (at most) ``n`` programs per row block."""
    monkeypatch.setattr(tb, "_n_splits", lambda row_blocks, n_tiles, device: min(n, n_tiles))


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
    helpers.check_row_stats(tb, case, temp, V=700, s_view=(9, 0))


def test_row_stats_all_neg_inf_row_and_splits(monkeypatch):
    """A row that is all -inf on this shard gives m=-inf and zero sums (never NaN); vocab
    splits (grid axis 1) merge to the same statistics as one pass."""
    one, (s, t, y), keep = helpers.check_all_neg_inf_row(tb, 9, 1100)
    _splits(monkeypatch, 3)
    split = tb.row_stats(s, t, None, y, inv_temp=1.0)
    oracle.close(split, one, kind="reorder")
    oracle.close(split[keep], torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0)[keep])


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
    _splits(monkeypatch, 3)
    helpers.check_offset_accuracy(tb, 8, 1100)


@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_jsd_sums(beta):
    helpers.check_jsd_sums(tb, beta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_grad_logits(kind, entropy):
    helpers.check_grad_logits(tb, kind, entropy)


def test_grad_logits_gopd():
    helpers.check_grad_logits_gopd(tb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_logits_in_place(dtype):
    """out=s overwrites the logits with their gradient, equal to the out-of-place result."""
    got, want = helpers.check_grad_in_place(tb, dtype)
    oracle.close(got, want, dtype, "grad")


def test_bf16_inputs_stats():
    """bf16 student, fp16 teacher (mixed dtypes): fp32 math on the rounded values."""
    N, V = 8, 901
    s, t = logits(N, V, dtype=torch.bfloat16), logits(N, V, dtype=torch.float16)
    y = targets(N, V)
    got = tb.row_stats(s, t, None, y, inv_temp=1.0)
    oracle.close(got, torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0))

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
    oracle.close(got, torch_backend_ref.row_stats(*logits_of(args), y, **kw))
    assert got[6, 7] == -INF


def test_fused_row_stats_splits(monkeypatch):
    args = fused_models("teacher_bias", V=700)
    y = targets(13, 700)
    one = tb.fused_row_stats(*args, y, inv_temp=1.0)
    _splits(monkeypatch, 4)
    oracle.close(tb.fused_row_stats(*args, y, inv_temp=1.0), one, kind="reorder")


def test_fused_jsd_sums():
    args = fused_models("teacher_bias")
    s, t, _ = logits_of(args)
    AB = oracle.saved_row_state(s, t, None, "jsd", 1.0)[:, :2]
    got = tb.fused_jsd_sums(*args[:6], AB.float(), inv_temp=1.0, beta=0.25)
    oracle.close(got, torch_backend_ref.jsd_sums(s, t, AB, inv_temp=1.0, beta=0.25))


def test_fused_row_stats_mixed_dtypes():
    """fp16 student hidden with an fp32 weight (cast to the weight's dtype in the kernel) and
    an fp16 teacher. The interpreter's fp16 tl.dot accumulates in fp16, hence the tolerance."""
    hs, ws, bs = model(12, 410, 32, bias=True)
    ht, wt, _ = model(12, 410, 48)
    args = (hs.half(), ws, bs, ht.half(), wt.half(), None, None, None, None)
    y = targets(12, 410)
    got = tb.fused_row_stats(*args, y, inv_temp=1.0)
    rtol = 3e-2 if DEV == "cpu" else 1e-3     # one-off: fp16 tl.dot (not in oracle.TOL)
    assert_close(got, torch_backend_ref.row_stats(*logits_of(args), y, inv_temp=1.0), rtol=rtol, atol=rtol)


def fused_grad_ref(args, y, rs, g, need_db, **kw):
    s, t, r = logits_of(args)
    ds = torch_backend_ref.grad_logits(s, t, r, y, rs, g, **kw)
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
    rs = oracle.saved_row_state(s, t, r, kind, kw["inv_temp"], lam=1.25, beta=0.35)
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
            oracle.close(got, exp, kind="gemm_grad")


def test_fused_grad_needs():
    """need_dw/need_db False return None and leave dh unchanged (db alone still works)."""
    args = fused_models("teacher_bias", N=9, V=300)
    s, t, _ = logits_of(args)
    rs, g = oracle.saved_row_state(s, t, None, "forward_kl", 1.0), upstream(9)
    kw = dict(kind="forward_kl", inv_temp=1.0, with_entropy=False)
    dh, dw, db = tb.fused_grad(*args, None, rs.float(), g.float(), need_dw=False, need_db=True, **kw)
    dh_ref, _, db_ref = fused_grad_ref(args, None, rs, g, True, **kw)
    assert dw is None
    oracle.close(dh, dh_ref, kind="gemm_grad")
    oracle.close(db, db_ref, kind="gemm_grad")
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
    rs, g = oracle.saved_row_state(s, t, None, "reverse_kl", 1.0).float(), upstream(N).float()
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


def check_impls(fn, inputs, grad_of):
    """``fn(*inputs, impl)``: triton's values and gradients equal the torch backend's."""
    helpers.assert_impls_agree(helpers.run_impls(fn, inputs, grad_of, ("torch", "triton")), "triton")


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
    # one-off: sums over V = 50257 (not in oracle.TOL)
    assert_close(got, torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0), rtol=1e-4, atol=1e-3)
    rs, g = oracle.saved_row_state(s, t, None, "reverse_kl", 1.0), upstream(N)
    ds = tb.grad_logits(s, t, None, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0)
    want = torch_backend_ref.grad_logits(*d64(s, t), None, None, rs, g, kind="reverse_kl", inv_temp=1.0)
    assert_rel(ds, want, oracle.TOL[dtype]["norm"][0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_fused(dtype):
    N, V, d = 300, 32011, 256
    args = [x if x is None else x.to(dtype) for x in (*model(N, V, d), *model(N, V, 192), None, None, None)]
    s, t, _ = logits_of(args)
    rs, g = oracle.saved_row_state(s, t, None, "reverse_kl", 1.0), upstream(N)
    stats = tb.fused_row_stats(*args, None, inv_temp=1.0)
    # one-off tolerances: GEMMs over d = 256 then sums over V = 32011 (not in oracle.TOL)
    assert_close(stats, torch_backend_ref.row_stats(s, t, None, None, inv_temp=1.0), rtol=1e-3, atol=1e-2)
    dh, dw, _ = tb.fused_grad(*args, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0,
                              need_dw=True, need_db=False)
    dh_ref, dw_ref, _ = fused_grad_ref(args, None, rs, g, False, kind="reverse_kl", inv_temp=1.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4   # one-off: norm-wise, GEMMs over N = 300 or V = 32011
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
