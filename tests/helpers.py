"""Shared test helpers: devices, input builders, assert helpers, backend-skip helpers, the
checks of the backend primitives that the triton and cuda backends share, and the ctypes access to
the CUDA kernels' CPU emulation (``EmulatedLib``, ``EmulatedTransforms``).

Two references, two names:

* ``oracle`` (``tests/reference.py``): float64 formulas, independent of the package.
* ``torch_backend_ref``: the package's torch backend run on float64 inputs, a second
  implementation of the backend contract (opd_kernels/backends/__init__.py). The primitives'
  raw outputs (the 8 row statistics, the JSD sums, gradients for a given saved state) are only
  defined by that contract, so the triton and cuda primitives are compared with it.
"""
import ctypes

import pytest
import torch

import reference as oracle
from opd_kernels._stats import finish
from opd_kernels.backends import IDENTITY, check_transform
from opd_kernels.backends import torch_backend as torch_backend_ref

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
INF = float("inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ["torch"] + (["triton", "cuda"] if GPU else [])   # public-op tests run each of these


# ------------------------------------------------------------------------------ skip helpers
def require_extra(module, extra):
    """Import ``module``, or skip the test with a reason naming the optional extra that installs it."""
    return pytest.importorskip(module, reason=f"needs the '{extra}' extra: pip install -e '.[{extra}]'")


def require_impl(impl, fused=False):
    """``impl``, or skip the test with the reason the package gives when it is not available here."""
    import opd_kernels as ok

    x = torch.zeros(1, 2, device=DEV)
    try:
        if fused:
            ok.fused_linear_distill_loss(x, x, x, x, impl=impl)
        else:
            ok.distill_loss(x, x, impl=impl)
    except ValueError as e:
        pytest.skip(str(e))
    return impl


# ---------------------------------------------------------------------------- input builders
def d64(*xs):
    return [None if x is None else x.double() for x in xs]


def logits(N, V, *, dtype=torch.float32, scale=3.0, pad=0, offset=0, device=DEV):
    """Random logits as a view: row stride V + pad + offset (like a ``vocab_size=`` slice), first
    column at ``offset`` (an offset of 1 element makes the base pointer not 16-byte aligned)."""
    x = (torch.randn(N, V + pad + offset, device=device) * scale).to(dtype)
    return x[:, offset:offset + V]


def targets(N, V, vocab_start=0, device=DEV):
    """Targets of a vocabulary shard starting at ``vocab_start``; row 1 is ignored (-100), row 2
    is another shard's token."""
    y = torch.randint(0, V, (N,), device=device) + vocab_start
    y[1 % N] = -100
    y[2 % N] = vocab_start + V + 5
    return y


def upstream(N, device=DEV):
    """[N, 2] float64 upstream coefficients (g_main, g_ent); row 0 is a masked row (0)."""
    g = torch.randn(N, 2, device=device, dtype=torch.float64)
    g[0] = 0.0
    return g


def grad_case(kind, N=12, V=650, *, gopd=False, dtype=torch.float32, pad=5, offset=0, device=DEV):
    """(s, t, r) for the gradient primitives, with -inf entries banned by the student only, by both,
    and (for G-OPD) a reference model."""
    s = logits(N, V, dtype=dtype, pad=pad, offset=offset, device=device)
    t = None if kind == "logprob" else logits(N, V, dtype=dtype, device=device)
    r = logits(N, V, dtype=dtype, device=device) if gopd else None
    s[3, :40] = -INF                       # banned for the student (the teacher may support them)
    if t is not None and not gopd:
        t[3, 10:30] = -INF                 # banned for both (the teacher supports 0..9, 30..39)
        s[4, 100:110] = -INF
        t[4, 100:110] = -INF
    return s, t, r


# --------------------------------------------------------------------------- assert helpers
def assert_close(actual, expected, *, rtol, atol):
    """For the few one-off tolerances not in ``oracle.TOL`` (each commented where it is used)."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def assert_rel(actual, expected, tol):
    """Norm-wise relative error (for low-precision outputs summed over a large V or N)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def run_impls(fn, inputs, grad_of, impls):
    """``{impl: (values, grads)}`` of ``fn(*inputs, impl)`` for each impl: values and the gradients
    of the inputs indexed by ``grad_of``, under one random upstream weight (drawn on the first impl)."""
    res, w = {}, None
    for impl in impls:
        xs = [x.detach().clone().requires_grad_(i in grad_of) if isinstance(x, torch.Tensor)
              and x.is_floating_point() else x for i, x in enumerate(inputs)]
        val = fn(*xs, impl)
        val = val if isinstance(val, tuple) else (val,)
        w = w or [torch.randn_like(v) for v in val]
        sum((v * wi).sum() for v, wi in zip(val, w)).backward()
        res[impl] = ([v.detach() for v in val], [xs[i].grad for i in grad_of])
    return res


def assert_impls_agree(res, subject, value_kind="impl", grad_kind="impl_grad"):
    """``res[subject]`` (from ``run_impls``) equals every other impl's within ``oracle.TOL[float32]``."""
    values, grads = res[subject]
    for other, (v0, g0) in res.items():
        if other != subject:
            for a, b in zip(values, v0):
                oracle.close(a, b, torch.float32, value_kind)
            for a, b in zip(grads, g0):
                oracle.close(a, b, torch.float32, grad_kind)


# ------------------------------------------- backend-primitive checks (triton and cuda share)
# ``be`` is a backend module (or an object with the same functions); ``device`` its tensors' device.
def check_row_stats(be, case, temp, *, V, s_view, t_view=(0, 0), r_view=(0, 0), device=DEV):
    """row_stats (student only / teacher / G-OPD, with bans and an off-shard target) against the
    torch backend in float64; ``*_view`` = (pad, offset) of each operand. Returns (got, args, kw)."""
    N, start = 13, 50
    s = logits(N, V, pad=s_view[0], offset=s_view[1], device=device)
    t = logits(N, V, pad=t_view[0], offset=t_view[1], device=device) if case != "student" else None
    r = logits(N, V, pad=r_view[0], offset=r_view[1], device=device) if case == "gopd" else None
    s[3, 10:20] = -INF                     # banned for the student only
    if case == "teacher":
        t[3, 10:15] = -INF                 # banned for both
        t[4, 100] = -INF                   # the student supports it: reverse KL = +inf
        s[5, 200:] = -INF                  # the teacher supports it: forward KL = +inf
    y = targets(N, V, start, device=device)
    y[3] = start + 12                      # a target the student bans: a_y = -inf
    kw = dict(inv_temp=1 / temp, lam=1.25, vocab_start=start)
    got = be.row_stats(s, t, r, y, **kw)
    assert got.dtype == torch.float32 and got.shape == (N, 8) and got.device.type == torch.device(device).type
    oracle.close(got, torch_backend_ref.row_stats(*d64(s, t, r), y, **kw))
    assert got[3, 7] == -INF
    if case == "teacher":
        assert got[4, 5] == INF and got[5, 6] == INF
    return got, (s, t, r, y), kw


def check_all_neg_inf_row(be, N, V, device=DEV):
    """A row that is all -inf on this shard gives m = -inf and zero sums (never NaN); the other
    rows match the torch backend. Returns (got, (s, t, y), keep)."""
    s, t = logits(N, V, device=device), logits(N, V, device=device)
    y = targets(N, V, device=device)
    s[4] = -INF
    t[4] = -INF
    y[4] = -100
    got = be.row_stats(s, t, None, y, inv_temp=1.0)
    assert got[4, 0] == -INF and got[4, 3] == -INF
    assert torch.all(got[4, [1, 2, 4, 5, 6, 7]] == 0) and not got.isnan().any()
    keep = torch.arange(N, device=device) != 4
    oracle.close(got[keep], torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0)[keep])
    return got, (s, t, y), keep


def check_offset_accuracy(be, N, V, device=DEV):
    """Student ~ teacher with logits offset by +50: the small KLs (~5e-5) and the entropy from the
    row statistics are as accurate (vs the float64 oracle) as naive fp32 log_softmax."""
    s = logits(N, V, scale=2.0, device=device) + 50.0
    t = s + 0.01 * torch.randn_like(s)
    got = finish(be.row_stats(s, t, None, None, inv_temp=1.0).to(s.device))
    names = ("reverse_kl", "forward_kl", "entropy")
    oracle.assert_not_worse_than_naive({n: getattr(got, n) for n in names}, oracle.rows_f64(s, t), s, t)


def check_jsd_sums(be, beta, dtype=torch.float32, device=DEV):
    N, V = 11, 517
    s, t = logits(N, V, dtype=dtype, device=device), logits(N, V, dtype=dtype, pad=3, device=device)
    s[2, :30] = -INF
    t[2, 10:40] = -INF
    t[5, 7] = -INF
    AB = oracle.saved_row_state(s, t, None, "jsd", 1 / 0.9)[:, :2]
    got = be.jsd_sums(s, t, AB.float(), inv_temp=1 / 0.9, beta=beta)
    oracle.close(got, torch_backend_ref.jsd_sums(*d64(s, t), AB, inv_temp=1 / 0.9, beta=beta))


def check_grad_logits(be, kind, entropy, *, V=650, pad=5, offset=0, device=DEV):
    """grad_logits of each kind (T = 0.8, a vocab shard at 10) for the float64 saved state,
    against the torch backend. Returns (got, args, kw) for further checks."""
    temp, beta, start = 0.8, 0.4, 10
    s, t, r = grad_case(kind, V=V, pad=pad, offset=offset, device=device)
    y = targets(s.shape[0], s.shape[1], start, device=device) if kind == "logprob" else None
    rs = oracle.saved_row_state(s, t, r, kind, 1 / temp, beta=beta)
    g = upstream(s.shape[0], device=device)
    kw = dict(kind=kind, inv_temp=1 / temp, beta=beta, vocab_start=start, with_entropy=entropy)
    got = be.grad_logits(s, t, r, y, rs.float(), g.float(), **kw)
    assert got.dtype == s.dtype and got.shape == s.shape
    oracle.close(got, torch_backend_ref.grad_logits(*d64(s, t, r), y, rs, g, **kw), torch.float32, "grad")
    return got, (s, t, r, y, rs.float(), g.float()), kw


def check_grad_logits_gopd(be, device=DEV):
    s, t, r = grad_case("reverse_kl", gopd=True, device=device)
    kw = dict(inv_temp=1.0, lam=1.5)
    rs, g = oracle.saved_row_state(s, t, r, "reverse_kl", **kw), upstream(s.shape[0], device=device)
    got = be.grad_logits(s, t, r, None, rs.float(), g.float(), kind="reverse_kl", with_entropy=True, **kw)
    want = torch_backend_ref.grad_logits(*d64(s, t, r), None, rs, g, kind="reverse_kl", with_entropy=True, **kw)
    oracle.close(got, want, torch.float32, "grad")


def check_grad_in_place(be, dtype, device=DEV):
    """out=s overwrites the logits with their gradient, bit-equal to the out-of-place result.
    Returns (got, want): the gradient and the torch backend's in float64."""
    N, V = 10, 333
    s, t = logits(N, V, dtype=dtype, device=device), logits(N, V, dtype=dtype, device=device)
    rs = oracle.saved_row_state(s, t, None, "forward_kl", 1.0)
    g = upstream(N, device=device).float()
    kw = dict(kind="forward_kl", inv_temp=1.0)
    fresh = be.grad_logits(s, t, None, None, rs.float(), g, **kw)
    buf = s.clone()
    got = be.grad_logits(buf, t, None, None, rs.float(), g, out=buf, **kw)
    assert got.data_ptr() == buf.data_ptr() and got.dtype == dtype
    assert torch.equal(got, fresh)
    return got, torch_backend_ref.grad_logits(*d64(s, t), None, None, rs, g.double(), **kw)


def output_bytes(fn, views: bool = True):
    """Run ``fn()`` and return the byte sizes of every tensor any aten op produced meanwhile (to
    assert that no ``[N, V]`` buffer is ever allocated); ``views=False`` leaves out the outputs of
    view ops (``detach``, ``view``), which allocate nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            if not views and func.is_view:
                return out
            sizes.extend(o.nbytes for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor))
            return out

    with Record():
        fn()
    return sizes


class EmulatedLib:
    """ctypes access to csrc/emulate/host_emulation.cu (the CUDA kernels' per-thread code built for
    the CPU with nvcc): library loading and the operand marshalling shared by its test wrappers."""

    CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    KIND_IDS = {"logprob": 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3}

    def __init__(self, path):
        import ctypes
        self.lib = ctypes.CDLL(path)

    @staticmethod
    def _p(x):
        import ctypes
        return ctypes.c_void_p(None if x is None else x.data_ptr())

    def _x(self, x):
        """(pointer, row stride, dtype code) of a 2-D logits operand (or of nothing)."""
        import ctypes
        if x is None:
            return self._p(None), ctypes.c_int64(0), ctypes.c_int(0)
        assert x.dim() == 2 and x.stride(1) == 1 and x.device.type == "cpu"
        return self._p(x), ctypes.c_int64(x.stride(0)), ctypes.c_int(self.CODES[x.dtype])


class EmulatedTransforms(EmulatedLib):
    """The CUDA kernels' per-thread code (csrc/emulate/host_emulation.cu) on CPU tensors, through its
    entry points that take the logit transforms (``emu_*_tf``; ``test_primitives.py``)."""

    NAME = "emulated"

    @staticmethod
    def _tf(**tfs):
        """The (scale, cap) pairs as a float array, checked as the real backend checks them."""
        vals = [v for name, tf in tfs.items() for v in check_transform(tf, name)]
        return (ctypes.c_float * len(vals))(*vals)

    def row_stats(self, s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0, tf_s=IDENTITY,
                  tf_t=IDENTITY, tf_r=IDENTITY):
        N, V = s.shape
        out = torch.empty(N, 8)
        y = None if targets is None else targets.long().contiguous()
        self.lib.emu_row_stats_tf(*self._x(s), *self._x(t), *self._x(r)[:2], self._p(y), self._p(out),
                                  ctypes.c_int64(N), ctypes.c_int64(V), ctypes.c_float(inv_temp),
                                  ctypes.c_float(lam), ctypes.c_int64(vocab_start),
                                  self._tf(tf_s=tf_s, tf_t=tf_t, tf_r=tf_r))
        return out

    def jsd_sums(self, s, t, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY):
        N, V = s.shape
        out, AB = torch.empty(N, 2), AB.float().contiguous()
        self.lib.emu_jsd_sums_tf(*self._x(s), *self._x(t), self._p(AB), self._p(out), ctypes.c_int64(N),
                                 ctypes.c_int64(V), ctypes.c_float(inv_temp), ctypes.c_float(beta),
                                 self._tf(tf_s=tf_s, tf_t=tf_t))
        return out

    def grad_logits(self, s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                    out=None, with_entropy=False, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
        N, V = s.shape
        out = torch.empty_like(s, memory_format=torch.contiguous_format) if out is None else out
        y = None if targets is None else targets.long().contiguous()
        rs, g = rs.float().contiguous(), g.float().contiguous()
        self.lib.emu_grad_logits_tf(ctypes.c_int(self.KIND_IDS[kind]), self._p(out), ctypes.c_int64(out.stride(0)),
                                    *self._x(s), *self._x(t), *self._x(r)[:2], self._p(y), self._p(rs),
                                    self._p(g), ctypes.c_int64(N), ctypes.c_int64(V), ctypes.c_float(inv_temp),
                                    ctypes.c_float(lam), ctypes.c_float(beta), ctypes.c_int64(vocab_start),
                                    ctypes.c_int(int(with_entropy)), self._tf(tf_s=tf_s, tf_t=tf_t, tf_r=tf_r))
        return out


def assert_same_training(stock, fused, initial, steps):
    """TRL parity: two trainers' logged losses agree within 1e-5 (relative above 1) over ``steps``
    steps that differ from each other, and their final weights agree and moved away from ``initial``."""
    assert len(stock.seen) == len(fused.seen) == steps
    assert len(set(round(x, 6) for x in stock.seen)) > 1  # the steps differ (training moved)
    for a, b in zip(stock.seen, fused.seen):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stock.seen, fused.seen)
    moved = 0.0
    for (n, p), q, p0 in zip(stock.model.named_parameters(), fused.model.parameters(), initial.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3

