"""CUDA extension (``opd_kernels._C``, backend ``cuda``) against the float64 reference and Triton.

Two ways to run the kernels' code:

* ``cuda``: the built extension on a GPU (tests marked ``cuda``; skipped without a GPU, and
  skipped with the reason when the extension is not built: ``pip install --no-build-isolation -e .``).
* ``emulated``: ``csrc/emulate/host_emulation.cu`` compiled here with nvcc (skipped without
  nvcc) runs the kernels' *per-thread* code on CPU tensors: chunking, vector and scalar loads,
  the V % E tail, -inf handling and every formula. The threads of a row run in turn and are
  merged in order, so it does not cover warp shuffles, shared memory or launches; and the host
  uses libm's exp where the GPU uses __expf.

Layouts covered: 16-byte aligned rows (vector loads), odd row strides and an unaligned base
pointer (scalar fallback), V below / equal to / not a multiple of the chunk width, Qwen's V,
every student/teacher dtype pair, -inf logits, in-place gradients.
"""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

import reference  # noqa: E402
from opd_kernels._stats import finish
from opd_kernels.backends import KINDS
from opd_kernels.backends import cuda_backend as cb
from opd_kernels.backends import torch_backend as ref

GPU = torch.cuda.is_available()
INF = float("inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ everywhere (CPU CI too)
def test_backend_is_optional_and_says_why():
    ok, why = cb.available()
    assert cb.NAME == "cuda"
    if not ok:
        assert why.startswith(("CUDA extension not built", "CUDA extension failed to load", "no CUDA device")), why
        if why.startswith("CUDA extension not built") and torch.version.cuda is not None:
            assert "pip install --no-build-isolation -e ." in why


def test_importing_opd_kernels_never_loads_the_extension():
    code = ("import sys, torch, opd_kernels as ok; "
            "ok.distill_loss(torch.randn(3, 7), torch.randn(3, 7), impl='torch'); "
            "assert 'opd_kernels._C' not in sys.modules, 'eager _C import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_impl_cuda_unavailable_error_names_the_reason():
    import opd_kernels as ok

    if cb.available()[0]:
        pytest.skip("the cuda backend is available here")
    x = torch.randn(2, 5, device="cuda" if GPU else "cpu")
    with pytest.raises(ValueError, match="impl='cuda' is not available here: .*(CUDA extension|no CUDA device)"):
        ok.distill_loss(x, x, impl="cuda")


# ------------------------------------------------------- the two runners of the kernel code
_OK, _WHY = cb.available()
GPU_MARKS = [pytest.mark.cuda, pytest.mark.skipif(GPU and not _OK, reason=f"cuda backend: {_WHY}")]


def gpu_only(fn):
    """Marked ``cuda`` (skipped without a GPU); skipped with the reason if the extension is not built."""
    for m in GPU_MARKS:
        fn = m(fn)
    return fn


def _nvcc():
    cands = [os.environ.get("CUDA_HOME", "") + "/bin/nvcc", shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


class Emulated:
    """The backend contract over csrc/emulate/host_emulation.cu (CPU tensors, via ctypes)."""

    device = "cpu"
    CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    KIND_IDS = {"logprob": 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3}

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)

    @staticmethod
    def _p(x):
        return ctypes.c_void_p(None if x is None else x.data_ptr())

    def _x(self, x):
        """(pointer, row stride, dtype code) of a 2-D logits operand (or of nothing)."""
        if x is None:
            return self._p(None), ctypes.c_int64(0), ctypes.c_int(0)
        assert x.dim() == 2 and x.stride(1) == 1 and x.device.type == "cpu"
        return self._p(x), ctypes.c_int64(x.stride(0)), ctypes.c_int(self.CODES[x.dtype])

    def _y(self, y):
        return self._p(None if y is None else y.long().contiguous())

    def row_stats(self, s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0):
        N, V = s.shape
        out = torch.empty(N, 8)
        y = None if targets is None else targets.long().contiguous()
        r = r if r is None or r.dtype == t.dtype else r.to(t.dtype)
        self.lib.emu_row_stats(*self._x(s), *self._x(t), *self._x(r)[:2], self._p(y), self._p(out),
                               ctypes.c_int64(N), ctypes.c_int64(V), ctypes.c_float(inv_temp),
                               ctypes.c_float(lam), ctypes.c_int64(vocab_start))
        return out

    def jsd_sums(self, s, t, AB, *, inv_temp, beta):
        N, V = s.shape
        out, AB = torch.empty(N, 2), AB.float().contiguous()
        self.lib.emu_jsd_sums(*self._x(s), *self._x(t), self._p(AB), self._p(out), ctypes.c_int64(N),
                              ctypes.c_int64(V), ctypes.c_float(inv_temp), ctypes.c_float(beta))
        return out

    def grad_logits(self, s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                    out=None, with_entropy=False):
        N, V = s.shape
        out = torch.empty_like(s, memory_format=torch.contiguous_format) if out is None else out
        y = None if targets is None else targets.long().contiguous()
        rs, g = rs.float().contiguous(), g.float().contiguous()
        self.lib.emu_grad_logits(ctypes.c_int(self.KIND_IDS[kind]), self._p(out), ctypes.c_int64(out.stride(0)),
                                 *self._x(s), *self._x(t), *self._x(r)[:2], self._p(y), self._p(rs),
                                 self._p(g), ctypes.c_int64(N), ctypes.c_int64(V), ctypes.c_float(inv_temp),
                                 ctypes.c_float(lam), ctypes.c_float(beta), ctypes.c_int64(vocab_start),
                                 ctypes.c_int(int(with_entropy)))
        return out


class Cuda:
    """The real extension (cuda_backend) on the GPU."""

    device = "cuda"

    def __getattr__(self, name):
        return getattr(cb, name)


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot build csrc/emulate/host_emulation.cu")
    so = str(tmp_path_factory.mktemp("emu") / "host_emulation.so")
    src = os.path.join(ROOT, "csrc", "emulate", "host_emulation.cu")
    cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", src, "-o", so]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    return Emulated(so)


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=GPU_MARKS)])
def be(request):
    return request.getfixturevalue("emulated") if request.param == "emulated" else Cuda()


# --------------------------------------------------------------------------------- helpers
def assert_close(actual, expected, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def d64(*xs):
    return [None if x is None else x.double() for x in xs]


def logits(dev, N, V, dtype=torch.float32, scale=3.0, pad=0, offset=0):
    """Random logits as a view: row stride V + pad + offset, first column at ``offset`` (an
    offset of 1 element makes the base pointer not 16-byte aligned)."""
    x = (torch.randn(N, V + pad + offset, device=dev) * scale).to(dtype)
    return x[:, offset:offset + V]


def targets(dev, N, V, vocab_start=0):
    y = torch.randint(0, V, (N,), device=dev) + vocab_start
    y[1 % N] = -100                    # ignored
    y[2 % N] = vocab_start + V + 5     # another shard's token
    return y


rs_ref = reference.saved_row_state


def upstream(dev, N):
    g = torch.randn(N, 2, device=dev, dtype=torch.float64)
    g[0] = 0.0  # a masked row
    return g


def triton_or_none(be):
    if be.device != "cuda":
        return None
    try:
        from opd_kernels.backends import triton_backend as tb
    except Exception:  # noqa: BLE001
        return None
    return tb if tb.available()[0] else None


# (pad, offset) of the student view: "aligned" has V % 8 == 0 and a 16-byte row stride.
LAYOUTS = {"aligned": (8, 0), "odd_stride": (3, 0), "unaligned_base": (7, 1)}
GRAD_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4),
            torch.float16: dict(rtol=2e-3, atol=2e-5)}


# ------------------------------------------------------------------- primitives, both runners
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["student", "teacher", "gopd"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_row_stats(be, layout, case, temp):
    dev, (pad, off) = be.device, LAYOUTS[layout]
    N, V, start = 13, 704, 50
    s = logits(dev, N, V, pad=pad, offset=off)
    t = logits(dev, N, V, pad=pad) if case != "student" else None
    r = logits(dev, N, V, offset=off) if case == "gopd" else None
    s[3, 10:20] = -INF                     # banned for the student only
    if case == "teacher":
        t[3, 10:15] = -INF                 # banned for both
        t[4, 100] = -INF                   # the student supports it: reverse KL = +inf
        s[5, 200:] = -INF                  # the teacher supports it: forward KL = +inf
    y = targets(dev, N, V, start)
    y[3] = start + 12                      # a target the student bans: a_y = -inf
    kw = dict(inv_temp=1 / temp, lam=1.25, vocab_start=start)
    got = be.row_stats(s, t, r, y, **kw)
    assert got.dtype == torch.float32 and got.shape == (N, 8) and got.device.type == dev
    assert_close(got, ref.row_stats(*d64(s, t, r), y, **kw))
    assert got[3, 7] == -INF
    if case == "teacher":
        assert got[4, 5] == INF and got[5, 6] == INF
    if (tb := triton_or_none(be)) is not None:
        assert_close(got, tb.row_stats(s, t, r, y, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sdt", DTYPES)
@pytest.mark.parametrize("tdt", DTYPES)
def test_row_stats_dtype_pairs(be, sdt, tdt):
    """Each student/teacher dtype pair (the 3 x 3 instantiations): fp32 math on the rounded inputs."""
    N, V = 7, 1029                         # V % 8 == 5: a tail after the chunks
    s, t = logits(be.device, N, V, dtype=sdt), logits(be.device, N, V, dtype=tdt, pad=7)
    y = targets(be.device, N, V)
    assert_close(be.row_stats(s, t, None, y, inv_temp=1.0), ref.row_stats(*d64(s, t), None, y, inv_temp=1.0))


@pytest.mark.parametrize("V", [1, 5, 8, 33, 151936])
def test_row_stats_vocab_sizes(be, V):
    """Below one chunk, exactly one, a tail, and Qwen's vocabulary (512 threads per row)."""
    N = 3 if V > 10_000 else 9
    s, t = logits(be.device, N, V, dtype=torch.bfloat16), logits(be.device, N, V, dtype=torch.bfloat16)
    y = targets(be.device, N, V)
    tol = 1e-4 if V > 10_000 else 2e-5
    assert_close(be.row_stats(s, t, None, y, inv_temp=1.0), ref.row_stats(*d64(s, t), None, y, inv_temp=1.0),
                 rtol=tol, atol=tol)


def test_row_stats_all_neg_inf_row(be):
    N, V = 6, 300
    s, t = logits(be.device, N, V), logits(be.device, N, V)
    s[4] = -INF
    t[4] = -INF
    y = targets(be.device, N, V)
    y[4] = -100
    got = be.row_stats(s, t, None, y, inv_temp=1.0)
    assert got[4, 0] == -INF and got[4, 3] == -INF
    assert torch.all(got[4, [1, 2, 4, 5, 6, 7]] == 0) and not got.isnan().any()
    keep = torch.arange(N, device=be.device) != 4
    assert_close(got[keep], ref.row_stats(*d64(s, t), None, y, inv_temp=1.0)[keep])


def test_row_stats_offset_accuracy(be):
    """Student ~ teacher with logits offset by +50: the small KLs (~5e-5) and the entropy from
    the per-thread recurrence and the block merge are as accurate as naive fp32 log_softmax."""
    N, V = 8, 4001
    s = logits(be.device, N, V, scale=2.0) + 50.0
    t = s + 0.01 * torch.randn_like(s)
    got = finish(be.row_stats(s, t, None, None, inv_temp=1.0).to(s.device))
    want = finish(ref.row_stats(*d64(s, t), None, None, inv_temp=1.0))
    reference.assert_not_worse_than_naive({n: getattr(got, n) for n in ("reverse_kl", "forward_kl", "entropy")},
                                          {n: getattr(want, n) for n in ("reverse_kl", "forward_kl", "entropy")}, s, t)


@pytest.mark.parametrize("beta", [0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd_sums(be, beta, dtype):
    N, V = 11, 517
    s, t = logits(be.device, N, V, dtype=dtype), logits(be.device, N, V, dtype=dtype, pad=3)
    s[2, :30] = -INF
    t[2, 10:40] = -INF
    t[5, 7] = -INF
    rows = finish(ref.row_stats(*d64(s, t), None, None, inv_temp=1 / 0.9))
    AB = torch.stack([rows.A, rows.B], -1)
    got = be.jsd_sums(s, t, AB.float(), inv_temp=1 / 0.9, beta=beta)
    assert_close(got, ref.jsd_sums(*d64(s, t), AB, inv_temp=1 / 0.9, beta=beta))


def grad_case(dev, kind, N=12, V=656, gopd=False, dtype=torch.float32, layout="odd_stride"):
    pad, off = LAYOUTS[layout]
    s = logits(dev, N, V, dtype=dtype, pad=pad, offset=off)
    t = None if kind == "logprob" else logits(dev, N, V, dtype=dtype)
    r = logits(dev, N, V, dtype=dtype) if gopd else None
    s[3, :40] = -INF                       # banned for the student (the teacher may support them)
    if t is not None and not gopd:
        t[3, 10:30] = -INF                 # banned for both
        s[4, 100:110] = -INF
        t[4, 100:110] = -INF
    return s, t, r


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grad_logits(be, kind, entropy, layout):
    temp, beta, start = 0.8, 0.4, 10
    s, t, r = grad_case(be.device, kind, layout=layout)
    y = targets(be.device, s.shape[0], s.shape[1], start) if kind == "logprob" else None
    rs = rs_ref(s, t, r, y, kind, 1 / temp, beta=beta, vocab_start=start)
    g = upstream(be.device, s.shape[0])
    kw = dict(kind=kind, inv_temp=1 / temp, beta=beta, vocab_start=start, with_entropy=entropy)
    got = be.grad_logits(s, t, r, y, rs.float(), g.float(), **kw)
    want = ref.grad_logits(*d64(s, t, r), y, rs, g, **kw)
    assert got.dtype == s.dtype and got.shape == s.shape and got.is_contiguous()
    assert_close(got, want, **GRAD_TOL[torch.float32])
    assert torch.all(got[0] == 0)          # g = 0 on row 0
    if (tb := triton_or_none(be)) is not None:
        assert_close(got, tb.grad_logits(s, t, r, y, rs.float(), g.float(), **kw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_logits_low_precision(be, dtype, kind):
    s, t, r = grad_case(be.device, kind, V=1031, dtype=dtype, layout="aligned")
    y = targets(be.device, s.shape[0], s.shape[1]) if kind == "logprob" else None
    rs, g = rs_ref(s, t, r, y, kind, 1.0, beta=0.6), upstream(be.device, s.shape[0])
    kw = dict(kind=kind, inv_temp=1.0, beta=0.6, with_entropy=True)
    got = be.grad_logits(s, t, r, y, rs.float(), g.float(), **kw)
    assert got.dtype == dtype
    assert_close(got, ref.grad_logits(*d64(s, t, r), y, rs, g, **kw), **GRAD_TOL[dtype])


def test_grad_logits_gopd(be):
    s, t, r = grad_case(be.device, "reverse_kl", gopd=True)
    kw = dict(inv_temp=1.0, lam=1.5)
    rs, g = rs_ref(s, t, r, None, "reverse_kl", **kw), upstream(be.device, s.shape[0])
    got = be.grad_logits(s, t, r, None, rs.float(), g.float(), kind="reverse_kl", with_entropy=True, **kw)
    want = ref.grad_logits(*d64(s, t, r), None, rs, g, kind="reverse_kl", with_entropy=True, **kw)
    assert_close(got, want, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_logits_in_place(be, dtype):
    """out=s overwrites the logits with their gradient, bit-equal to the out-of-place result."""
    N, V = 10, 333
    s, t = logits(be.device, N, V, dtype=dtype), logits(be.device, N, V, dtype=dtype)
    rs, g = rs_ref(s, t, None, None, "forward_kl", 1.0).float(), upstream(be.device, N).float()
    kw = dict(kind="forward_kl", inv_temp=1.0)
    fresh = be.grad_logits(s, t, None, None, rs, g, **kw)
    buf = s.clone()
    got = be.grad_logits(buf, t, None, None, rs, g, out=buf, **kw)
    assert got.data_ptr() == buf.data_ptr() and got.dtype == dtype
    assert torch.equal(got, fresh)


def test_grad_logits_qwen_vocab(be):
    N, V = 3, 151936
    s, t = logits(be.device, N, V, dtype=torch.bfloat16), logits(be.device, N, V, dtype=torch.bfloat16)
    rs, g = rs_ref(s, t, None, None, "reverse_kl", 1.0), upstream(be.device, N)
    got = be.grad_logits(s, t, None, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0)
    want = ref.grad_logits(*d64(s, t), None, None, rs, g, kind="reverse_kl", inv_temp=1.0)
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-2, err


# ---------------------------------------------------------------------------- GPU only
@gpu_only
def test_input_checks():
    ops, dev = torch.ops.opd_kernels_C, "cuda"
    s = logits(dev, 4, 64)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cb.row_stats(s.cpu(), None, None, None, inv_temp=1.0)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        cb.row_stats(logits(dev, 64, 4).T, None, None, None, inv_temp=1.0)
    with pytest.raises(RuntimeError, match="shape"):
        cb.row_stats(s, logits(dev, 4, 65), None, None, inv_temp=1.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.row_stats(s, None, None, torch.zeros(4, dtype=torch.int32, device=dev), 1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="requires t"):
        ops.row_stats(s, None, s, None, 1.0, 1.0, 0)
    z4, z2 = torch.zeros(4, 4, device=dev), torch.zeros(4, 2, device=dev)
    with pytest.raises(RuntimeError, match="kind must be one of"):
        cb.grad_logits(s, s, None, None, z4, z2, kind="kl", inv_temp=1.0)
    with pytest.raises(RuntimeError, match="rs must have shape"):
        cb.grad_logits(s, s, None, None, z4[:, :3], z2, kind="forward_kl", inv_temp=1.0)
    assert cb.row_stats(s[:0], s[:0], None, None, inv_temp=1.0).shape == (0, 8)


def _run_impls(fn, inputs, grad_of, impls):
    """Values and grads of ``fn(*inputs, impl)`` for each impl, with one shared upstream weight."""
    res, w = {}, None
    for impl in impls:
        xs = [x.detach().clone().requires_grad_(i in grad_of) if isinstance(x, torch.Tensor)
              and x.is_floating_point() else x for i, x in enumerate(inputs)]
        val = fn(*xs, impl)
        val = val if isinstance(val, tuple) else (val,)
        w = w or [torch.randn_like(v) for v in val]
        sum((v * wi).sum() for v, wi in zip(val, w)).backward()
        res[impl] = ([v.detach() for v in val] + [xs[i].grad for i in grad_of])
    return res


def _compare(res, rtol=1e-4, atol=1e-5):
    for other in [k for k in res if k != "cuda"]:
        for a, b in zip(res["cuda"], res[other]):
            assert_close(a, b, rtol=rtol, atol=atol)


@gpu_only
@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_op_distill_loss_vs_torch_and_triton(div, beta):
    import opd_kernels as ok

    s, t = logits("cuda", 10, 600), logits("cuda", 10, 600)
    mask = torch.rand(10, device="cuda") > 0.3
    impls = ("cuda", "torch") + (("triton",) if triton_or_none(Cuda()) else ())
    res = _run_impls(lambda s, t, impl: ok.distill_loss(s, t, divergence=div, beta=beta, temperature=1.1,
                                                         mask=mask, impl=impl), [s, t], [0], impls)
    _compare(res, rtol=1e-3)


@gpu_only
def test_op_token_logprobs_and_gopd():
    import opd_kernels as ok

    x, y = logits("cuda", 12, 640), torch.randint(0, 640, (12,), device="cuda")
    y[0] = -100
    _compare(_run_impls(lambda x, impl: ok.token_logprobs(x, y, temperature=0.9, return_entropy=True, impl=impl),
                        [x], [0], ("cuda", "torch")))
    s, t, r = logits("cuda", 9, 420), logits("cuda", 9, 420), logits("cuda", 9, 420)
    _compare(_run_impls(lambda s, impl: ok.gopd_loss(s, t, r, reward_scale=1.25, reduction="none", impl=impl),
                        [s], [0], ("cuda", "torch")))


@gpu_only
def test_compile_fullgraph_with_cuda_ops():
    """The registered ops (with their fakes) trace under torch.compile(fullgraph=True)."""
    import opd_kernels as ok

    torch._dynamo.reset()
    s = logits("cuda", 8, 300, dtype=torch.bfloat16).clone().requires_grad_()
    t = logits("cuda", 8, 300, dtype=torch.bfloat16)

    def f(s, t):
        return ok.distill_loss(s, t, divergence="jsd", beta=0.3, impl="cuda")

    eager = f(s, t)
    (ge,) = torch.autograd.grad(eager, s)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t)
    (gc,) = torch.autograd.grad(out, s)
    assert_close(out, eager, rtol=1e-6, atol=1e-6)
    assert_close(gc, ge, rtol=1e-6, atol=1e-6)
