"""Markdown table of a results.json: fwd+bwd time and peak memory per op and provider.

    python benchmarks/table.py benchmarks/results/cpu-epyc-2c [--pass fwd+bwd]
    python benchmarks/table.py benchmarks/results/cpu-epyc-2c --readme README.md   # rewrite its table

``--readme`` replaces what lies between ``<!-- bench-table: DIR -->`` and
``<!-- bench-table: end -->`` with the rendered table, so the README shows exactly what the
committed run produced (``tests/test_readme.py`` checks that they agree).

One row per (op, divergence) at the sweep's largest N of the main (V, d), plus larger shapes
measured for one divergence only (the ratio check); one column pair (median ms, peak MB beyond inputs) per provider measured.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from plot import PROVIDER_ORDER


def render(data: dict, pass_: str = "fwd+bwd") -> str:
    rows = [r for r in data["results"] if r["pass"] == pass_]
    provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rows)]
    by = {(r["op"], r["divergence"], r["N"], r["V"], r["d"], r["provider"]): r for r in rows}
    keys = []
    for op in dict.fromkeys(r["op"] for r in rows):
        ops = [r for r in rows if r["op"] == op]
        V, d = Counter((r["V"], r["d"]) for r in ops).most_common(1)[0][0]
        divs = list(dict.fromkeys(r["divergence"] for r in ops))
        Ns = {div: {r["N"] for r in ops if r["divergence"] == div and (r["V"], r["d"]) == (V, d)} for div in divs}
        shared = set.intersection(*Ns.values())
        width = {n: len({r["provider"] for r in ops if r["N"] == n and (r["V"], r["d"]) == (V, d)}) for n in shared}
        # the sweep's largest N shared by all divergences and measured by the most providers
        top = max(n for n in shared if width[n] == max(width.values()))
        for div in divs:
            keys += [(op, div, n, V, d) for n in sorted(Ns[div]) if n >= top]  # + extra shapes (ratio check)
    m = data["meta"]
    head = [f"Device: {m['device']}; torch {m['torch']}; {m['date'][:10]}; {pass_}, "
            f"{rows[0]['dtype'] if rows else ''}; median ms (p20-p80) / peak MB beyond the inputs.", ""]
    floor = any(r.get("floor_ms") is not None for r in rows)
    cols = ["op", "divergence", "N", "V", "d"] + [f"{p} ms" for p in provs] + [f"{p} MB" for p in provs]
    cols += ["GEMM floor ms", "torch x floor"] if floor else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for op, div, N, V, d in keys:
        cells = [op, div or "-", str(N), str(V), str(d) if d else "-"]
        for p in provs:
            r = by.get((op, div, N, V, d, p))
            timed = r and r["median_ms"] is not None
            cells.append(f"{r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f})" if timed else "n/a")
        for p in provs:
            r = by.get((op, div, N, V, d, p))
            cells.append(f"{r['peak_mem_mb']:.0f}" if r else "n/a")
        if floor:
            r = by.get((op, div, N, V, d, "torch")) or next((by[k] for k in by if k[:5] == (op, div, N, V, d)), None)
            cells.append(f"{r['floor_ms']:.0f}" if r and r.get("floor_ms") is not None else "-")
            r = by.get((op, div, N, V, d, "torch"))
            cells.append(f"{r['floor_multiple']:.2f}" if r and r.get("floor_multiple") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    rc = m.get("ratio_check")
    if rc:
        lines += ["", f"Ratio check (fused_linear_distill_loss, reverse_kl, fwd+bwd, N={rc['N']} V={rc['V']} "
                      f"d={rc['d']}): torch/naive peak memory {rc['mem_ratio']:.3f} (target <= 0.25), "
                      f"time {rc['time_ratio']:.2f}x (target <= 1.5x): {'pass' if rc['passed'] else 'FAIL'}."]
    lines += _targets(m.get("targets")) + _first_calls(m.get("first_call"))
    skipped = sorted({(s["provider"], s["reason"]) for s in data.get("skipped", [])
                      if not s["reason"].startswith("failed")})
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{p}: {why}" for p, why in dict(skipped).items()) + "."]
    return "\n".join(head + lines)


def _targets(ts) -> list[str]:
    """The project's targets (``meta.targets``), one line each."""
    if not ts:
        return []
    out = ["", "Targets (fwd+bwd, ours = `torch`):", ""]
    for t in ts:
        name, shape = f"{t['op']} {t['divergence'] or '-'}", f"N={t['N']}"
        if t["kind"] == "vs_fastest_peer":
            out.append(f"- {name}, {shape}: vs fastest peer `{t['peer']}` time {t['time_ratio']:.2f}x, peak memory "
                       f"{t['mem_ratio']:.2f}x (target <= 1.0x): {'pass' if t['passed'] else 'short'}")
        elif t["kind"] == "gemm_floor":
            verdict = "no target" if t["target"] is None else \
                f"target <= {t['target']}x: {'pass' if t['passed'] else 'short'}"
            out.append(f"- {name}, {shape}: {t['floor_multiple']:.2f}x the GEMM floor ({t['gemm_passes']} passes, "
                       f"{t['floor_ms']:.0f} ms; {verdict})")
        else:
            out.append(f"- {name}, {shape}: vs `{t.get('baseline', 'naive')}` time {t['time_ratio']:.2f}x (target <= 1.0x): "
                       f"{'pass' if t['passed'] else 'short'}")
    return out


def _first_calls(fc) -> list[str]:
    """First calls in a fresh process (``meta.first_call``), ours and every peer alike: the first
    tiny call (64 rows: a compiled provider's compile, a JIT) and the first step at the smallest
    measured N (ours compiles its chunk math there, above ``OPD_COMPILE_MIN_ELEMENTS``), each
    beside the steady median at that N."""
    rows = [f for f in fc or [] if not f["provider"].startswith("naive") or f["provider"] == "naive_compile"]
    if not rows:
        return []
    lines = ["", "First calls in a fresh process (compile and JIT included), fwd+bwd, s:", "",
             "| op | divergence | provider | first call (64 rows) | first step (N) | steady median (N) |",
             "|---|---|---|---|---|---|"]
    for f in sorted(rows, key=lambda f: (f["op"], f["divergence"] or "", _order(f["provider"]))):
        step = f.get("first_step_ms")
        lines.append(f"| {f['op']} | {f['divergence'] or '-'} | {f['provider']} | {f['first_call_ms'] / 1e3:.1f} | "
                     f"{'-' if step is None else f'{step / 1e3:.1f}'} ({f['N']}) | {f['steady_ms'] / 1e3:.2f} ({f['N']}) |")
    return lines


def _order(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def readme_blocks(text: str, tag: str = "bench-table") -> list[tuple[str, str]]:
    """``(name, body)`` of every ``<!-- TAG: NAME -->`` ... ``<!-- TAG: end -->`` block of a README."""
    out, end = [], f"<!-- {tag}: end -->"
    for part in text.split(f"<!-- {tag}: ")[1:]:
        head, _, rest = part.partition(" -->\n")
        if head != "end":
            out.append((head, rest.split(end)[0].strip()))
    return out


def update_readme(readme: Path, run_dir: str, table: str, tag: str = "bench-table") -> None:
    """Replace the body of README's existing ``<!-- TAG: run_dir -->`` ... ``<!-- TAG: end -->`` block."""
    start, end = f"<!-- {tag}: {run_dir} -->\n", f"<!-- {tag}: end -->"
    text = readme.read_text()
    if start not in text or end not in text.split(start, 1)[1]:
        raise SystemExit(f"{readme}: no block '{start.strip()} ... {end}' to replace")
    before, rest = text.split(start, 1)
    readme.write_text(before + start + table + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--pass", dest="pass_", default="fwd+bwd")
    ap.add_argument("--readme", type=Path, help="rewrite the table block for DIR in this markdown file")
    a = ap.parse_args()
    table = render(json.loads((a.dir / "results.json").read_text()), a.pass_)
    if a.readme:
        update_readme(a.readme, a.dir.as_posix().rstrip("/"), table)
    else:
        print(table)
