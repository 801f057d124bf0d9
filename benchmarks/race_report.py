"""Ratios, verdicts and the markdown table of a CPU race (``race.py``'s ``race.json``).

    python benchmarks/race_report.py benchmarks/results/cpu-epyc-2c                     # print the table
    python benchmarks/race_report.py benchmarks/results/cpu-epyc-2c --readme README.md   # rewrite its block

``--readme`` replaces what lies between ``<!-- race: DIR -->`` and ``<!-- race: end -->`` (the
block must exist); ``tests/test_readme.py`` checks that the block is ``summary(DIR/race.json)``.

Every ratio is the median over rounds of the per-round ratio (the providers of a round ran back
to back, so load drift on the machine hits both sides alike). The fastest peer is the peer (not
``naive``, not ``floor``, not ours) with the lowest median fwd+bwd time.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import table as table_md
from cases import KEPT  # ours with rule 4 opted in: reported beside the table, never as a peer
from peers import PEERS

OURS = "torch"
FLOOR = "floor"
FLOOR_TARGET = {"jsd": 1.4}  # ours / GEMM floor; every other op: DEFAULT_FLOOR_TARGET
DEFAULT_FLOOR_TARGET = 1.2
TARGETS = ("time", "memory", "floor", "first_call", "vs_naive")


def totals(p: dict) -> list[float]:
    """Per-round fwd+bwd ms of one provider's ``rounds_ms`` ([[fwd, bwd], ...])."""
    return [f + b for f, b in p.get("rounds_ms", [])]


def per_round_ratio(a: dict, b: dict) -> float | None:
    """Median over rounds of a's time / b's time in the same round (None: no shared round)."""
    pairs = [x / y for x, y in zip(totals(a), totals(b)) if y > 0]
    return statistics.median(pairs) if pairs else None


def fastest_peer(providers: dict) -> str | None:
    """The peer with the lowest median fwd+bwd time (None: no peer timed)."""
    timed = {p: statistics.median(totals(v)) for p, v in providers.items() if p in PEERS and totals(v)}
    return min(timed, key=timed.get) if timed else None


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _at_most(value, limit) -> bool | None:
    return None if value is None else value <= limit


def analyze(entry: dict) -> dict:
    """Add ``floor_ms``, ``fastest_peer``, ``ours`` (the ratios) and ``verdicts`` (True = pass,
    False = short, None = not measurable) to one (shape, op) entry of race.json; returns it."""
    provs = entry["providers"]
    floor = provs.get(FLOOR, {})
    entry["floor_ms"] = statistics.median(totals(floor)) if totals(floor) else None
    peer = fastest_peer(provs)
    entry["fastest_peer"] = peer
    ours = provs.get(OURS)
    if not ours or not totals(ours):
        entry["ours"], entry["verdicts"] = None, {t: None for t in TARGETS}
        return entry
    p = provs.get(peer, {}) if peer else {}
    r = {
        "ratio_vs_fastest_peer": per_round_ratio(ours, p) if peer else None,
        "mem_ratio": _ratio(ours.get("peak_mem_mb"), p.get("peak_mem_mb")),
        "first_call_ratio": _ratio(ours.get("first_call_ms"), p.get("first_call_ms")),
        "floor_multiple": per_round_ratio(ours, floor) if totals(floor) else None,
        "floor_target": FLOOR_TARGET.get(entry["op"], DEFAULT_FLOOR_TARGET),
        "vs_naive": per_round_ratio(ours, provs["naive"]) if "naive" in provs else None,
    }
    entry["ours"] = r
    entry["verdicts"] = {
        "time": _at_most(r["ratio_vs_fastest_peer"], 1.0),
        "memory": _at_most(r["mem_ratio"], 1.0),
        "floor": _at_most(r["floor_multiple"], r["floor_target"]),
        "first_call": _at_most(r["first_call_ratio"], 1.0),
        "vs_naive": _at_most(r["vs_naive"], 1.0) if entry["op"] == "logprobs" else None,  # a target for logprobs only
    }
    return entry


def _verdict(v: bool | None) -> str:
    return "-" if v is None else "pass" if v else "short"


def _num(x, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x / scale, fmt)


def _kept_line(e: dict) -> str:
    """One race entry's ``torch_kept`` figures: ms, ÷ fastest peer, ÷ floor, MB."""
    provs, kept = e["providers"], e["providers"][KEPT]
    peer = provs.get(e["fastest_peer"], {}) if e["fastest_peer"] else {}
    floor = per_round_ratio(kept, provs[FLOOR]) if totals(provs.get(FLOOR, {})) else None
    return (f"{e['op']} N={e['N']} V={e['V']}: {_num(kept.get('median_ms'), '.0f')} ms, "
            f"{_num(per_round_ratio(kept, peer) if peer else None, '.2f')}× `{e['fastest_peer']}`, "
            f"{_num(floor, '.2f')}× floor, {_num(kept.get('peak_mem_mb'), '.0f')} MB")


def summary(data: dict) -> str:
    """The README's race table (``<!-- race: DIR -->``): one row per shape x op, then the machine."""
    head = ["| N, V, d | op | ours ms | fastest peer | peer ms | ours ÷ peer time | MB ours / peer | ours ÷ floor "
            "| first call s ours / peer | time ≤ 1.0× | memory ≤ peer | floor ≤ target | first call ≤ peer "
            "| ours ÷ naive |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for e in data["cases"]:
        provs, r, v = e["providers"], e.get("ours") or {}, e["verdicts"]
        ours, peer = provs.get(OURS, {}), provs.get(e["fastest_peer"], {}) if e["fastest_peer"] else {}
        naive = _num(r.get("vs_naive"), ".2f") + "×" if r.get("vs_naive") is not None else "n/a"
        if e["op"] == "logprobs":
            naive += f" ({_verdict(v['vs_naive'])})"
        rows.append(" | ".join([
            f"| {e['N']}, {e['V']}, {e['d']}", e["op"], _num(ours.get("median_ms"), ".0f"),
            f"`{e['fastest_peer']}`" if e["fastest_peer"] else "none", _num(peer.get("median_ms"), ".0f"),
            _num(r.get("ratio_vs_fastest_peer"), ".2f"),
            f"{_num(ours.get('peak_mem_mb'), '.0f')} / {_num(peer.get('peak_mem_mb'), '.0f')}",
            _num(r.get("floor_multiple"), ".2f") + (f" (≤ {r['floor_target']})" if r else ""),
            f"{_num(ours.get('first_call_ms'), '.1f', 1e3)} / {_num(peer.get('first_call_ms'), '.1f', 1e3)}",
            _verdict(v["time"]), _verdict(v["memory"]), _verdict(v["floor"]), _verdict(v["first_call"]), naive]) + " |")
    m = data["meta"]
    rounds = ", ".join(f"{n} at V={V}" for V, n in sorted({e["V"]: e["rounds"] for e in data["cases"]}.items()))
    load = f"load average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end" \
        if m.get("loadavg_end") else f"load average {m['loadavg_start'][0]:.2f} at the start (run not finished)"
    skipped = sorted({f"{s['provider']} ({s['reason']})" for e in data["cases"] for s in e["skipped"]
                      if s["phase"] == "plan"})
    tail = [f"{m['device']}; torch {m['torch']}; {m['date'][:10]}; git {m['git_sha']}; {load}; fp32 forward+backward, "
            f"medians of interleaved rounds in rotated order ({rounds}); ratios are medians of per-round ratios. "
            f"First call: a fresh process with an empty inductor cache; memory: peak RSS growth over the inputs, "
            f"fresh process. Command: `{m['command']}`."]
    failed = [f"{e['op']} N={e['N']} V={e['V']}: {s['provider']} ({s['phase']}: {s['reason']})"
              for e in data["cases"] for s in e["skipped"] if s["phase"] != "plan"]
    kept = [_kept_line(e) for e in data["cases"] if totals(e["providers"].get(KEPT, {}))]
    if kept:
        tail.append("Opt-in kept gradient (`torch_kept`: ours with `OPD_KEEP_BYTES` set, which keeps one [N, V] fp32 "
                    "buffer from forward to backward, outside the design's memory rule; not the default): "
                    + "; ".join(kept) + ".")
    if m.get("notes"):
        tail.append(f"Notes: {m['notes']}.")
    if m.get("stopped"):
        tail.append(f"Stopped: {m['stopped']}.")
    if skipped:
        tail.append("Not offered: " + "; ".join(skipped) + ".")
    if failed:
        tail.append("Failed: " + "; ".join(failed) + ".")
    return "\n".join(head + rows + [""] + "\n\n".join(tail).split("\n"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="folder holding race.json")
    ap.add_argument("--readme", type=Path, help="rewrite the race block for DIR in this markdown file")
    a = ap.parse_args()
    table = summary(json.loads((a.dir / "race.json").read_text()))
    if a.readme:
        table_md.update_readme(a.readme, a.dir.as_posix().rstrip("/"), table, tag="race")
    else:
        print(table)
