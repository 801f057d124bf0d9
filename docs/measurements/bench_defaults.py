"""Does every method learn with its CLI defaults on the bench preset? A short run of each.

    python docs/measurements/bench_defaults.py [--steps 60] [--methods M ...] [--out runs/bench_defaults]

Runs ``python -m opd_train --method M --preset bench --steps STEPS --eval-every STEPS/2`` for every
method in the registry, one after another (one CPU thread each), and writes
``docs/measurements/bench_defaults.json`` (``runs_by_steps[STEPS][M]``): per method the held-out
accuracy (256 prompts, greedy) at steps 0, STEPS/2 and STEPS, with the machine's load average at the start and end of each run (the
runs share the CPU with whatever else runs: a loaded machine changes the times, not the accuracies).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from opd_train.methods import METHODS

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/bench_defaults")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    a = p.parse_args()
    path = ROOT / "docs" / "measurements" / "bench_defaults.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  note="each run alone (one at a time), 1 CPU thread, on a machine shared with other jobs (load "
                       "averages below: it ran under load; times are not comparable, accuracies are)")
    runs = result.setdefault("runs_by_steps", {}).setdefault(str(a.steps), {})
    for m in a.methods:
        cmd = [sys.executable, "-m", "opd_train", "--method", m, "--preset", "bench", "--steps", str(a.steps),
               "--eval-every", str(a.steps // 2), "--out", f"{a.out}/{m}"]
        load0, t0 = os.getloadavg()[0], time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(x) for x in (ROOT / a.out / m / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_accuracy" in r]
        runs[m] = {"command": "python -m opd_train " + " ".join(cmd[3:]),
                   "eval_accuracy": {str(r["step"]): round(100 * r["eval_accuracy"], 1) for r in evals},
                   "learns": evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"],
                   "seconds": round(time.time() - t0), "load_average_1min": [round(load0, 2),
                                                                            round(os.getloadavg()[0], 2)]}
        print(m, runs[m]["eval_accuracy"], flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
