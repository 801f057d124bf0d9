"""After a sweep: the GEMM floor of every fused-linear row, first-call (compile) times, and the
issue's targets (pass / short), as stored in ``results.json`` ``meta`` and printed by run.py.
"""
from __future__ import annotations

import torch

import cases
import measure
from cases import PEERS

# Targets the quick run checks (fwd+bwd): ours (impl=torch) / GEMM floor, per fused-linear op
FLOOR_TARGETS = {("fused_linear_distill_loss", "reverse_kl"): 1.2, ("fused_linear_distill_loss", "forward_kl"): 1.2,
                 ("fused_linear_token_logprobs", None): 1.2, ("fused_linear_distill_loss", "jsd"): 1.4}


def add_floor(results, device, dtype_name, log, repeat=10):
    """Measure the dense GEMM rates at each fused shape; add floor_ms, frac_of_floor (floor /
    median) and floor_multiple (median / floor) to its rows.

    floor_ms = gemm_passes x 2*N*V*d flops at the rate of the logits GEMM ``[N,d] @ [d,V]`` in
    the input dtype, measured in this run (``meta.gemm`` also has the two backward shapes' rates).
    """
    dtype = getattr(torch, dtype_name)
    rates = {}
    for r in results:
        if cases.is_fused(r["op"]) and (r["N"], r["V"], r["d"]) not in rates:
            N, V, d = r["N"], r["V"], r["d"]
            rates[N, V, d] = measure.gemm_rates(N, V, d, dtype, device, repeat)
            log(f"dense {dtype_name} GEMM TFLOP/s at N={N} V={V} d={d}: " +
                ", ".join(f"{k} {v:.3g}" for k, v in rates[N, V, d].items()))
    for r in results:
        if (r["N"], r["V"], r["d"]) in rates and cases.is_fused(r["op"]):
            n = cases.gemm_passes(r["op"], r["pass"])
            floor = n * 2.0 * r["N"] * r["V"] * r["d"] / (rates[r["N"], r["V"], r["d"]]["logits"] * 1e12) * 1e3
            r.update(floor_ms=round(floor, 3), gemm_passes=n)
            if r["median_ms"]:
                r.update(frac_of_floor=round(floor / r["median_ms"], 3), floor_multiple=round(r["median_ms"] / floor, 3))
    return [dict(N=N, V=V, d=d, dtype=dtype_name, tflops=round(t["logits"], 3),
                 tflops_dh=round(t["dh"], 3), tflops_dW=round(t["dW"], 3)) for (N, V, d), t in rates.items()]


def first_calls(results) -> list[dict]:
    """Per (op, divergence, provider): the first call's wall time in its process (compile, JIT)."""
    out = {}
    for r in results:
        if r.get("first_call_ms") is not None and r["pass"] == "fwd+bwd":
            out.setdefault((r["op"], r["divergence"], r["provider"]), dict(
                op=r["op"], divergence=r["divergence"], provider=r["provider"], first_call_ms=r["first_call_ms"],
                first_step_ms=r.get("first_step_ms"), steady_ms=r["median_ms"], N=r["N"], V=r["V"], d=r["d"]))
    return list(out.values())


def _timed(results, op, div, prov):
    return {(r["N"], r["V"], r["d"]): r for r in results if (r["op"], r["divergence"], r["provider"], r["pass"])
            == (op, div, prov, "fwd+bwd") and r["median_ms"] is not None}


def targets(results, log) -> list[dict]:
    """The project's targets (fwd+bwd; ../shared/DESIGN.md), each pass / short, at the largest shape measured for both sides.

    * every fused-linear op of ours (``torch``) vs the fastest peer there: time <= 1.0x and peak
      memory <= 1.0x of that peer's;
    * fused-linear ours / GEMM floor: reverse KL, forward KL, token logprobs <= 1.2x, JSD <= 1.4x
      (G-OPD: shown, no target); at the shape of the peer comparison (else ours' largest);
    * logits-level ops: ours / naive time <= 1.0x, against eager ``naive`` and compiled
      ``naive_compile`` each (the record's ``baseline`` names which).
    """
    out = []
    variants = list(dict.fromkeys((r["op"], r["divergence"]) for r in results))
    for op, div in variants:
        ours = _timed(results, op, div, "torch")
        if not ours:
            continue
        name = f"{op} {div or '-'}"
        if cases.is_fused(op):
            peer_rows = {p: _timed(results, op, div, p) for p in PEERS}
            shared = [s for s in ours if any(s in rows for rows in peer_rows.values())]
            shape = max(shared or ours, key=lambda s: (s[0] * s[1], s))
            o = ours[shape]
            if shared:
                best = min((rows[shape] for rows in peer_rows.values() if shape in rows), key=lambda r: r["median_ms"])
                t, mem = o["median_ms"] / best["median_ms"], o["peak_mem_mb"] / max(best["peak_mem_mb"], 1e-9)
                ok = t <= 1.0 and mem <= 1.0
                out.append(dict(kind="vs_fastest_peer", op=op, divergence=div, N=shape[0], V=shape[1], d=shape[2],
                                peer=best["provider"], ours_ms=round(o["median_ms"], 2), peer_ms=round(best["median_ms"], 2),
                                time_ratio=round(t, 3), ours_mb=o["peak_mem_mb"], peer_mb=best["peak_mem_mb"],
                                mem_ratio=round(mem, 3), target=1.0, passed=ok))
                log(f"target {name:40s} N={shape[0]}: torch vs fastest peer {best['provider']}: time "
                    f"{o['median_ms']:.0f}/{best['median_ms']:.0f} ms = {t:.2f}x, peak {o['peak_mem_mb']:.0f}/"
                    f"{best['peak_mem_mb']:.0f} MB = {mem:.2f}x (both <= 1.0x): {'pass' if ok else 'short'}")
            else:
                log(f"target {name:40s}: no peer measured (vs fastest peer: not checked)")
            if o.get("floor_multiple") is not None:
                tgt = FLOOR_TARGETS.get((op, div))
                ok = None if tgt is None else o["floor_multiple"] <= tgt
                out.append(dict(kind="gemm_floor", op=op, divergence=div, N=shape[0], V=shape[1], d=shape[2],
                                ours_ms=round(o["median_ms"], 2), floor_ms=o["floor_ms"], gemm_passes=o["gemm_passes"],
                                floor_multiple=o["floor_multiple"], target=tgt, passed=ok))
                verdict = "no target" if tgt is None else f"<= {tgt}x: {'pass' if ok else 'short'}"
                log(f"target {name:40s} N={shape[0]}: torch / GEMM floor ({o['gemm_passes']} passes, "
                    f"{o['floor_ms']:.0f} ms) = {o['floor_multiple']:.2f}x ({verdict})")
        else:
            out += _vs_naive(results, op, div, ours, log)
    return out


def _vs_naive(results, op, div, ours, log) -> list[dict]:
    """Ours / each naive baseline (eager ``naive``, compiled ``naive_compile``) at their largest shared shape."""
    out = []
    for baseline in ("naive", "naive_compile"):
        naive = _timed(results, op, div, baseline)
        shared = [s for s in ours if s in naive]
        if not shared:
            continue
        shape = max(shared, key=lambda s: (s[0] * s[1], s))
        o, n = ours[shape], naive[shape]
        t = o["median_ms"] / n["median_ms"]
        out.append(dict(kind="vs_naive", baseline=baseline, op=op, divergence=div, N=shape[0], V=shape[1], d=shape[2],
                        ours_ms=round(o["median_ms"], 2), naive_ms=round(n["median_ms"], 2), time_ratio=round(t, 3),
                        ours_mb=o["peak_mem_mb"], naive_mb=n["peak_mem_mb"], target=1.0, passed=t <= 1.0))
        log(f"target {op} {div or '-':28s} N={shape[0]}: torch / {baseline} time {o['median_ms']:.0f}/"
            f"{n['median_ms']:.0f} ms = {t:.2f}x (<= 1.0x): {'pass' if t <= 1.0 else 'short'}")
    return out
