"""Row-chunk sizing, the one place. Used by the torch backend's row loops, the fused-linear chunk
loop of the ops and the sparse top-k gather.

Two budgets, read at import (tests patch the module attributes):

* ``CHUNK_BYTES`` (``OPD_CHUNK_BYTES``, default 64 MB): rows of ONE ``[rows, width]`` fp32
  buffer. The CPU fused-linear chunks (at least ``CPU_MIN_ROWS`` rows), the torch backend's own
  temporaries and the top-k gather.
* ``CUDA_CHUNK_BYTES`` (``OPD_CUDA_CHUNK_BYTES``, default 1 GiB): on CUDA, rows of ALL live
  ``[rows, V]`` logits buffers of one fused-linear chunk together (student + teacher (+ reference),
  each in its GEMM dtype, bf16 = 2 bytes/element); the rows are rounded down to a multiple of
  128 (whole cuBLAS tiles) when there are more. Larger chunks cost memory, smaller ones cost
  dW accumulator traffic (``8 V d`` bytes per chunk; docs/design.md, "FLOP/byte model").

``chunk_size=`` (``RowSpec.chunk > 0``) overrides both.
"""
from __future__ import annotations

import os

import torch

CHUNK_BYTES = int(os.environ.get("OPD_CHUNK_BYTES", 64 * 2**20))
CUDA_CHUNK_BYTES = int(os.environ.get("OPD_CUDA_CHUNK_BYTES", 2**30))
CUDA_ROW_ALIGN = 128
# CPU fused-linear chunks have at least this many rows (fewer if N is smaller), whatever the
# budget: a chunk's GEMMs lose rate below it and each chunk re-reads and re-writes the fp32 dW
# accumulator (8 V d bytes). Measured (2-core EPYC, fp32 reverse KL fwd+bwd, N=1024, V=151936,
# d=896, where the budget gives 110 rows): 8.1 s at 110 rows, 7.0 s at 256, 6.8 s at 512 and
# 6.7 s at 1024.
CPU_MIN_ROWS = 512


def rows_per_chunk(width: int, bytes_per_elem: int = 4, budget: int | None = None) -> int:
    """Rows whose ``[rows, width]`` buffer fits the chunk budget (at least 1)."""
    return max(1, (budget or CHUNK_BYTES) // max(1, width * bytes_per_elem))


def row_ranges(N: int, width: int, rows: int = 0) -> list[tuple[int, int]]:
    """``[(i, j), ...]`` covering ``0..N``; ``rows > 0`` overrides the budgeted chunk size."""
    step = rows if rows > 0 else rows_per_chunk(width)
    return [(i, min(N, i + step)) for i in range(0, N, step)]


def fused_rows_per_chunk(V: int, itemsizes, device: torch.device) -> int:
    """Rows per fused-linear chunk whose logits buffers (one ``[rows, V]`` per model, of the given
    element sizes) fit the budget of ``device``: on CUDA all of them together within
    ``CUDA_CHUNK_BYTES``; elsewhere each fp32 buffer within ``CHUNK_BYTES`` (the CPU computes
    in fp32), but at least ``CPU_MIN_ROWS`` rows."""
    if device.type != "cuda":
        return max(rows_per_chunk(V), CPU_MIN_ROWS)
    rows = rows_per_chunk(V, sum(itemsizes), CUDA_CHUNK_BYTES)
    return rows - rows % CUDA_ROW_ALIGN if rows >= CUDA_ROW_ALIGN else rows


def fused_row_ranges(N: int, V: int, itemsizes, device: torch.device, rows: int = 0) -> list[tuple[int, int]]:
    """Row ranges of the fused-linear chunk loop (``rows > 0`` overrides the budget)."""
    return row_ranges(N, V, rows if rows > 0 else fused_rows_per_chunk(V, itemsizes, device))
