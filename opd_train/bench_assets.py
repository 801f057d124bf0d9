"""The bundled benchmark's assets beyond a preset's pre-trained student and teacher.

* An **RL-trained teacher** that keeps its pre-RL base (for G-OPD's reward correction,
  ``--gopd-ref teacher-base``): `RLSpec` describes a short GRPO run (Dr.GRPO advantages,
  partial-credit reward, warmup + cosine) on top of an SFT-pre-trained teacher. `get_rl_teacher`
  builds it once and caches it as a model directory whose ``base/`` subdirectory is the SFT model
  it started from, so ``TEACHER_DIR/base`` is the teacher's base. A preset with a ``teacher_rl``
  entry gets its teacher this way (`bundled_teacher`); presets without one keep the SFT teacher.
  The RL run is a ``python -m opd_train --method grpo --student BASE`` subprocess, the same code
  path as any GRPO run.
* **Domain experts** (`bundled_experts`, a preset's ``experts``: domain -> ``"teacher"`` or a
  `ModelSpec`) for the multi-teacher run (``--domain-teacher``).
* **A strong teacher** (`bundled_strong_teacher`, a preset's ``strong_teacher``: ``"teacher"`` or a
  `ModelSpec`): a teacher better than what GRPO reaches on the student, the regime of the
  "OPD reaches RL's accuracy at a fraction of the compute" claim (Qwen3's 32B teacher for an 8B
  student).

In the ``bench`` preset (`opd_train.cli`) the teacher is imperfect by construction: it is
pre-trained only on additions without a carry chain (``chain_free``; 41% of held-out additions
have one), so it fails on part of them. Earlier attempts to get an imperfect teacher by stopping
SFT early failed (default teacher architecture, 3-digit +, seed 0; RL = 150 Dr.GRPO steps): SFT
250 steps 0.0% (after RL at lr 1e-3: 0.0%); 450 steps 1.2% (RL lr 1e-4: 0.4%); 525 steps 19.9%
(RL lr 1e-4: 16.8%); 600 steps 86.7% (RL lr 1e-3: 0.0%, collapsed): the SFT curve jumps between
525 and 600 steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import PRETRAIN_SEED, cache_dir, get_pretrained


@dataclass(frozen=True)
class RLSpec:
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    samples_per_prompt: int = 8


def get_rl_teacher(spec, rl: RLSpec, task, seed: int = PRETRAIN_SEED, log=print) -> Path:
    """The SFT teacher of ``spec`` after the GRPO run ``rl``; its SFT base is kept in ``DIR/base``."""
    base = get_pretrained("teacher", spec, task, seed, log)
    ops = spec.ops or task.ops
    key = json.dumps({"base": base.name, "rl": asdict(rl), "seed": seed,
                      "task": {"digits": task.digits, "ops": ops}}, sort_keys=True)
    path = cache_dir() / f"teacher-rl-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (path / "meta.json").exists():
        return path
    log(f"RL for the teacher ({rl.steps} GRPO steps from {base}); cached at {path}")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "opd_train", "--method", "grpo", "--student", str(base),
           "--digits", str(task.digits), "--ops", ops, "--steps", str(rl.steps),
           "--batch-size", str(rl.batch_size), "--samples-per-prompt", str(rl.samples_per_prompt),
           "--lr", repr(rl.lr), "--lr-schedule", "cosine", "--warmup-steps", str(max(1, rl.steps // 20)),
           "--no-grpo-std-norm", "--grpo-reward", "digits", "--eval-size", str(len(task.eval_examples())),
           "--eval-every", str(rl.steps), "--save-every", str(rl.steps), "--seed", str(seed),
           "--out", str(tmp / "run")]
    subprocess.run(cmd, check=True)
    shutil.copytree(tmp / "run" / "ckpt" / "model", tmp / "model")
    shutil.copytree(base, tmp / "model" / "base")
    evals = [r for r in map(json.loads, (tmp / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_accuracy" in r]
    (tmp / "model" / "meta.json").write_text(json.dumps(
        {"key": json.loads(key), "base_eval_accuracy": evals[0]["eval_accuracy"],
         "eval_accuracy": evals[-1]["eval_accuracy"], "seconds": time.time() - t0}, indent=1))
    log(f"teacher after RL: held-out exact match {100 * evals[0]['eval_accuracy']:.1f}% -> "
        f"{100 * evals[-1]['eval_accuracy']:.1f}%")
    try:
        os.rename(tmp / "model", path)
    except OSError:
        pass  # a concurrent builder won the race
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def bundled_teacher(preset: dict, task, log=print) -> Path:
    """The teacher directory of a preset: the RL teacher if it has ``teacher_rl``, else the SFT one."""
    if preset.get("teacher_rl") is not None:
        return get_rl_teacher(preset["teacher"], preset["teacher_rl"], task, PRETRAIN_SEED, log)
    return get_pretrained("teacher", preset["teacher"], task, PRETRAIN_SEED, log)


def bundled_experts(preset: dict, task, log=print) -> dict[str, Path]:
    """Domain -> expert directory of a preset's ``experts`` (``"teacher"``: the preset's teacher)."""
    return {domain: bundled_teacher(preset, task, log) if spec == "teacher"
            else get_pretrained("teacher", spec, task, PRETRAIN_SEED, log)
            for domain, spec in preset.get("experts", {}).items()}


def bundled_strong_teacher(preset: dict, task, log=print) -> Path | None:
    """The directory of a preset's ``strong_teacher`` (``"teacher"``: the preset's teacher), or None."""
    spec = preset.get("strong_teacher")
    if spec is None:
        return None
    return bundled_teacher(preset, task, log) if spec == "teacher" else get_pretrained("teacher", spec, task,
                                                                                         PRETRAIN_SEED, log)
