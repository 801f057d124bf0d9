"""Plots of a results.json: per op, time and peak memory vs N (fwd+bwd), providers as lines.

    python benchmarks/plot.py benchmarks/results/cpu-epyc-2c     # re-render from results.json
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ("naive", "naive_compile", "torch", "triton", "cuda", "liger_chunked", "liger", "cce", "trl")


def plot_all(data: dict, out: Path, pass_: str = "fwd+bwd") -> list[Path]:
    rows = [r for r in data["results"] if r["pass"] == pass_]
    files = []
    for op in dict.fromkeys(r["op"] for r in rows):
        files.append(plot_op(op, [r for r in rows if r["op"] == op], data["meta"], Path(out), pass_))
    return files


def plot_op(op, rows, meta, out: Path, pass_) -> Path:
    divs = list(dict.fromkeys(r["divergence"] for r in rows))
    # one (V, d) per op: the most common one (the sweep over N)
    V, d = Counter((r["V"], r["d"]) for r in rows).most_common(1)[0][0]
    fig, axes = plt.subplots(len(divs), 2, figsize=(10, 3.2 * len(divs)), squeeze=False)
    for i, div in enumerate(divs):
        for prov in PROVIDER_ORDER:
            pts = sorted((r["N"], r["median_ms"], r["p20_ms"], r["p80_ms"], r["peak_mem_mb"]) for r in rows
                         if r["divergence"] == div and r["provider"] == prov and (r["V"], r["d"]) == (V, d)
                         and r["median_ms"] is not None)  # None: a memory-only case whose timing failed
            if not pts:
                continue
            n, med, lo, hi, mem = zip(*pts)
            axes[i][0].errorbar(n, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                                marker="o", capsize=3, label=prov)
            axes[i][1].plot(n, [max(m, 1e-1) for m in mem], marker="o", label=prov)
        title = f"{div}: " if div else ""
        axes[i][0].set(title=f"{title}time ({pass_})", xlabel="N (tokens)", ylabel="median ms (p20-p80)")
        axes[i][1].set(title=f"{title}peak memory ({pass_})", xlabel="N (tokens)", ylabel="MB beyond inputs")
        for ax in axes[i]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    shape = f"V={V}" + (f", d={d}" if d else "")
    fig.suptitle(f"{op} ({shape}, {rows[0]['dtype']}) on {meta['device']}\n"
                 f"torch {meta['torch']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    path = out / f"plot_{op}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    d = Path(sys.argv[1])
    for p in plot_all(json.loads((d / "results.json").read_text()), d):
        print(p)
