"""The GEMM side of the fused-linear chunk loop: row chunks, the logits of a chunk written into
buffers reused by every chunk of a call, and the gradient GEMMs ``dh = ds W``, ``dW += ds^T h``
with fp32 accumulation.

``prepared`` is three ``(h, W, b)`` triples (student, teacher, reference; ``h`` None where a
model is absent) with ``W`` in its compute dtype (``prepared``). A chunk's logits go into a
workspace (``workspace``: one ``[rows, V]`` buffer per model, allocated once per call) through
``mm(..., out=)``: on a CPU a fresh buffer per chunk pays its first-touch page faults on every
chunk (``h @ W.T`` at N=2048, V=32000, d=256: 283 ms into a fresh buffer, 200 ms into one
already touched, 2-core EPYC); on CUDA the caching allocator made reuse free anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._chunks import fused_row_ranges
from ._common import acc_dtype
from ._spec import RowSpec


def compute_dtype(w: Tensor) -> torch.dtype:
    """The GEMM dtype of a weight: its own, except bf16/fp16 on CPU (no fast GEMM there) -> fp32."""
    return w.dtype if w.dtype in (torch.float32, torch.float64) or w.device.type != "cpu" else torch.float32


def compute_weight(w: Optional[Tensor]) -> Optional[Tensor]:
    """Weight in its compute dtype, converted once per call."""
    return None if w is None else w.to(compute_dtype(w))


def prepared(models):
    """Three ``(h, W, b)`` triples with ``W`` in its compute dtype."""
    return [(models[k], compute_weight(models[k + 1]), models[k + 2]) for k in (0, 3, 6)]


def workspace(prepared, ranges) -> list:
    """One ``[rows, V]`` logits buffer per present model (None where absent), in its GEMM dtype,
    rows = the largest chunk: every chunk of the call writes its logits there."""
    rows = max((j - i for i, j in ranges), default=0)
    return [None if h is None else h.new_empty(rows, w.shape[0], dtype=w.dtype) for h, w, _ in prepared]


def plan(models, spec: RowSpec):
    """``(prepared, ranges, workspace)`` of one call of the chunk loop."""
    prep = prepared(models)
    rng = ranges(models, spec)
    return prep, rng, workspace(prep, rng)


def chunk_logits(prepared, i, j, bufs):
    """Logits of rows ``i:j`` for each prepared model (None where a model is absent), written into
    the first ``j - i`` rows of ``bufs`` (``workspace``), in the GEMM dtype: bf16/fp16 on CUDA -- the
    row kernels read them and do fp32 math, and a bf16 GEMM rounds its output to bf16 anyway, so an
    fp32 copy would only add memory and traffic -- and fp32/fp64 on CPU. The bias is added inside
    the GEMM (``addmm``: one rounding)."""
    out = []
    for (h, w, b), buf in zip(prepared, bufs):
        if h is None:
            out.append(None)
            continue
        x, o = h[i:j].to(w.dtype), buf[: j - i]
        out.append(torch.mm(x, w.T, out=o) if b is None else torch.addmm(b.to(w.dtype), x, w.T, out=o))
    return out


def ranges(models, spec: RowSpec):
    """Row chunks: every live ``[c, V]`` logits buffer together within the device's budget
    (``_chunks.fused_row_ranges``; ``chunk_size=`` overrides)."""
    sizes = [compute_dtype(models[k + 1]).itemsize for k in (0, 3, 6) if models[k] is not None]
    return fused_row_ranges(models[0].shape[0], models[1].shape[0], sizes, models[1].device, spec.chunk)


def grad_buffers(models, need, overwrite: bool = False):
    """(dh, dW, db) accumulators in the accumulation dtype (None where not needed): zeroed, or
    uninitialized when ``overwrite`` (the chunk loop writes every row of dh, and its first chunk
    passes ``first=True`` to ``accumulate_grads``, which then overwrites dW and db)."""
    hs, ws = models[:2]
    acc = acc_dtype(ws)
    new = hs.new_empty if overwrite and hs.shape[0] > 0 else hs.new_zeros
    dh = new(hs.shape, dtype=acc) if need[0] else None
    dw = new(ws.shape, dtype=acc) if need[1] else None
    db = new(ws.shape[:1], dtype=acc) if need[2] else None
    return dh, dw, db


_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# torch.mm / torch.addmm(out_dtype=torch.float32) exist on CUDA since torch 2.8; an fp32 ``self``
# (the accumulator) next to bf16/fp16 operands is accepted in the versions Liger-Kernel reports
# using it with (2.12; PR linkedin/Liger-Kernel#1239). They raise on CPU.
_FP32_OUT_GEMM = _TORCH >= (2, 12)


def gemm_mode(w: Tensor, acc: torch.dtype) -> str:
    """How ``accumulate_grads`` forms ``dh``/``dW`` in ``acc`` from GEMMs in ``w``'s dtype, chosen
    by device, dtypes and torch version (never by catching an exception):

    * ``"same"``: ``w`` is already in ``acc`` (CPU always, where weights are converted to fp32;
      CUDA fp32/fp64): ``mm(out=)`` / ``addmm_``.
    * ``"out_dtype"``: CUDA bf16/fp16 with torch >= 2.12: cuBLAS accumulates in fp32 and writes
      fp32 straight into the accumulators (``mm(..., out_dtype=fp32, out=)``, ``addmm(dW, ...,
      out_dtype=fp32, out=dW)``): no ``[V, d]`` temporary, one rounding.
    * ``"cast"``: anything else (older torch, other accelerators): the product in ``w``'s dtype,
      then added in ``acc`` (a ``[V, d]`` temporary per chunk)."""
    if w.dtype == acc:
        return "same"
    if w.device.type == "cuda" and w.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32 \
            and _FP32_OUT_GEMM:
        return "out_dtype"
    return "cast"


def accumulate_grads(gs, h, w, i, j, bufs, first: bool = False):
    """dh[i:j] = gs @ W; dW += gs^T h; db += sum(gs) for one chunk of logit gradients ``gs``
    (``first``: overwrite dW and db instead of adding, i.e. no zero-fill and no read of them)."""
    dh, dw, db = bufs
    if db is not None:
        part = gs.sum(0, dtype=db.dtype)
        db.copy_(part) if first else db.add_(part)
    gs = gs.to(w.dtype)  # GEMMs in the weight's dtype (bf16 on GPU), accumulated in fp32
    mode = gemm_mode(w, (dh if dh is not None else dw if dw is not None else gs).dtype)
    if dh is not None:
        if mode == "out_dtype":
            torch.mm(gs, w, out_dtype=dh.dtype, out=dh[i:j])
        elif mode == "same":
            torch.mm(gs, w, out=dh[i:j])
        else:
            dh[i:j] = gs @ w
    if dw is not None:
        hc = h[i:j].to(w.dtype)
        if mode == "out_dtype":
            if first:
                torch.mm(gs.T, hc, out_dtype=dw.dtype, out=dw)
            else:
                torch.addmm(dw, gs.T, hc, out_dtype=dw.dtype, out=dw)
        elif mode == "same":
            torch.mm(gs.T, hc, out=dw) if first else dw.addmm_(gs.T, hc)
        else:
            dw.copy_(gs.T @ hc) if first else dw.add_(gs.T @ hc)
