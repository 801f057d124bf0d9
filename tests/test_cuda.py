"""CUDA extension (``opd_kernels._C``, backend ``cuda``) against the torch backend in float64
(``torch_backend_ref``, saved states from the float64 oracle ``tests/reference.py``) and Triton.

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
import subprocess
import sys

import pytest
import torch

import helpers
import reference as oracle
from helpers import (DTYPES, GPU, EmulatedLib, assert_close, assert_rel, d64, logits, targets, torch_backend_ref,
                     upstream)
from opd_kernels.backends import KINDS
from opd_kernels.backends import cuda_backend as cb


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


class Emulated(EmulatedLib):
    """The backend contract over csrc/emulate/host_emulation.cu (CPU tensors, via ctypes)."""

    device = "cpu"

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
def emulated(host_emulation):
    return Emulated(host_emulation)


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=GPU_MARKS)])
def be(request):
    return request.getfixturevalue("emulated") if request.param == "emulated" else Cuda()


# --------------------------------------------------------------------------------- helpers
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


def grad_case(dev, kind, V=656, dtype=torch.float32, layout="odd_stride", gopd=False):
    pad, off = LAYOUTS[layout]
    return helpers.grad_case(kind, V=V, gopd=gopd, dtype=dtype, pad=pad, offset=off, device=dev)


# ------------------------------------------------------------------- primitives, both runners
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["student", "teacher", "gopd"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_row_stats(be, layout, case, temp):
    pad, off = LAYOUTS[layout]
    got, args, kw = helpers.check_row_stats(be, case, temp, V=704, s_view=(pad, off), t_view=(pad, 0),
                                            r_view=(0, off), device=be.device)
    if (tb := triton_or_none(be)) is not None:
        oracle.close(got, tb.row_stats(*args, **kw), kind="kernel")


@pytest.mark.parametrize("sdt", DTYPES)
@pytest.mark.parametrize("tdt", DTYPES)
def test_row_stats_dtype_pairs(be, sdt, tdt):
    """Each student/teacher dtype pair (the 3 x 3 instantiations): fp32 math on the rounded inputs."""
    N, V = 7, 1029                         # V % 8 == 5: a tail after the chunks
    s, t = logits(N, V, dtype=sdt, device=be.device), logits(N, V, dtype=tdt, pad=7, device=be.device)
    y = targets(N, V, device=be.device)
    oracle.close(be.row_stats(s, t, None, y, inv_temp=1.0),
                 torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0))


@pytest.mark.parametrize("V", [1, 5, 8, 33, 151936])
def test_row_stats_vocab_sizes(be, V):
    """Below one chunk, exactly one, a tail, and Qwen's vocabulary (512 threads per row)."""
    N = 3 if V > 10_000 else 9
    s, t = logits(N, V, dtype=torch.bfloat16, device=be.device), logits(N, V, dtype=torch.bfloat16, device=be.device)
    y = targets(N, V, device=be.device)
    # fp32 statistics of bf16 inputs; one-off: sums over V = 151936 get 1e-4 (not in oracle.TOL)
    tol = dict(rtol=1e-4, atol=1e-4) if V > 10_000 else oracle.tol(torch.float32)
    assert_close(be.row_stats(s, t, None, y, inv_temp=1.0),
                 torch_backend_ref.row_stats(*d64(s, t), None, y, inv_temp=1.0), **tol)


def test_row_stats_all_neg_inf_row(be):
    helpers.check_all_neg_inf_row(be, 6, 300, device=be.device)


def test_row_stats_offset_accuracy(be):
    """Student ~ teacher with logits offset by +50: the small KLs (~5e-5) and the entropy from
    the per-thread recurrence and the block merge are as accurate as naive fp32 log_softmax."""
    helpers.check_offset_accuracy(be, 8, 4001, device=be.device)


@pytest.mark.parametrize("beta", [0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd_sums(be, beta, dtype):
    helpers.check_jsd_sums(be, beta, dtype, device=be.device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grad_logits(be, kind, entropy, layout):
    pad, off = LAYOUTS[layout]
    got, args, kw = helpers.check_grad_logits(be, kind, entropy, V=656, pad=pad, offset=off, device=be.device)
    assert got.is_contiguous()
    assert torch.all(got[0] == 0)          # g = 0 on row 0
    if (tb := triton_or_none(be)) is not None:
        oracle.close(got, tb.grad_logits(*args, **kw), kind="kernel_grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_logits_low_precision(be, dtype, kind):
    s, t, r = grad_case(be.device, kind, V=1031, dtype=dtype, layout="aligned")
    y = targets(s.shape[0], s.shape[1], device=be.device) if kind == "logprob" else None
    rs, g = oracle.saved_row_state(s, t, r, kind, 1.0, beta=0.6), upstream(s.shape[0], device=be.device)
    kw = dict(kind=kind, inv_temp=1.0, beta=0.6, with_entropy=True)
    got = be.grad_logits(s, t, r, y, rs.float(), g.float(), **kw)
    assert got.dtype == dtype
    oracle.close(got, torch_backend_ref.grad_logits(*d64(s, t, r), y, rs, g, **kw), dtype, "grad")


def test_grad_logits_gopd(be):
    helpers.check_grad_logits_gopd(be, device=be.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_logits_in_place(be, dtype):
    """out=s overwrites the logits with their gradient, bit-equal to the out-of-place result."""
    helpers.check_grad_in_place(be, dtype, device=be.device)


def test_grad_logits_qwen_vocab(be):
    N, V = 3, 151936
    s = logits(N, V, dtype=torch.bfloat16, device=be.device)
    t = logits(N, V, dtype=torch.bfloat16, device=be.device)
    rs, g = oracle.saved_row_state(s, t, None, "reverse_kl", 1.0), upstream(N, device=be.device)
    got = be.grad_logits(s, t, None, None, rs.float(), g.float(), kind="reverse_kl", inv_temp=1.0)
    want = torch_backend_ref.grad_logits(*d64(s, t), None, None, rs, g, kind="reverse_kl", inv_temp=1.0)
    assert_rel(got, want, oracle.TOL[torch.bfloat16]["norm"][0])


# ---------------------------------------------------------------------------- GPU only
@gpu_only
def test_input_checks():
    ops, dev = torch.ops.opd_kernels_C, "cuda"
    s = logits(4, 64, device=dev)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cb.row_stats(s.cpu(), None, None, None, inv_temp=1.0)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        cb.row_stats(logits(64, 4, device=dev).T, None, None, None, inv_temp=1.0)
    with pytest.raises(RuntimeError, match="shape"):
        cb.row_stats(s, logits(4, 65, device=dev), None, None, inv_temp=1.0)
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


@gpu_only
@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_op_distill_loss_vs_torch_and_triton(div, beta):
    import opd_kernels as ok

    s, t = logits(10, 600, device="cuda"), logits(10, 600, device="cuda")
    mask = torch.rand(10, device="cuda") > 0.3
    impls = ("cuda", "torch") + (("triton",) if triton_or_none(Cuda()) else ())
    res = helpers.run_impls(lambda s, t, impl: ok.distill_loss(s, t, divergence=div, beta=beta, temperature=1.1,
                                                                mask=mask, impl=impl), [s, t], [0], impls)
    helpers.assert_impls_agree(res, "cuda", value_kind="impl_grad", grad_kind="impl_grad")


@gpu_only
def test_op_token_logprobs_and_gopd():
    import opd_kernels as ok

    x, y = logits(12, 640, device="cuda"), torch.randint(0, 640, (12,), device="cuda")
    y[0] = -100
    helpers.assert_impls_agree(helpers.run_impls(
        lambda x, impl: ok.token_logprobs(x, y, temperature=0.9, return_entropy=True, impl=impl),
        [x], [0], ("cuda", "torch")), "cuda", grad_kind="impl")
    s, t, r = logits(9, 420, device="cuda"), logits(9, 420, device="cuda"), logits(9, 420, device="cuda")
    helpers.assert_impls_agree(helpers.run_impls(
        lambda s, impl: ok.gopd_loss(s, t, r, reward_scale=1.25, reduction="none", impl=impl),
        [s], [0], ("cuda", "torch")), "cuda", grad_kind="impl")


@gpu_only
def test_compile_fullgraph_with_cuda_ops():
    """The registered ops (with their fakes) trace under torch.compile(fullgraph=True)."""
    import opd_kernels as ok

    torch._dynamo.reset()
    s = logits(8, 300, dtype=torch.bfloat16, device="cuda").clone().requires_grad_()
    t = logits(8, 300, dtype=torch.bfloat16, device="cuda")

    def f(s, t):
        return ok.distill_loss(s, t, divergence="jsd", beta=0.3, impl="cuda")

    eager = f(s, t)
    (ge,) = torch.autograd.grad(eager, s)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t)
    (gc,) = torch.autograd.grad(out, s)
    oracle.close(out, eager, kind="reorder")
    oracle.close(gc, ge, kind="reorder")
