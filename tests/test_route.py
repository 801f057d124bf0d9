"""The fused-linear route (``opd_kernels/ops/_route.py``): the rule's decisions from its FLOP/byte
model, the ``OPD_FUSED_LINEAR`` override, the CUDA chunk budget and GEMM modes of the chunk loop,
and impl="triton" under both routes equal to the torch backend (Triton interpreter on CPU)."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import helpers  # noqa: E402
import opd_kernels as ok  # noqa: E402
from opd_kernels import _chunks  # noqa: E402
from opd_kernels.ops import _fused, _gemm, _route  # noqa: E402
from opd_kernels.ops._spec import RowSpec  # noqa: E402

REFERENCE = [(8192, 128256, 4096), (16384, 151936, 2048)]
CUDA = torch.device("cuda")


# ------------------------------------------------------------------------- the rule (a model)
@pytest.mark.parametrize("N,V,d", REFERENCE)
@pytest.mark.parametrize("jsd", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_shapes_take_the_chunked_path(monkeypatch, N, V, d, jsd, dtype):
    monkeypatch.delenv(_route.ENV, raising=False)
    assert not _route.use_fused_kernels(N, V, d, dtype, models=2, jsd=jsd)
    kernels, chunked = _route.predict(N, V, d, dtype, models=2, jsd=jsd)
    # bf16: the kernels' accumulator traffic dominates; fp32: both compute-bound, 2x the GEMM passes
    assert kernels.total > (3 if dtype == torch.bfloat16 else 1.5) * chunked.total, (kernels, chunked)


@pytest.mark.parametrize("N,V,d", REFERENCE)
def test_model_puts_the_chunked_path_near_its_floor(N, V, d):
    """The model's own claim (not a measurement): bf16 fwd+bwd within 1.3x of 4 GEMM passes at
    the H100 rate, on both reference shapes and both machines."""
    floor = 4 * 2.0 * N * V * d / _route.H100.flops_16
    for jsd in (False, True):
        for m in (_route.H100, _route.H200):
            rows = _chunks.fused_rows_per_chunk(V, [2, 2], CUDA)
            c = _route.chunked_cost(N, V, (d, d), 2, m, rows, jsd=jsd)
            assert floor <= c.total <= 1.3 * floor, (m.name, jsd, c.total / floor)


@pytest.mark.parametrize("N,V,d", [(64, 512, 64), (41, 1271, 32), (16, 300, 16)])
def test_tiny_shapes_take_the_kernels(monkeypatch, N, V, d):
    """Launch-bound sizes: the fused kernels launch fewer ops than the chunk loop."""
    monkeypatch.delenv(_route.ENV, raising=False)
    for dtype in (torch.bfloat16, torch.float32):
        assert _route.use_fused_kernels(N, V, d, dtype, models=2)
        assert _route.use_fused_kernels(N, V, d, dtype, models=1)


def test_small_n_large_vocab_takes_the_chunked_path(monkeypatch):
    """Few rows but a large V*d: the dh kernel has ceil(N/64) programs (a sliver of the GPU)."""
    monkeypatch.delenv(_route.ENV, raising=False)
    assert not _route.use_fused_kernels(256, 32000, 4096, torch.bfloat16)


def test_env_override(monkeypatch):
    N, V, d = REFERENCE[0]
    monkeypatch.setenv(_route.ENV, "kernels")
    assert _route.use_fused_kernels(N, V, d, torch.bfloat16)
    monkeypatch.setenv(_route.ENV, "chunked")
    assert not _route.use_fused_kernels(64, 512, 64, torch.bfloat16)
    monkeypatch.setenv(_route.ENV, "bogus")
    with pytest.raises(ValueError, match=r"OPD_FUSED_LINEAR must be one of .*'bogus'"):
        _route.use_fused_kernels(64, 512, 64, torch.bfloat16)


# --------------------------------------------------------------------- chunk budget, GEMM modes
def test_cuda_budget_counts_every_live_buffer(monkeypatch):
    monkeypatch.setattr(_chunks, "CUDA_CHUNK_BYTES", 2**30)
    V = 128256
    two = _chunks.fused_rows_per_chunk(V, [2, 2], CUDA)
    three = _chunks.fused_rows_per_chunk(V, [2, 2, 2], CUDA)
    assert two == 2048 and two % _chunks.CUDA_ROW_ALIGN == 0 and two * V * 4 <= 2**30
    assert three * V * 6 <= 2**30 < (three + _chunks.CUDA_ROW_ALIGN) * V * 6
    cpu = torch.device("cpu")
    assert _chunks.fused_rows_per_chunk(V, [2, 2], cpu) == max(_chunks.rows_per_chunk(V), _chunks.CPU_MIN_ROWS)
    assert _chunks.fused_rows_per_chunk(151936, [4, 4], cpu) == _chunks.CPU_MIN_ROWS  # the budget alone: 110
    assert _chunks.fused_rows_per_chunk(8000, [4, 4], cpu) == _chunks.rows_per_chunk(8000) > _chunks.CPU_MIN_ROWS
    assert _chunks.fused_row_ranges(5000, V, [2, 2], CUDA, rows=999)[1] == (999, 1998)  # chunk_size= wins


def test_gemm_modes_by_device_and_dtype():
    w32, w16 = torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bfloat16)
    assert _gemm.gemm_mode(w32, torch.float32) == "same"
    assert _gemm.gemm_mode(w16, torch.float32) == "cast"  # CPU bf16 (the ops convert it first anyway)
    assert _gemm.compute_weight(w16).dtype == torch.float32
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.mm(w16, w16.T, out_dtype=torch.float32)  # why CPU never takes "out_dtype"


@pytest.mark.parametrize("mode", ["same", "out_dtype", "cast"])
def test_accumulate_grads_modes(monkeypatch, mode):
    """Each GEMM mode gives dh = ds W, dW = sum_chunks ds^T h, db = sum ds (the "out_dtype" calls
    are checked for shapes and dtypes on meta tensors: they exist on CUDA only)."""
    N, V, d = 10, 7, 3
    monkeypatch.setattr(_gemm, "gemm_mode", lambda w, acc: mode)
    dev = "meta" if mode == "out_dtype" else "cpu"
    wdt = torch.float32 if mode == "same" else torch.bfloat16
    gs, h, w = torch.randn(N, V), torch.randn(N, d), torch.randn(V, d)
    gs, h, w = (x.to(wdt).float() for x in (gs, h, w))  # exactly representable in bf16
    models = (h.to(dev, wdt), w.to(dev, wdt), torch.zeros(V, device=dev)) + (None,) * 6
    bufs = _gemm.grad_buffers(models, [True, True, True], overwrite=True)
    for n, (i, j) in enumerate([(0, 4), (4, 10)]):
        _gemm.accumulate_grads(gs[i:j].to(dev, wdt), models[0], models[1], i, j, bufs, first=n == 0)
    assert all(b.dtype == torch.float32 for b in bufs)
    if dev == "cpu":
        for got, want in zip(bufs, (gs @ w, gs.T @ h, gs.sum(0))):
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_out_dtype_gemm_mode_values(monkeypatch):
    """The CUDA chunk loop's default GEMM mode for bf16 weights, "out_dtype" (cuBLAS writes fp32 straight
    into dh/dW), gives dh = ds W, dW = sum_chunks ds^T h, db = sum ds exactly on integer data (every
    product and sum exact in fp32), over uneven chunks; then a bf16 fused loss that runs it matches
    the float64 oracle."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    if _gemm.gemm_mode(torch.zeros(1, 1, device=dev, dtype=bf16), torch.float32) != "out_dtype":
        pytest.skip(f"torch {torch.__version__}: the chunk loop takes out_dtype GEMMs from torch 2.12 on")
    N, V, d = 37, 29, 16
    g = torch.Generator().manual_seed(0)
    gs, h, w = (torch.randint(-3, 4, shape, generator=g).double() for shape in ((N, V), (N, d), (V, d)))
    models = (h.to(dev, bf16), w.to(dev, bf16), torch.zeros(V, device=dev, dtype=bf16)) + (None,) * 6
    bufs = _gemm.grad_buffers(models, [True, True, True], overwrite=True)
    for n, (i, j) in enumerate([(0, 5), (5, 21), (21, N)]):
        _gemm.accumulate_grads(gs[i:j].to(dev, bf16), models[0], models[1], i, j, bufs, first=n == 0)
    for got, want in zip(bufs, (gs @ w, gs.T @ h, gs.sum(0))):
        assert got.dtype == torch.float32
        assert torch.equal(got.double().cpu(), want)

    modes = []
    real = _gemm.gemm_mode
    monkeypatch.setattr(_gemm, "gemm_mode", lambda w, acc: modes.append(real(w, acc)) or modes[-1])
    hs, ws, ht, wt = (torch.randn(*shape, generator=g).to(dev, bf16).requires_grad_(k < 2)
                      for k, shape in enumerate(((N, d), (V, d), (N, 24), (V, 24))))
    loss = ok.fused_linear_distill_loss(hs, ws, ht, wt, divergence="jsd", chunk_size=8, impl="torch")
    dh, dw = torch.autograd.grad(loss, (hs, ws))
    x, y = (a.detach().double().requires_grad_() for a in (hs, ws))
    s = x @ y.T
    s = s + (s.detach().to(bf16).double() - s.detach())  # the logits as the bf16 GEMM rounds them
    want = helpers.oracle.divergence_rows(s, (ht.double() @ wt.double().T).to(bf16), "jsd", 0.5).mean()
    wdh, wdw = torch.autograd.grad(want, (x, y))
    assert modes and set(modes) == {"out_dtype"}
    helpers.oracle.close(loss, want, bf16)
    for got, ref in ((dh, wdh), (dw, wdw)):  # ds is rounded to bf16 before its GEMMs: norm-wise
        helpers.assert_rel(got.cpu(), ref, helpers.oracle.TOL[bf16]["norm"][0])


# ------------------------------------------------------- impl="triton", both routes vs torch
triton_backend = pytest.importorskip("opd_kernels.backends.triton_backend")
_OK, _WHY = triton_backend.available()


def needs_triton(test):
    """A Triton-interpreter test (marked ``triton``), skipped where the backend is unavailable."""
    return pytest.mark.triton(pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")(test))


def _model(N, V, d, bias=False):
    h = torch.randn(N, d, device=helpers.DEV)
    w = torch.randn(V, d, device=helpers.DEV) / math.sqrt(d)
    return h, w, (torch.randn(V, device=helpers.DEV) if bias else None)


def _spy(monkeypatch, route):
    """Count the triton primitives that run; fail if the other route's primitives do."""
    calls = {"fused": 0, "rows": 0}
    for name in ("fused_row_stats", "fused_jsd_sums", "fused_grad", "row_stats", "jsd_sums", "grad_logits"):
        fn, kind = getattr(triton_backend, name), "fused" if name.startswith("fused") else "rows"

        def wrapped(*a, _fn=fn, _kind=kind, **k):
            calls[_kind] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(triton_backend, name, wrapped)
    return lambda: (calls["fused"] > 0 and calls["rows"] == 0) if route == "kernels" else \
        (calls["rows"] > 0 and calls["fused"] == 0)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("route", ["kernels", "chunked"])
@pytest.mark.parametrize("div,reduction", [("reverse_kl", "mean"), ("jsd", "none")])
def test_triton_routes_equal_torch_distill(monkeypatch, route, div, reduction):
    monkeypatch.setenv(_route.ENV, route)
    took = _spy(monkeypatch, route)
    hs, ws, _ = _model(11, 390, 40)
    ht, wt, _ = _model(11, 390, 24)
    res = helpers.run_impls(lambda hs, ws, ht, wt, impl: ok.fused_linear_distill_loss(
        hs, ws, ht, wt, divergence=div, reduction=reduction, temperature=0.8, chunk_size=4, impl=impl),
        [hs, ws, ht, wt], [0, 1], ("torch", "triton"))
    helpers.assert_impls_agree(res, "triton")
    assert took()


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("route", ["kernels", "chunked"])
def test_triton_routes_equal_torch_logprobs_and_gopd(monkeypatch, route):
    monkeypatch.setenv(_route.ENV, route)
    took = _spy(monkeypatch, route)
    h, w, b = _model(12, 450, 32, bias=True)
    y = torch.randint(0, 450, (12,), device=helpers.DEV)
    helpers.assert_impls_agree(helpers.run_impls(
        lambda h, w, b, impl: ok.fused_linear_token_logprobs(h, w, y, bias=b, return_entropy=True, chunk_size=5,
                                                             impl=impl), [h, w, b], [0, 1, 2], ("torch", "triton")),
        "triton")
    S, T, R = _model(10, 333, 32), _model(10, 333, 16), _model(10, 333, 16)
    helpers.assert_impls_agree(helpers.run_impls(
        lambda hs, ws, ht, wt, hr, wr, impl: ok.fused_linear_gopd_loss(hs, ws, ht, wt, hr, wr, reward_scale=1.5,
                                                                       impl=impl),
        [S[0], S[1], T[0], T[1], R[0], R[1]], [0, 1], ("torch", "triton")), "triton")
    assert took()


@needs_triton
def test_bad_route_env_through_the_op(monkeypatch):
    monkeypatch.setenv(_route.ENV, "fast")
    h, w, _ = _model(4, 50, 8)
    with pytest.raises(ValueError, match="OPD_FUSED_LINEAR"):
        ok.fused_linear_token_logprobs(h, w, torch.zeros(4, dtype=torch.long), impl="triton")


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_chunked_route_allocates_no_NxV(monkeypatch):
    """Every aten op of the chunk loop (with triton's row kernels, interpreted) outputs at most one
    fp32 ``[chunk, V]`` buffer's worth of bytes, never ``[N, V]``."""
    from helpers import output_bytes
    monkeypatch.setenv(_route.ENV, "chunked")
    N, V, d, chunk = 96, 300, 8, 16
    hs, ws, _ = _model(N, V, d)
    ht, wt, _ = _model(N, V, d)
    models = (hs, ws, None, ht, wt, None, None, None, None)
    g = torch.full((N, 2), 1.0 / N)
    spec = RowSpec("jsd", 1.0, beta=0.3, impl="triton", chunk=chunk)
    sizes = output_bytes(lambda: _fused.fl_loss_with_grads(triton_backend, models, None, g, spec, [True, True, False]))
    assert max(sizes) == chunk * V * 4 < N * V * 4  # (the interpreter copies storages as bytes)
