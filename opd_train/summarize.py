"""A small, committable summary of a training run: what a README number needs as its source.

    python -m opd_train.summarize runs/opd --out docs/measurements/main_job_seed0.json \
        --wall-s 131.4 --note "idle, empty model cache"

Keeps the run's arguments, every evaluation line of ``metrics.jsonl`` (accuracies over steps),
the last training line (samples, tokens, training seconds), the machine's CPU model, the commit,
and what the caller measured around the run (``--wall-s``, ``--note``). Not the checkpoints.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarize(run_dir: Path, *, wall_s=None, note="") -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [x for x in lines if any(k.startswith("eval_") for k in x)]
    train = [x for x in lines if "loss" in x]
    if not evals:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no evaluation line")
    return {"run": str(run_dir), "commit": commit(), "machine": f"{cpu_model()} ({__import__('os').cpu_count()} cores)",
            "args": json.loads((run_dir / "args.json").read_text()), "evals": evals,
            "last_step": train[-1] if train else None, "wall_s": wall_s, "note": note}


def readme_table(summaries: list[dict]) -> str:
    """The README's main-job table (``<!-- main-job -->``; tests/test_readme.py checks it) from
    summaries of ``python -m opd_train`` runs: one row per seed."""
    rows = ["| seed | held-out accuracy, start → end | steps | training time | wall time | machine, commit | conditions |",
            "|---|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: s["args"]["seed"]):
        first, last = s["evals"][0], s["evals"][-1]
        wall = "—" if s["wall_s"] is None else f"{s['wall_s']:.0f} s"
        rows.append(f"| {s['args']['seed']} | {100 * first['eval_accuracy']:.1f}% → **{100 * last['eval_accuracy']:.1f}%** "
                    f"| {last['step']} | {s['last_step']['time_s']:.0f} s | {wall} | {s['machine']}, {s['commit']} "
                    f"| {s['note']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wall-s", type=float, default=None, help="wall time of the whole command, measured by the caller")
    p.add_argument("--note", default="", help="conditions of the run (idle or not, model cache empty or not)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summarize(args.run_dir, wall_s=args.wall_s, note=args.note), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
