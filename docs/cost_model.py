"""Render the GPU cost-model tables of docs/design.md from ``opd_kernels.ops._route``.

    python docs/cost_model.py           # rewrite the <!-- cost-model: NAME --> blocks in docs/design.md
    python docs/cost_model.py --check   # exit 1 if a block differs from what the model gives

Every number in those blocks comes from ``_route.predict`` (and the constants and chunk/tile
heuristics it uses); none is typed by hand. ``tests/test_design_doc.py`` runs the check.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

from opd_kernels._chunks import fused_rows_per_chunk
from opd_kernels.backends.triton_plan import fused_tiles
from opd_kernels.ops import _route

DESIGN = Path(__file__).resolve().parent / "design.md"
SHAPES = ((8192, 128256, 4096), (16384, 151936, 2048))
BF16 = torch.bfloat16
MACHINES = (_route.H100, _route.H200)
LIGER_JSD_MS = 182.6  # Liger's fused_linear_jsd, H100, N=8192 V=128256 d=4096 (its own benchmark CSV)


def _floor_s(N, V, d, m):
    """Four GEMM passes (student logits, teacher logits, dh, dW) at the dense bf16 rate."""
    return 4 * 2.0 * N * V * d / m.flops_16


def shapes_table() -> str:
    e = BF16.itemsize
    rows = ["| shape | one GEMM pass | floor (4 passes, H100 rate) | chunk rows `c` (chunks) | "
            "fused tiles `BLOCK_N × BLOCK_V` | fused `dh` + `dW` accumulator traffic | chunked `dW` accumulator traffic |",
            "|---|---|---|---|---|---|---|"]
    for N, V, d in SHAPES:
        c = fused_rows_per_chunk(V, [e, e], torch.device("cuda"))
        n_c = math.ceil(N / c)
        bn, bv = fused_tiles(N, V, e)
        dh_gb, dw_gb = 8 * N * d * math.ceil(V / bv) / 1e9, 8 * V * d * math.ceil(N / bn) / 1e9
        pass_flop = 2.0 * N * V * d
        rows.append(f"| N={N}, V={V}, d={d} | {pass_flop / 1e12:.2f} TFLOP, {pass_flop / _route.H100.flops_16 * 1e3:.1f} ms "
                    f"| {_floor_s(N, V, d, _route.H100) * 1e3:.1f} ms | {c} ({n_c}) | {bn} × {bv} "
                    f"| {dh_gb:.0f} + {dw_gb:.0f} GB | {(8 * n_c - 4) * V * d / 1e9:.1f} GB |")
    return "\n".join(rows)


def predictions_table() -> str:
    rows = ["| shape | GPU | loss | floor (4 passes) | chunked: GEMMs + memory passes + launches | chunked / floor "
            "| fused kernels | kernels / chunked | route |",
            "|---|---|---|---|---|---|---|---|---|"]
    for N, V, d in SHAPES:
        first = True
        for m in MACHINES:
            for loss, jsd in (("rKL", False), ("JSD", True)):
                kernels, chunked = _predict(N, V, d, m, jsd=jsd)
                floor = _floor_s(N, V, d, m)
                shape = f"N={N}, V={V}, d={d}" if first else ""
                first = False
                rows.append(
                    f"| {shape} | {m.name} | {loss} | {floor * 1e3:.1f} ms | {chunked.compute * 1e3:.1f} + "
                    f"{chunked.memory * 1e3:.1f} + {chunked.launches * 1e3:.1f} = **{chunked.total * 1e3:.1f} ms** "
                    f"| {chunked.total / floor:.2f}× | {kernels.total * 1e3:.0f} ms | {kernels.total / chunked.total:.1f}× "
                    f"| {'kernels' if kernels.total < chunked.total else 'chunked'} |")
    return "\n".join(rows)


def _predict(N, V, d, m, *, jsd, models=2, dtype=BF16):
    return _route.predict(N, V, d, dtype, models=models, jsd=jsd, gpu=m)


def _largest_kernels_N(V, d, *, jsd=False, models=2, dtype=BF16, top=2 ** 16):
    """Largest power-of-two N up to ``top`` for which the model picks the fused kernels (0: none)."""
    best, N = 0, 1
    while N <= top:
        kernels, chunked = _predict(N, V, d, _route.H100, jsd=jsd, models=models, dtype=dtype)
        if kernels.total < chunked.total:
            best = N
        N *= 2
    return best


def crossover_table() -> str:
    ds = (64, 256, 1024, 4096)
    rows = ["| V | " + " | ".join(f"d = {d}" for d in ds) + " |", "|---" * (len(ds) + 1) + "|"]
    for V in (4096, 32000, 128256):
        cells = []
        for d in ds:
            n = _largest_kernels_N(V, d)
            cells.append("chunked always" if n == 0 else "kernels up to N = 65536 (all tried)" if n == 2 ** 16
                         else f"kernels for N ≤ {n}")
        rows.append(f"| {V} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def largest_d_table() -> str:
    """Largest hidden size (multiple of 8) for which the kernels are chosen at a given N."""
    rows = ["| N | V | rKL bf16 | JSD bf16 | logprob bf16 (1 model) | rKL fp32 |", "|---|---|---|---|---|---|"]
    for N in (1024, 8192):
        for V in (32000, 128256):
            cells = [_largest_d(N, V, jsd=False), _largest_d(N, V, jsd=True), _largest_d(N, V, jsd=False, models=1),
                     _largest_d(N, V, jsd=False, dtype=torch.float32)]
            rows.append(f"| {N} | {V} | " + " | ".join(f"d ≤ {c}" if c else "none" for c in cells) + " |")
    return "\n".join(rows)


def _largest_d(N, V, *, jsd, models=2, dtype=BF16):
    best = 0
    for d in range(8, 513, 8):
        kernels, chunked = _predict(N, V, d, _route.H100, jsd=jsd, models=models, dtype=dtype)
        if kernels.total < chunked.total:
            best = d
    return best


def liger_line() -> str:
    _, chunked = _predict(*SHAPES[0], _route.H100, jsd=True)
    return (f"Predicted chunked JSD at N={SHAPES[0][0]}, V={SHAPES[0][1]}, d={SHAPES[0][2]} on H100: "
            f"{chunked.total * 1e3:.1f} ms, {LIGER_JSD_MS / (chunked.total * 1e3):.1f}× faster than Liger's "
            f"`fused_linear_jsd` ({LIGER_JSD_MS} ms, Liger's own H100 benchmark CSV). A prediction, not a measurement.")


BLOCKS = {"shapes": shapes_table, "predictions": predictions_table, "crossover": crossover_table,
          "largest-d": largest_d_table, "liger": liger_line}


def render(text: str) -> str:
    """``text`` with every ``<!-- cost-model: NAME -->`` block replaced by its rendering."""
    def sub(match):
        return f"<!-- cost-model: {match.group(1)} -->\n{BLOCKS[match.group(1)]()}\n<!-- cost-model: end -->"
    return re.sub(r"<!-- cost-model: ([\w-]+) -->\n.*?<!-- cost-model: end -->", sub, text, flags=re.S)


def main(argv) -> int:
    text = DESIGN.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("docs/design.md's cost-model tables differ from the model: run python docs/cost_model.py")
            return 1
        return 0
    DESIGN.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
