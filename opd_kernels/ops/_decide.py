"""What runs: backend, path and compiled-vs-eager of one call, decided in ONE function, ``decide``.

``decide`` reads top to bottom as the rules, in order (every ``if`` is one rule):

1. backend: ``impl`` ("auto": ``OPD_KERNELS_IMPL``, then the CUDA extension if built and the
   tensors are on CUDA, else Triton on CUDA, else torch; ``_dispatch.resolve`` finds the modules
   and the reason one is unavailable), then: float64 on the cuda backend runs the torch backend
   (the CUDA extension has no float64 kernels; float64 is the precision oracle).
2. path: ``"logits"`` for ``[N, V]`` inputs; for the ops fused with the lm_head, the Triton
   backend's fused ``tl.dot`` kernels (``"fused_kernels"``) or the chunk loop (``"chunked"``,
   every other backend): ``OPD_FUSED_LINEAR=kernels|chunked``, else the FLOP/byte model of
   ``ops/_route.py`` (docs/design.md).
3. compiled: the torch backend's chunk math through ``torch.compile`` (``ops/_compiled.py``)
   for CPU tensors in fp32/bf16/fp16, no process group, at least ``COMPILE_MIN_ELEMENTS`` logits
   in the call, ``OPD_TORCH_COMPILE`` not "0", and not already inside a compiled region.
4. keep: a compiled chunked call of a per-token op whose logit gradient is linear in one upstream
   value per row (kinds ``logprob`` and ``log_normalizer``, no entropy) keeps that gradient for a
   unit upstream, ``[N, V]`` fp32, from forward to backward when it fits ``KEEP_BYTES``:
   backward is then two GEMMs on it (3 GEMM passes in all instead of 4, no logits recomputed),
   at the memory of one ``[N, V]`` fp32 buffer (``ops/_fused.py``, "kept gradient"). Opt-in
   (``OPD_KEEP_BYTES``, default 0): the contract (shared/DESIGN.md) is no ``[N, V]`` buffer.

The public ops ask ``decide`` for the backend before the custom-op boundary (its *name* crosses it,
``backend_name`` keeps it constant under ``torch.compile``); the op bodies ask it once
per call for the rest, with the shapes. ``opd_kernels.explain(...)`` returns the same ``Decision``
for a call described by its sizes (the benchmarks record it).

Environment overrides, all of them (the only ``os.environ`` reads of the package besides the
Triton interpreter switch)::

    variable                  default  read      effect
    OPD_KERNELS_IMPL          auto     per call  backend for impl="auto" (_dispatch.resolve)
    OPD_FUSED_LINEAR          auto     per call  kernels | chunked | auto: fused-linear path on triton (_route.route)
    OPD_TORCH_COMPILE         1        per call  0: never the compiled chunk math
    OPD_COMPILE_MIN_ELEMENTS  2**21    import    logits per call from which the chunk math is compiled
    OPD_CHUNK_BYTES           64 MiB   import    CPU chunk budget: one fp32 [rows, V] buffer (_chunks)
    OPD_KEEP_BYTES            0        import    rule 4: largest [N, V] fp32 gradient kept for backward (0: never)
    OPD_CUDA_CHUNK_BYTES      1 GiB    import    CUDA chunk budget: all logits buffers of a chunk (_chunks)
    OPD_TRITON_AUTOTUNE       0        import    1: autotune the fused Triton kernels (backends/triton_backend.py)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._dispatch import resolve
from ._route import use_fused_kernels

COMPILE_MIN_ELEMENTS = int(os.environ.get("OPD_COMPILE_MIN_ELEMENTS", 2**21))
KEEP_BYTES = int(os.environ.get("OPD_KEEP_BYTES", 0))  # opt-in: the default keeps no [N, V] buffer
KEEP_KINDS = ("logprob", "log_normalizer")  # d main / d logits linear in one upstream value per row
PATHS = ("logits", "fused_kernels", "chunked")


@dataclass(frozen=True)
class Decision:
    """What one call runs."""
    backend: str   # "torch" | "triton" | "cuda"
    path: str      # "logits" ([N, V] given) | "fused_kernels" (Triton tl.dot) | "chunked" (chunk loop)
    compiled: bool  # the torch backend's chunk math through torch.compile
    keep: bool = False  # the per-token op keeps its [N, V] logit gradient for backward (rule 4)

    def __str__(self) -> str:
        return f"{self.backend}/{self.path}{'/compiled' if self.compiled else ''}{'/keep' if self.keep else ''}"


def compile_enabled() -> bool:
    return os.environ.get("OPD_TORCH_COMPILE", "1") != "0"


def decide(impl: str, device, dtype: torch.dtype, *, rows: Optional[int] = None, vocab: Optional[int] = None,
           dims: Optional[Sequence[int]] = None, kind: str = "logprob", entropy: bool = False,
           group=None) -> Decision:
    """The decision for ``impl`` and tensors on ``device`` whose logits are ``dtype`` (float64 if
    any model's are). ``rows x vocab`` logits (None: not known yet, only the backend is decided);
    ``dims``: the hidden size of each model, student first, for the ops fused with the lm_head
    (None: logits given); ``kind``: the backend kind (``jsd`` has a second pass); ``entropy``:
    the entropy is computed too; ``group``: the process group of a vocab-parallel call."""
    device = torch.device(device)
    # 1. backend
    backend = resolve(impl, device).NAME
    if backend == "cuda" and dtype == torch.float64:
        backend = "torch"  # the CUDA extension has no float64 kernels
    # 2. path
    if dims is None:
        path = "logits"
    elif backend != "triton":
        path = "chunked"  # only Triton has fused kernels
    elif rows is not None and use_fused_kernels(rows, vocab, tuple(dims), dtype, device, models=len(dims),
                                                jsd=kind == "jsd"):
        path = "fused_kernels"  # OPD_FUSED_LINEAR=kernels, or the FLOP/byte model says faster
    else:
        path = "chunked"
    # 3. compiled chunk math
    if backend != "torch" or device.type != "cpu" or dtype == torch.float64 or group is not None:
        compiled = False
    elif rows is None or rows * vocab < COMPILE_MIN_ELEMENTS:
        compiled = False  # small calls stay eager: no compile time
    else:
        compiled = compile_enabled() and not torch.compiler.is_compiling()
    # 4. keep the unit-upstream logit gradient for backward
    if path != "chunked" or not compiled or kind not in KEEP_KINDS or entropy:
        keep = False
    else:
        keep = rows * vocab * 4 <= KEEP_BYTES
    return Decision(backend, path, compiled, keep)


def explain(impl: str = "auto", *, rows: int, vocab: int, hidden=None, models: int = 1, kind: str = "logprob",
            entropy: bool = False, dtype: torch.dtype = torch.float32, device="cpu") -> Decision:
    """The ``Decision`` (backend, path, compiled) an op would take for ``rows`` tokens over ``vocab``
    logits in ``dtype`` on ``device``: on logits ``[rows, vocab]``, or with ``hidden`` (an int, or
    one per model) for the ops fused with the lm_head; ``models``: 1 (logprobs), 2 (distillation),
    3 (G-OPD with a reference); ``kind``: ``logprob`` | ``forward_kl`` | ``reverse_kl`` | ``jsd``;
    ``entropy``: the entropy is asked for too."""
    dims = None if hidden is None else tuple(hidden) if isinstance(hidden, (tuple, list)) else (int(hidden),) * models
    return decide(impl, device, dtype, rows=rows, vocab=vocab, dims=dims, kind=kind, entropy=entropy)


def logits_dtype(*tensors) -> torch.dtype:
    """The dtype a call is decided for: float64 when any model's tensor is float64 (the oracle),
    else the first given tensor's."""
    given = [x for x in tensors if x is not None]
    return torch.float64 if any(x.dtype == torch.float64 for x in given) else given[0].dtype


def backend_name(impl: str, device, *tensors) -> str:
    """``decide(...).backend`` for a call on ``tensors``, before the custom-op boundary (whose
    ``RowSpec.impl`` carries it); a constant under ``torch.compile``: once per trace."""
    return _backend_name(impl, torch.device(device).type, logits_dtype(*tensors) == torch.float64)


@torch.compiler.assume_constant_result
def _backend_name(impl: str, device_type: str, float64: bool) -> str:
    return decide(impl, torch.device(device_type), torch.float64 if float64 else torch.float32).backend
