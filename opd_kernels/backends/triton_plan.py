"""What a Triton launcher plans: tile heuristics (block sizes, warps, stages, vocabulary
splits), and the ``Launch`` / ``Plan`` values its ``plan_*`` functions return.

Pure Python (no triton, no torch), so that the launchers (``backends/triton_backend.py``), the
AOT check (``triton/aot.py``) and the routing model (``ops/_route.py``: the fused backward's
accumulator traffic scales with ``1/BLOCK_N + 1/BLOCK_V``) read the same numbers, with or without
triton.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, **options)``.

    ``constexprs`` are the code-changing flags and block sizes, ``options`` ``num_warps`` (and
    ``num_stages`` for the fused kernels). ``autotuned`` (``OPD_TRITON_AUTOTUNE=1``) is the
    kernel's autotuned twin, launched instead with the grid ``grid_for(BLOCK_N, BLOCK_V)`` of
    the config it picks."""
    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict
    options: dict
    autotuned: Optional[Any] = None
    grid_for: Optional[Callable] = None

    def run(self) -> None:
        if self.autotuned is not None:
            flags = {k: v for k, v in self.constexprs.items() if not k.startswith("BLOCK_")}
            self.autotuned[lambda meta: self.grid_for(meta["BLOCK_N"], meta["BLOCK_V"])](*self.args, **flags)
        else:
            self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


@dataclass(frozen=True, eq=False)
class Plan:
    """What one primitive call launches, in order, and the buffers those launches write."""
    launches: tuple
    outputs: tuple = field(default=())

    def run(self) -> tuple:
        for launch in self.launches:
            launch.run()
        return self.outputs


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_k: int = 16
    num_warps: int = 4
    num_stages: int = 2


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``max(1, x)`` (``triton.next_power_of_2``)."""
    return 1 << (max(1, int(x)) - 1).bit_length()


def vocab_splits(row_blocks: int, n_tiles: int, sms: int) -> int:
    """Vocabulary splits (grid axis 1) so that about 2 programs per SM exist when N is small;
    ``sms = 0`` (not a GPU: the interpreter) means one split."""
    if sms <= 0:
        return 1
    return max(1, min(n_tiles, 2 * sms // max(1, row_blocks)))


def logits_config(N: int, V: int, itemsize: int, *, reduction: bool = False,
                  interpreted: bool = False) -> TileConfig:
    """Memory-bound logits-level kernels: one row (or a few, for small V) x a wide vocab tile.

    The row reductions (``reduction``: row_stats, jsd_sums) keep per-row running sums and
    several fp32 temporaries per element: 16 warps for a 4096-element tile (8 elements per
    thread) use ~60 registers instead of ~100-120 at 8 warps (ptxas, sm_80 / sm_90a), i.e. two
    resident CTAs of 16 warps per SM instead of two of 8. The elementwise gradient kernel needs
    few registers (30-85) and keeps 8 warps.
    """
    if interpreted:  # the interpreter's cost is per program and op: few, large tiles
        return TileConfig(block_n=min(16, next_pow2(N)), block_v=min(256, next_pow2(V)))
    block_v = min(next_pow2(V), 4096 if itemsize <= 2 else 2048)
    block_n = max(1, min(next_pow2(N), 4096 // block_v))
    tile = block_n * block_v
    warps = 16 if reduction and tile >= 4096 else 8 if tile >= 2048 else 4
    return TileConfig(block_n, block_v, num_warps=warps)


def fused_tiles(N: int, V: int, itemsize: int, wide: bool = False) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_V)`` of the fused kernels on a GPU (``fused_config``), also read by the
    routing model (``ops/_route.py``)."""
    block_n = max(16, min(64, next_pow2(N)))
    if itemsize <= 2:
        return block_n, max(16, min(128 if wide else 64, next_pow2(V)))
    return min(block_n, 32), max(16, min(64, next_pow2(V)))


def fused_config(N: int, V: int, d: int, itemsize: int, *, wide: bool = False,
                 interpreted: bool = False) -> TileConfig:
    """GEMM-shaped fused kernels: tl.dot tiles (every block dimension >= 16).

    With 16-bit weights the tiles are 64 x 64: the row-stats and gradient kernels keep up to
    three fp32 logits tiles (student, teacher, reference) live with the online-softmax or
    gradient temporaries and the dh/dw accumulator, and at 64 x 128 they sat at 255 registers
    and spilled on sm_80 (``python -m opd_kernels.triton.aot`` shows it). ``wide`` (the JSD
    second pass: no running stats, spill-free at 128, spilling at 64 on sm_80) keeps 64 x 128.
    """
    block_n = max(16, min(64, next_pow2(N)))
    # fp32 weights: FMA dots ("ieee") hold both operand slices in registers; 16-wide K slices
    # spill in 4 of 32 variants (<= 32 B) where 32-wide ones spilled in 13 (up to 160 B)
    block_k = max(16, min(64, next_pow2(d))) if itemsize <= 2 else 16
    if interpreted:
        return TileConfig(block_n, block_v=max(16, min(128, next_pow2(V))),
                          block_k=max(16, min(64, next_pow2(d))))
    bn, bv = fused_tiles(N, V, itemsize, wide)
    if itemsize <= 2:
        return TileConfig(bn, bv, block_k, num_warps=8, num_stages=3)
    return TileConfig(bn, bv, block_k, num_warps=4, num_stages=2)
