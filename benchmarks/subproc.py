"""Shared plumbing of the one-step benchmarks (train_step.py, trl_step.py, train_scale.py): each
case runs in a fresh process whose result is one tagged JSON line, and a run's rows are written
with the same meta block."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_worker(script: str, tag: str, name: str, flags: dict) -> dict:
    """Run ``script --worker`` with ``--key=value`` flags in a fresh process; return its tagged row."""
    cmd = [sys.executable, script, "--worker"] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith(f"@@{tag}@@ ")]
    if out.returncode or not line:
        raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[0].split(" ", 1)[1])


def write_rows(out_dir: Path, filename: str, device: str, rows: list[dict], **meta) -> None:
    """``out_dir/filename``: the device, torch, date and command of this run, plus ``meta``, and the rows."""
    import run
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": {"device": run.device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                     "command": " ".join(sys.argv), **meta}, "rows": rows}
    (out_dir / filename).write_text(json.dumps(data, indent=1) + "\n")
