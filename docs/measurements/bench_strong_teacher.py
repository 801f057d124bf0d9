"""Is the bench preset's strong teacher stronger than GRPO's result, and does OPD from it learn?

    python docs/measurements/bench_strong_teacher.py [--steps 60] [--out runs/bench_strong_teacher]

Builds (or finds in the cache) the ``bench`` preset's ``strong_teacher`` and the bench teacher,
measures their greedy held-out accuracy on the runs' test set (256 prompts), runs ``python -m
opd_train --method opd --preset bench --teacher STRONG --steps STEPS`` (one CPU thread) and writes
``docs/measurements/bench_strong_teacher.json`` with the machine's load average (a shared machine:
the accuracies do not depend on the load, the seconds do).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from opd_train import cli, rollout
    from opd_train.bench_assets import bundled_strong_teacher, bundled_teacher
    from opd_train.models import load
    from opd_train.task import ArithmeticTask
    from opd_train.tokenizer import load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/bench_strong_teacher")
    a = p.parse_args()
    torch.set_num_threads(1)
    preset = cli.PRESETS["bench"]
    task = ArithmeticTask(preset["digits"], preset["ops"], eval_size=preset["eval_size"])
    load0 = os.getloadavg()[0]
    accs = {}
    for name, path in (("bench teacher", bundled_teacher(preset, task)),
                       ("strong teacher", bundled_strong_teacher(preset, task))):
        accs[name] = round(100 * rollout.evaluate(load(path), load_tokenizer(path), task, task.eval_examples()), 1)
        print(name, path, accs[name], flush=True)
    strong = bundled_strong_teacher(preset, task)
    cmd = [sys.executable, "-m", "opd_train", "--method", "opd", "--preset", "bench", "--teacher", str(strong),
           "--steps", str(a.steps), "--eval-every", str(a.steps // 2), "--out", f"{a.out}/opd-strong"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (ROOT / a.out / "opd-strong" / "metrics.jsonl").read_text().splitlines()]
    result = {"held_out_accuracy": accs,
              "opd_from_strong_teacher": {"command": "python -m opd_train " + " ".join(cmd[3:]).replace(str(strong), "STRONG"),
                                          "eval_accuracy": {str(r["step"]): round(100 * r["eval_accuracy"], 1)
                                                            for r in rows if "eval_accuracy" in r},
                                          "seconds": round(time.time() - t0)},
              "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
              "note": "2-core x86_64 machine shared with other jobs (it ran under load); one CPU thread"}
    (ROOT / "docs" / "measurements" / "bench_strong_teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
