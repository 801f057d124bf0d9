"""The one decision point (``opd_kernels/ops/_decide.py``): its rules, one test each."""
import types

import pytest
import torch

import opd_kernels as ok
from opd_kernels.ops import _decide, _route


def test_logits_on_cpu_run_the_torch_backend_eagerly():
    assert ok.explain(rows=8, vocab=100) == ok.Decision("torch", "logits", False)
    assert str(ok.explain(rows=8, vocab=100)) == "torch/logits"


def test_compiled_from_the_threshold_on_cpu_never_float64(monkeypatch):
    monkeypatch.delenv("OPD_TORCH_COMPILE", raising=False)
    big = _decide.COMPILE_MIN_ELEMENTS
    assert ok.explain(rows=big, vocab=1).compiled
    assert not ok.explain(rows=big - 1, vocab=1).compiled
    assert not ok.explain(rows=big, vocab=1, dtype=torch.float64).compiled
    assert ok.explain(rows=big, vocab=1, hidden=8, models=2, kind="reverse_kl") == ok.Decision("torch", "chunked", True)
    monkeypatch.setenv("OPD_TORCH_COMPILE", "0")
    assert not ok.explain(rows=big, vocab=1).compiled


def test_keep_rule(monkeypatch):
    """Rule 4: compiled chunked per-token logprob / log-normalizer without entropy, within KEEP_BYTES
    (opt-in: 0 by default, so nothing is kept)."""
    monkeypatch.delenv("OPD_TORCH_COMPILE", raising=False)
    rows, vocab = _decide.COMPILE_MIN_ELEMENTS // 4, 4
    assert _decide.KEEP_BYTES == 0 and not ok.explain(rows=rows, vocab=vocab, hidden=8).keep
    monkeypatch.setattr(_decide, "KEEP_BYTES", 2**30)
    assert ok.explain(rows=rows, vocab=vocab, hidden=8) == ok.Decision("torch", "chunked", True, True)
    assert ok.explain(rows=rows, vocab=vocab, hidden=8, kind="log_normalizer").keep
    assert not ok.explain(rows=rows, vocab=vocab, hidden=8, entropy=True).keep  # dH is not linear in one g
    assert not ok.explain(rows=rows, vocab=vocab, hidden=8, models=2, kind="reverse_kl").keep
    assert not ok.explain(rows=rows, vocab=vocab).keep  # logits given: nothing to keep
    assert not ok.explain(rows=rows, vocab=vocab, hidden=8, dtype=torch.float64).keep  # not compiled
    assert not ok.explain(rows=rows - 1, vocab=vocab, hidden=8).keep  # below the compile threshold
    monkeypatch.setattr(_decide, "KEEP_BYTES", rows * vocab * 4 - 1)
    assert not ok.explain(rows=rows, vocab=vocab, hidden=8).keep
    assert str(ok.explain(rows=rows, vocab=vocab * 2, hidden=8, kind="reverse_kl")) == "torch/chunked/compiled"


def test_float64_on_the_cuda_backend_runs_torch(monkeypatch):
    """Rule 1: the CUDA extension has no float64 kernels; the decision says torch (no silent fallback)."""
    monkeypatch.setattr(_decide, "resolve", lambda impl, device: types.SimpleNamespace(NAME="cuda"))
    assert _decide.decide("cuda", "cuda", torch.float64).backend == "torch"
    assert _decide.decide("cuda", "cuda", torch.bfloat16).backend == "cuda"
    assert _decide.decide("cuda", "cuda", torch.bfloat16, rows=4, vocab=8, dims=(16,)).path == "chunked"


def test_triton_fused_path_follows_the_route(monkeypatch):
    monkeypatch.setattr(_decide, "resolve", lambda impl, device: types.SimpleNamespace(NAME="triton"))
    for route, path in (("kernels", "fused_kernels"), ("chunked", "chunked")):
        monkeypatch.setenv(_route.ENV, route)
        run = _decide.decide("triton", "cuda", torch.bfloat16, rows=64, vocab=512, dims=(64, 64), kind="jsd")
        assert run == _decide.Decision("triton", path, False)
    monkeypatch.setenv(_route.ENV, "bogus")
    with pytest.raises(ValueError, match="OPD_FUSED_LINEAR"):
        _decide.decide("triton", "cuda", torch.bfloat16, rows=64, vocab=512, dims=(64,))


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be one of"):
        ok.explain("fast", rows=1, vocab=1)
