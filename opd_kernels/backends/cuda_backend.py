"""CUDA backend: the hand-written kernels of the ``opd_kernels._C`` extension (``csrc/``).

The extension is optional and loaded lazily, here only: importing ``opd_kernels`` never touches
it, so a CPU-only torch keeps working when a ``_C`` built against a CUDA torch lies next to it.
``available()`` says why the backend cannot be used ("CUDA extension not built ...",
"no CUDA device"). The kernels are registered as ``torch.ops.opd_kernels_C.*`` (schemas in
``csrc/bindings.cpp``); their fake (meta) impls are registered once below, so the ops trace
under ``torch.compile``.

Inputs are fp32/bf16/fp16 with fp32 math. float64 logits raise ``ValueError``: the ops send
float64 (the precision oracle) to the torch backend, a rule of ``ops/_decide.py``. A reference ``r`` whose dtype
differs from the teacher's is cast to it (the kernels read t and r with one element type).

Logit transforms (``tf_s``/``tf_t``/``tf_r``) are checked here (``ValueError`` naming the argument,
as the other backends) and passed to the ops as ``s_scale, s_cap, t_scale, ...`` floats (schema
defaults: the identity); ``csrc/ops.cpp`` checks them again (``TORCH_CHECK``).
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from . import IDENTITY, N_STATS, check_transform
from . import torch_backend as _torch

NAME = "cuda"
BUILD_HINT = ("build with: pip install --no-build-isolation -e . on a machine with a CUDA torch "
              "and nvcc, or OPD_FORCE_BUILD=1")

_state: dict = {}


def _load():
    """(module or None, reason). Imports ``opd_kernels._C`` and registers the fakes, once."""
    if "result" in _state:
        return _state["result"]
    if torch.version.cuda is None:
        result = (None, f"CUDA extension not built: this torch ({torch.__version__}) is a CPU build")
    elif importlib.util.find_spec("opd_kernels._C") is None:
        result = (None, f"CUDA extension not built ({BUILD_HINT})")
    else:
        try:
            mod = importlib.import_module("opd_kernels._C")
            _register_fakes()
            result = (mod, "")
        except Exception as exc:  # noqa: BLE001 - e.g. built against another torch
            result = (None, f"CUDA extension failed to load ({type(exc).__name__}: {exc}); rebuild it "
                            f"against this torch ({BUILD_HINT})")
    _state["result"] = result
    return result


def available():
    mod, reason = _load()
    if mod is None:
        return False, reason
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def _register_fakes():
    """Shape/dtype-only impls so torch.compile can trace the ops without running them."""
    lib = "opd_kernels_C"

    @torch.library.register_fake(f"{lib}::row_stats")
    def _(s, t, r, targets, inv_temp, lam, vocab_start, s_scale=1.0, s_cap=0.0, t_scale=1.0, t_cap=0.0,
          r_scale=1.0, r_cap=0.0):
        return s.new_empty((s.shape[0], N_STATS), dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::jsd_sums")
    def _(s, t, AB, inv_temp, beta, s_scale=1.0, s_cap=0.0, t_scale=1.0, t_cap=0.0):
        return s.new_empty((s.shape[0], 2), dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::grad_logits")
    def _(s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, with_entropy,
          s_scale=1.0, s_cap=0.0, t_scale=1.0, t_cap=0.0, r_scale=1.0, r_cap=0.0):
        return torch.empty_like(s, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{lib}::grad_logits_out")
    def _(out, s, t, r, targets, rs, g, kind, inv_temp, lam, beta, vocab_start, with_entropy,
          s_scale=1.0, s_cap=0.0, t_scale=1.0, t_cap=0.0, r_scale=1.0, r_cap=0.0):
        return None


def _no_float64(*xs) -> None:
    if any(x is not None and x.dtype == torch.float64 for x in xs):
        raise ValueError("cuda backend: no float64 kernels (the ops run float64 on the torch backend, "
                         "ops/_decide.py); call the torch backend for float64")


def _ops():
    mod, reason = _load()
    if mod is None:
        raise RuntimeError(f"opd_kernels cuda backend unavailable: {reason}")
    return torch.ops.opd_kernels_C


def _reference_as_teacher_dtype(t, r):
    return r if r is None or t is None or r.dtype == t.dtype else r.to(t.dtype)


def _int64_targets(targets):
    return targets if targets is None or targets.dtype == torch.int64 else targets.long()


def _transform_floats(**tfs):
    """(x_scale, x_cap, ...) floats of the named transforms, checked (ValueError names the argument)."""
    return tuple(v for name, tf in tfs.items() for v in check_transform(tf, name))


def row_stats(s, t, r, targets, *, inv_temp, lam=1.0, vocab_start=0, tf_s=IDENTITY, tf_t=IDENTITY,
              tf_r=IDENTITY):
    tf = _transform_floats(tf_s=tf_s, tf_t=tf_t, tf_r=tf_r)
    _no_float64(s, t, r)
    return _ops().row_stats(s, t, _reference_as_teacher_dtype(t, r), _int64_targets(targets), float(inv_temp),
                            float(lam), int(vocab_start), *tf)


def jsd_sums(s, t, AB, *, inv_temp, beta, tf_s=IDENTITY, tf_t=IDENTITY):
    tf = _transform_floats(tf_s=tf_s, tf_t=tf_t)
    _no_float64(s, t)
    return _ops().jsd_sums(s, t, AB.float(), float(inv_temp), float(beta), *tf)


def grad_logits(s, t, r, targets, rs, g, *, kind, inv_temp, lam=1.0, beta=0.5, vocab_start=0,
                out=None, with_entropy=False, tf_s=IDENTITY, tf_t=IDENTITY, tf_r=IDENTITY):
    tf = _transform_floats(tf_s=tf_s, tf_t=tf_t, tf_r=tf_r)
    _no_float64(s, t, r)
    if out is not None and out.dtype != s.dtype:  # an output of another dtype: the torch backend writes it
        return _torch.grad_logits(s, t, r, targets, rs, g, kind=kind, inv_temp=inv_temp, lam=lam,
                                  beta=beta, vocab_start=vocab_start, out=out, with_entropy=with_entropy,
                                  tf_s=tf_s, tf_t=tf_t, tf_r=tf_r)
    args = (s, t, _reference_as_teacher_dtype(t, r), _int64_targets(targets), rs.float(), g.float(), kind,
            float(inv_temp), float(lam), float(beta), int(vocab_start), bool(with_entropy), *tf)
    if out is None:
        return _ops().grad_logits(*args)
    _ops().grad_logits_out(out, *args)
    return out
