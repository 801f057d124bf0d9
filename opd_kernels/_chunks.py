"""Row-chunk sizing, the one place: how many rows of a ``[rows, width]`` fp32 buffer fit the
transient-memory budget ``OPD_CHUNK_BYTES`` (default 64 MB, read at import; tests patch
``CHUNK_BYTES`` here). Used by the torch backend's row loops, the fused-linear chunk loop of the
ops and the sparse top-k gather."""
from __future__ import annotations

import os

CHUNK_BYTES = int(os.environ.get("OPD_CHUNK_BYTES", 64 * 2**20))


def rows_per_chunk(width: int, bytes_per_elem: int = 4, budget: int | None = None) -> int:
    """Rows whose ``[rows, width]`` buffer fits the chunk budget (at least 1)."""
    return max(1, (budget or CHUNK_BYTES) // max(1, width * bytes_per_elem))


def row_ranges(N: int, width: int, rows: int = 0) -> list[tuple[int, int]]:
    """``[(i, j), ...]`` covering ``0..N``; ``rows > 0`` overrides the budgeted chunk size."""
    step = rows if rows > 0 else rows_per_chunk(width)
    return [(i, min(N, i + step)) for i in range(0, N, step)]
