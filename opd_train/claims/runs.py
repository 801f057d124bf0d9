"""The claims' runs: the registry (`RUNS`), the assets they need, the lrs, and the training pool.

Every run is a ``python -m opd_train`` run of one preset with the same student, steps,
completions per step and seed for every method, and a warmup + cosine schedule. `RUNS` gives each
run's method options as its paper runs it. The lr: with ``--tune`` each run's best of the shared
grid `LR_GRID` by final accuracy on the validation split (one run per grid point at seed
`TUNE_SEED`, ties to the smaller lr), committed in ``opd_train/claims_lrs.json`` per preset and
budget; a run without a committed lr runs at the preset's lr, and the runs table says which.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import cli
from .verdict import Refs, final

# name -> method options, each as its paper runs it; every run also gets the shared
# preset/steps/seed/schedule options. Runs that need a preset asset are in NEEDS.
RUNS = {
    "sft": ["--method", "sft"],  # on the dataset's reference answers
    "seqkd": ["--method", "seqkd"],  # SFT on the teacher's samples: off-policy distillation
    "grpo": ["--method", "grpo", "--no-grpo-std-norm", "--grpo-reward", "digits"],  # Dr.GRPO, group 8
    "opd": ["--method", "opd"],
    "opd-strong": ["--method", "opd"],  # + --teacher: the preset's strong teacher
    "eopd": ["--method", "eopd"],
    "iwopd": ["--method", "iwopd"],
    "topk-rkl": ["--method", "topk-rkl"],
    "opsd": ["--method", "opsd"],
    "sdft": ["--method", "sdft", "--sdft-teacher", "ema"],  # the paper's EMA teacher
    "sdft-frozen": ["--method", "sdft", "--sdft-teacher", "frozen"],
    "sdpo": ["--method", "sdpo", "--sdpo-feedback", "hint", "--sdpo-teacher", "ema"],  # the paper's EMA teacher
    "sdpo-frozen": ["--method", "sdpo", "--sdpo-feedback", "hint", "--sdpo-teacher", "frozen"],
    "gopd-1": ["--method", "gopd", "--gopd-reward-scale", "1"],
    "gopd-1.25": ["--method", "gopd", "--gopd-reward-scale", "1.25"],
    "gopd-2": ["--method", "gopd", "--gopd-reward-scale", "2"],
    "gopd-1.25-base": ["--method", "gopd", "--gopd-reward-scale", "1.25", "--gopd-ref", "teacher-base"],
    # both operations, each prompt's teacher the expert of its domain (--domain-teacher per expert)
    "multi-1.25": ["--method", "gopd", "--gopd-reward-scale", "1.25", "--ops", "+-"],
}
# run -> the asset it needs: "base" (a teacher with a kept pre-RL base: presets with teacher_rl),
# "experts" (a preset's domain experts), "strong" (a teacher stronger than GRPO's result: presets
# with strong_teacher), "prior" (a prior-skill evaluation: presets with prior_ops)
NEEDS = {"gopd-1.25-base": "base", "multi-1.25": "experts", "opd-strong": "strong"}
ASSET_MISSING = {
    "base": "this preset's teacher has no kept pre-RL base (presets with teacher_rl have one)",
    "experts": "this preset has no domain experts (presets with experts have them)",
    "strong": "this preset has no teacher stronger than GRPO's result (presets with strong_teacher have one)",
    "prior": "this preset has no prior-skill evaluation (presets with prior_ops have one)",
}

LR_GRID = (3e-4, 1e-3, 3e-3)
TUNE_SEED = 1000  # not one of the test seeds
TUNED_LRS = Path(__file__).resolve().parents[1] / "claims_lrs.json"  # preset -> run -> lr, written by --tune


def _task(preset: str, ops: str | None = None, eval_size: int | None = None):
    from ..task import ArithmeticTask

    p = cli.PRESETS[preset]
    return ArithmeticTask(p["digits"], ops or p["ops"], eval_size=eval_size or p["eval_size"])


def assets(preset: str, log=print) -> tuple[set[str], dict]:
    """The assets a preset has (see `NEEDS`), building them if needed, and their directories
    (``{"experts": {domain: dir}, "strong": dir}``)."""
    from ..bench_assets import bundled_experts, bundled_strong_teacher, bundled_teacher

    p, task = cli.PRESETS[preset], _task(preset)
    have, paths = set(), {}
    if (bundled_teacher(p, task, log) / "base" / "config.json").exists():
        have.add("base")
    paths["experts"] = {d: str(path) for d, path in bundled_experts(p, task, log).items()}
    if paths["experts"]:
        have.add("experts")
    strong = bundled_strong_teacher(p, task, log)
    if strong is not None:
        have.add("strong")
        paths["strong"] = str(strong)
    if p.get("prior_ops"):
        have.add("prior")
    return have, paths


def references(preset: str, eval_size: int, experts: dict) -> Refs:
    """The external teacher's greedy held-out accuracy on the runs' test set, and each expert's on
    its own domain of the multi-teacher run's test set (points)."""
    import torch

    from .. import rollout
    from ..bench_assets import bundled_teacher
    from ..models import load
    from ..tokenizer import load_tokenizer

    torch.set_num_threads(1)
    task = _task(preset, eval_size=eval_size)
    path = bundled_teacher(cli.PRESETS[preset], task)
    teacher = 100 * rollout.evaluate(load(path), load_tokenizer(path), task, task.eval_examples())
    accs = {}
    if experts:
        both = _task(preset, ops="".join(experts), eval_size=eval_size)
        for d, path in experts.items():
            exs = [ex for ex in both.eval_examples() if both.domain(ex) == d]
            accs[d] = 100 * rollout.evaluate(load(path), load_tokenizer(path), both, exs)
    return Refs(teacher, accs)


def train_all(jobs: list[tuple[list[str], Path]], log, workers: int = 1) -> list[list[dict]]:
    """Run ``python -m opd_train ARGV --out OUT`` for each job; its metrics rows, in job order.

    One worker runs them in this process, one after another; more run that many subprocesses at
    once (each run uses one CPU thread, ``--threads 1``, so 2 workers fill 2 cores; only the
    wall-time claim reads times, and it says it ran on a shared CPU)."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from ..train import main as train_main

    def one(job):
        argv, run_out = job
        argv = [*argv, "--out", str(run_out)]
        log("$ python -m opd_train " + " ".join(argv))
        if workers == 1:
            ok = train_main(argv) == 0
        else:
            run_out.mkdir(parents=True, exist_ok=True)
            with open(run_out / "log.txt", "w") as f:
                ok = subprocess.run([sys.executable, "-m", "opd_train", *argv], stdout=f, stderr=subprocess.STDOUT).returncode == 0
        if not ok:
            raise RuntimeError(f"claims run failed: python -m opd_train {' '.join(argv)}")
        return [json.loads(x) for x in (run_out / "metrics.jsonl").read_text().splitlines()]

    if workers == 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def load_all(jobs: list[tuple[list[str], Path]]) -> list[list[dict]]:
    """The metrics rows of runs made earlier (``--report``); each run's args.json must match its job."""
    out = []
    for argv, run_out in jobs:
        args = json.loads((run_out / "args.json").read_text())
        want = cli.parse_args([*argv, "--out", str(run_out)])
        for key in ("method", "seed", "steps", "lr", "lr_schedule", "warmup_steps", "preset", "ops"):
            if args[key] != getattr(want, key):
                raise ValueError(f"--report: {run_out} was run with {key} {args[key]!r}, this report needs "
                                 f"{getattr(want, key)!r}")
        out.append([json.loads(x) for x in (run_out / "metrics.jsonl").read_text().splitlines()])
    return out


def run_options(name: str, paths: dict) -> list[str]:
    """A run's method options, plus one --domain-teacher per expert for the multi-teacher run and
    --teacher for the strong-teacher run."""
    need = NEEDS.get(name)
    extra = []
    if need == "experts":
        extra = [f"--domain-teacher={d}={path}" for d, path in paths.get("experts", {}).items()]
    elif need == "strong":
        extra = ["--teacher", paths["strong"]]
    return [*RUNS[name], *extra]


def tune(shared: list[str], out: Path, log=print, names=None, paths=None, workers: int = 1) -> dict[str, float]:
    """Per run: the lr of `LR_GRID` with the best final validation accuracy (ties: the smaller lr)."""
    names = list(names or RUNS)
    jobs = [([*run_options(name, paths or {}), *shared, "--lr", repr(lr), "--eval-split", "validation",
              "--seed", str(TUNE_SEED)], out / "tune" / f"{name}-lr{lr:g}") for name in names for lr in LR_GRID]
    finals = iter([final(rows) for rows in train_all(jobs, log, workers)])
    best = {}
    for name in names:
        scores = [(next(finals), -lr) for lr in LR_GRID]
        best[name] = -max(scores)[1]
        log(f"tune {name}: " + ", ".join(f"lr {lr:g} -> {acc:.1f}%" for (acc, _), lr in zip(scores, LR_GRID))
            + f"; chosen {best[name]:g}")
    return best


def tuned_lrs(preset: str, steps: int) -> dict[str, float]:
    """The committed lr choices of `--tune` for this preset and budget (those runs that have one)."""
    if not TUNED_LRS.exists():
        return {}
    entry = json.loads(TUNED_LRS.read_text()).get(preset)
    return entry["lr"] if entry and entry["steps"] == steps else {}
