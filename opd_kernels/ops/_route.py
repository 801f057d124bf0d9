"""Which fused-linear path runs: the fused ``tl.dot`` kernels or the chunked cuBLAS path.

The rule is ``use_fused_kernels(N, V, d, dtype, device)``, rule 2 of the one decision
(``ops/_decide.py: decide``): the fused kernels only where a
FLOP/byte MODEL (below; derivation and numbers in docs/design.md, "GPU fused-linear path:
FLOP/byte model") predicts them faster than the chunk loop. It is a model, not a measurement:
its constants are H100/H200 figures (790 TFLOP/s, a measured dense bf16 cuBLAS rate on GH100;
3.35 / 4.8 TB/s from the spec sheets) plus estimates marked as such. Where a constant is uncertain
it is set in the fused kernels' favour (their ``tl.dot`` at cuBLAS's rate, their operand re-reads
not counted), so a "chunked" decision is robust to it. ``OPD_FUSED_LINEAR=kernels|chunked|auto``
(read per call) overrides the rule, for measuring both paths on a GPU; it only chooses among the
paths a backend has (torch and cuda have no fused kernels and always run the chunk loop).

Per logit element of the ``N x V`` problem, with bf16 (``e = 2`` bytes) and ``m`` models:

* chunked: ``m + 2`` GEMM passes (``m`` logits, ``dh``, ``dW``) at the dense rate; row-kernel
  memory passes of ``e (2m + 1)`` bytes (stats read ``m e``, the gradient reads ``m e`` and writes
  ``e`` in place; JSD reads ``2e`` more); each chunk's ``dW`` GEMM also reads and writes the fp32
  accumulator (``8 V d`` bytes, ``4 V d`` for the first chunk); ``OPS_PER_CHUNK`` launches per chunk.
* kernels: ``2m + 2`` GEMM passes (forward, then ``dh`` and ``dW`` kernels that each recompute the
  logits; JSD +2); the ``dh``/``dW`` kernels read-modify-write their fp32 accumulators once per
  tile: ``8 N d ceil(V / BLOCK_V) + 8 V d ceil(N / BLOCK_N)`` bytes; the ``dh`` kernel has only
  ``ceil(N / BLOCK_N)`` programs (a partial wave when N is small).

Each kernel/GEMM costs ``max(flops / rate, bytes / bandwidth)`` (roofline), plus launches.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

ROUTES = ("auto", "kernels", "chunked")
ENV = "OPD_FUSED_LINEAR"


@dataclass(frozen=True)
class Machine:
    """Model constants of one GPU."""
    name: str
    flops_16: float     # dense bf16/fp16 tensor-core FLOP/s (790e12: a measured cuBLAS bf16 rate on GH100)
    flops_32: float     # fp32 FLOP/s without TF32 (estimate: ~75% of the 67 TFLOP/s H100 SXM spec)
    bandwidth: float    # HBM bytes/s (H100 SXM 3.35e12, H200 4.8e12: spec sheets)
    sms: int            # streaming multiprocessors (132 on both)
    launch_s: float     # per launched kernel/op, host + ramp (estimate: 5 us, eager PyTorch)


H100 = Machine("H100", 790e12, 50e12, 3.35e12, 132, 5e-6)
H200 = Machine("H200", 790e12, 50e12, 4.8e12, 132, 5e-6)  # same GH100 compute (rate assumed = H100's)

# Launches (aten ops that are not views + Triton kernels), counted on CPU under the interpreter
# with a TorchDispatchMode for 2 models and one vocabulary split (a GPU adds the split-merge ops
# to both paths alike) in ``fl_loss_with_grads``:
# kernels: 24 per call (31 with JSD); chunked: 4 + 27 per chunk (4 + 34 with JSD).
OPS_KERNELS, OPS_CHUNKED_FIXED, OPS_PER_CHUNK, OPS_JSD = 24, 4, 27, 7


@dataclass(frozen=True)
class Cost:
    """Predicted seconds of one fwd+bwd: GEMM/kernel time (roofline), row-kernel memory passes,
    launches, and their sum."""
    compute: float
    memory: float
    launches: float

    @property
    def total(self) -> float:
        return self.compute + self.memory + self.launches


def _rate(m: Machine, itemsize: int) -> float:
    return m.flops_16 if itemsize <= 2 else m.flops_32


def _gemm(m: Machine, e: int, M: int, N: int, K: int, c_bytes: float) -> float:
    """Roofline seconds of an ``[M, K] x [K, N]`` GEMM whose output/accumulator moves ``c_bytes``."""
    return max(2.0 * M * N * K / _rate(m, e), ((M * K + K * N) * e + c_bytes) / m.bandwidth)


def chunked_cost(N: int, V: int, dims, itemsize: int, m: Machine, rows: int, *, jsd=False) -> Cost:
    """The chunk loop of ``_fused.fl_loss_with_grads``: ``rows`` per chunk; ``dims`` the hidden
    size of each model, student first."""
    e, d1, n_models = itemsize, dims[0], len(dims)
    row_bytes = e * (2 * n_models + 1 + (2 if jsd else 0))
    compute = memory = 0.0
    n_chunks = max(1, math.ceil(N / rows))
    for k in range(n_chunks):
        c = min(rows, N - k * rows)
        compute += sum(_gemm(m, e, c, V, d, c * V * e) for d in dims)  # logits written by the GEMM
        compute += _gemm(m, e, c, d1, V, 4 * c * d1)                   # dh = ds W, fp32 out
        compute += _gemm(m, e, V, d1, c, (4 if k == 0 else 8) * V * d1)  # dW (+)= ds^T h, fp32
        memory += c * V * row_bytes / m.bandwidth
    ops = OPS_CHUNKED_FIXED + n_chunks * (OPS_PER_CHUNK + (OPS_JSD if jsd else 0))
    return Cost(compute, memory, ops * m.launch_s)


def _wave_use(programs: int, m: Machine) -> float:
    """Fraction of the GPU busy when ``programs`` CTAs run one per SM, in waves."""
    return programs / (math.ceil(programs / m.sms) * m.sms)


def kernels_cost(N: int, V: int, dims, itemsize: int, m: Machine, tiles, *, jsd=False) -> Cost:
    """``fused_row_stats`` (+ ``fused_jsd_sums``) + ``fused_grad`` (dh and dW kernels) with tiles
    ``(BLOCK_N, BLOCK_V)``; the tl.dot rate is taken as cuBLAS's (in the kernels' favour)."""
    bn, bv = tiles
    d1, rate = dims[0], _rate(m, itemsize)
    pass_flops = 2.0 * N * V
    fwd = pass_flops * sum(dims) / rate                      # vocab splits fill the GPU
    if jsd:
        fwd += pass_flops * (dims[0] + dims[1]) / rate
    recompute = pass_flops * (sum(dims) + d1)                # logits again + the dh (or dW) product
    row_blocks, col_blocks = math.ceil(N / bn), math.ceil(V / bv)
    dh = max(recompute / (rate * _wave_use(row_blocks, m)), 8.0 * N * d1 * col_blocks / m.bandwidth)
    dw = max(recompute / (rate * _wave_use(col_blocks, m)), 8.0 * V * d1 * row_blocks / m.bandwidth)
    return Cost(fwd + dh + dw, 0.0, (OPS_KERNELS + (OPS_JSD if jsd else 0)) * m.launch_s)


def machine(device) -> Machine:
    """Model constants for ``device``: H200's on an H200, H100's on any other GPU and for the
    Triton interpreter on CPU (which takes the decision a GPU would)."""
    if device is not None and torch.device(device).type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return H200
    return H100


def route() -> str:
    """``OPD_FUSED_LINEAR`` (default ``auto``), validated."""
    value = os.environ.get(ENV, "auto")
    if value not in ROUTES:
        raise ValueError(f"{ENV} must be one of {ROUTES}, got {value!r}")
    return value


def predict(N: int, V: int, d, dtype: torch.dtype, device=None, *, models: int = 2, jsd: bool = False,
            gpu: Machine | None = None):
    """``(kernels Cost, chunked Cost)`` of one fwd+bwd; ``d`` an int (every model) or one per model;
    ``gpu`` the model constants (default: ``machine(device)``)."""
    from .._chunks import fused_rows_per_chunk
    from ..backends.triton_plan import fused_tiles
    dims = tuple(d) if isinstance(d, (tuple, list)) else (int(d),) * models
    e, m = dtype.itemsize, gpu or machine(device)
    rows = fused_rows_per_chunk(V, [e] * len(dims), torch.device("cuda"))
    return (kernels_cost(N, V, dims, e, m, fused_tiles(N, V, e), jsd=jsd and len(dims) > 1),
            chunked_cost(N, V, dims, e, m, rows, jsd=jsd and len(dims) > 1))


def use_fused_kernels(N: int, V: int, d, dtype: torch.dtype, device=None, *, models: int = 2,
                      jsd: bool = False) -> bool:
    """THE RULE: the fused kernels iff ``OPD_FUSED_LINEAR=kernels``, or ``auto`` and the model
    predicts them faster than the chunk loop for this (N, V, d, dtype, device)."""
    choice = route()
    if choice != "auto":
        return choice == "kernels"
    if N == 0:
        return True  # nothing to compute: one launch-free path either way
    kernels, chunked = predict(N, V, d, dtype, device, models=models, jsd=jsd)
    return kernels.total < chunked.total

