"""``python -m opd_train.compare --claims``: the survey's headline claims, each checked over seeds.

Every run is a ``python -m opd_train`` run (in this process, one after another) with the same
preset, steps, completions per step and seed for every method, and a warmup + cosine schedule
(``--lr-schedule cosine --warmup-steps steps/20``). The lr is the preset's for every method, or
with ``--tune`` each run's best of the shared grid `LR_GRID`, chosen by the final accuracy on the
bundled task's validation split (``--eval-split validation``, disjoint from the test set; one run
per grid point at seed `TUNE_SEED`, ties to the smaller lr).
Each claim turns one seed's runs into one number ``d`` whose sign the claim predicts (> 0 when
the claim holds); over the seeds it gets the mean ``m`` and the spread ``s`` (sample standard
deviation; 0 for a single seed) and a verdict by `verdict`:

* **holds** if ``m > 0`` and ``m > s`` (the claimed sign, by more than the seed-to-seed spread);
* **does not hold** if ``m < 0`` and ``−m > s`` (the opposite sign, by more than the spread);
* **mixed** otherwise (the spread covers 0 or ``m = 0``).

A claim whose runs need assets the bundled benchmark does not have yet (domain teachers and
multi-teacher routing, a prior-skill evaluation; a teacher with a kept pre-RL base exists only in
presets with ``teacher_rl``, see `opd_train.benchmark`) is listed as *not measured* with the
reason, never guessed. Outputs: ``OUT/claims.md`` (one row per claim), ``OUT/claims_runs.md``
(every run's final accuracy per seed), ``OUT/claims.png``; copied to ``docs/compare/`` unless
``--preset smoke`` (the CI check) or ``--no-docs``.
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import cli

# name -> method options; every run also gets the shared preset/steps/seed/schedule options
RUNS = {
    "sft": ["--method", "sft"],
    "grpo": ["--method", "grpo"],
    "opd": ["--method", "opd"],
    "opsd": ["--method", "opsd"],
    "sdft": ["--method", "sdft"],
    "sdpo": ["--method", "sdpo"],
    "gopd-1": ["--method", "gopd", "--gopd-reward-scale", "1"],
    "gopd-1.25": ["--method", "gopd", "--gopd-reward-scale", "1.25"],
    # only where the bundled teacher keeps its pre-RL base (a preset with teacher_rl)
    "gopd-1.25-base": ["--method", "gopd", "--gopd-reward-scale", "1.25", "--gopd-ref", "teacher-base"],
}
NEEDS_TEACHER_BASE = {"gopd-1.25-base"}


LR_GRID = (3e-4, 1e-3, 3e-3)
TUNE_SEED = 1000  # not one of the test seeds


def final(run: list[dict]) -> float:
    return 100 * [r for r in run if "eval_accuracy" in r][-1]["eval_accuracy"]


def acc_at_samples(run: list[dict], fraction: float) -> float:
    """Accuracy (points) of the last evaluation within ``fraction`` of the run's training samples."""
    evals = [r for r in run if "eval_accuracy" in r]
    budget = fraction * evals[-1]["samples"]
    return 100 * [r for r in evals if r["samples"] <= budget][-1]["eval_accuracy"]


def gain_per_ktoken(run: list[dict]) -> float:
    """Held-out accuracy gain (points) per 1,000 sampled completion tokens of training."""
    evals = [r for r in run if "eval_accuracy" in r]
    tokens = max(evals[-1]["completion_tokens"], 1)
    return 1000 * 100 * (evals[-1]["eval_accuracy"] - evals[0]["eval_accuracy"]) / tokens


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str                 # what d is, in words (its sign: > 0 if the claim holds)
    runs: tuple[str, ...]       # RUNS it needs
    value: object = None        # (runs of one seed: name -> metric rows, teacher accuracy) -> d
    missing: str | None = None  # why it cannot be measured on the bundled benchmark yet
    missing_without_base: str | None = None  # why not, where the teacher has no pre-RL base

    def why_not(self, has_base: bool) -> str | None:
        return self.missing or (None if has_base else self.missing_without_base)


CLAIMS = [
    Claim("OPD beats SFT at equal samples", "final acc. OPD − SFT (points)", ("opd", "sft"),
          lambda r, t: final(r["opd"]) - final(r["sft"])),
    Claim("OPD reaches GRPO's accuracy with far fewer samples",
          "acc. of OPD at 1/4 of the samples − GRPO's final acc. (points)", ("opd", "grpo"),
          lambda r, t: acc_at_samples(r["opd"], 0.25) - final(r["grpo"])),
    Claim("OPSD is more token-efficient than GRPO",
          "gain per 1k completion tokens, OPSD − GRPO (points)", ("opsd", "grpo"),
          lambda r, t: gain_per_ktoken(r["opsd"]) - gain_per_ktoken(r["grpo"])),
    Claim("SDFT learns the new skill with less forgetting than SFT",
          "prior-skill acc. drop, SFT − SDFT (points)", ("sdft", "sft"),
          missing="the bundled task has no prior-skill evaluation yet (issue #15, benchmark assets)"),
    Claim("SDPO beats GRPO at equal samples", "final acc. SDPO − GRPO (points)", ("sdpo", "grpo"),
          lambda r, t: final(r["sdpo"]) - final(r["grpo"])),
    Claim("ExOPD >= OPD", "final acc. G-OPD λ=1.25 − λ=1 (points)", ("gopd-1.25", "gopd-1"),
          lambda r, t: final(r["gopd-1.25"]) - final(r["gopd-1"])),
    Claim("ExOPD can exceed an imperfect teacher", "final acc. G-OPD λ=1.25 − the teacher's (points)",
          ("gopd-1.25",), lambda r, t: final(r["gopd-1.25"]) - t),
    Claim("reward correction with the teacher's base helps",
          "final acc. G-OPD λ=1.25 ref=teacher base − ref=student init (points)", ("gopd-1.25-base", "gopd-1.25"),
          lambda r, t: final(r["gopd-1.25-base"]) - final(r["gopd-1.25"]),
          missing_without_base="this preset's teacher has no kept pre-RL base (presets with teacher_rl have one)"),
    Claim("a multi-teacher student >= each expert on its domain",
          "per-domain acc. student − expert, worst domain (points)", (),
          missing="no domain teachers or multi-teacher routing yet"),
]


def verdict(values: list[float]) -> tuple[float, float, str]:
    """(mean, spread, verdict) of one claim's per-seed numbers (> 0: the claimed direction)."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    if m > 0 and m > s:
        return m, s, "holds"
    if m < 0 and -m > s:
        return m, s, "does not hold"
    return m, s, "mixed"


def table(results: dict[int, dict[str, list[dict]]], teacher_acc: float,
          has_base: bool = False) -> tuple[str, list]:
    """The claims table (markdown) and, per measured claim, its per-seed values (for the plot)."""
    seeds = sorted(results)
    lines = ["| claim | metric (> 0: as claimed) | per seed | mean ± spread | verdict |", "|---|---|---|---|---|"]
    measured = []
    for c in CLAIMS:
        why = c.why_not(has_base)
        if why:
            lines.append(f"| {c.text} | {c.metric} | — | — | not measured: {why} |")
            continue
        vals = [c.value(results[s], teacher_acc) for s in seeds]
        m, s, v = verdict(vals)
        per = ", ".join(f"{x:+.1f}" for x in vals)
        lines.append(f"| {c.text} | {c.metric} | {per} | {m:+.1f} ± {s:.1f} | **{v}** |")
        measured.append((c.text, vals))
    return "\n".join(lines) + "\n", measured


def runs_table(results: dict[int, dict[str, list[dict]]], teacher_acc: float, lrs: dict[str, float]) -> str:
    seeds = sorted(results)
    lines = ["| run | options | lr | " + " | ".join(f"seed {s}: start → final" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name, opts in RUNS.items():
        if all(name in results[s] for s in seeds):
            cells = []
            for s in seeds:
                evals = [r for r in results[s][name] if "eval_accuracy" in r]
                cells.append(f"{100 * evals[0]['eval_accuracy']:.1f} → {100 * evals[-1]['eval_accuracy']:.1f}")
            lines.append(f"| {name} | `{' '.join(opts)}` | {lrs[name]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nThe external teacher's held-out accuracy: {teacher_acc:.1f}%.\n"


def plot(measured: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * max(1, len(measured))))
    for i, (text, vals) in enumerate(measured):
        m = statistics.fmean(vals)
        s = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ax.errorbar([m], [i], xerr=[s], fmt="o", color="k", capsize=3)
        ax.plot(vals, [i] * len(vals), "x", color="tab:blue", alpha=0.7)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(measured)), [t for t, _ in measured], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="claim metric d (> 0: as claimed); mean ± spread, x = seeds", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bundled_teacher_dir(preset: str) -> Path:
    from .benchmark import bundled_teacher
    from .task import ArithmeticTask

    p = cli.PRESETS[preset]
    return bundled_teacher(p, ArithmeticTask(p["digits"], p["ops"], eval_size=p["eval_size"]))


def teacher_accuracy(preset: str, eval_size: int) -> float:
    """The bundled teacher's greedy held-out accuracy (points) on the runs' evaluation set."""
    import torch

    from . import rollout as R
    from .benchmark import bundled_teacher
    from .models import load
    from .task import ArithmeticTask
    from .tokenizer import load_tokenizer

    torch.set_num_threads(1)
    p = cli.PRESETS[preset]
    task = ArithmeticTask(p["digits"], p["ops"], eval_size=eval_size)
    path = bundled_teacher(p, task)
    return 100 * R.evaluate(load(path), load_tokenizer(path), task, task.eval_examples())


def _train(argv: list[str], run_out: Path, log) -> list[dict]:
    from .train import main as train_main

    argv = [*argv, "--out", str(run_out)]
    log("$ python -m opd_train " + " ".join(argv))
    if train_main(argv) != 0:
        raise RuntimeError(f"claims run failed: python -m opd_train {' '.join(argv)}")
    return [json.loads(x) for x in (run_out / "metrics.jsonl").read_text().splitlines()]


def tune(shared: list[str], out: Path, log=print, names=None) -> dict[str, float]:
    """Per run: the lr of `LR_GRID` with the best final validation accuracy (ties: the smaller lr)."""
    best = {}
    for name in names or RUNS:
        opts = RUNS[name]
        scores = []
        for lr in LR_GRID:
            rows = _train([*opts, *shared, "--lr", repr(lr), "--eval-split", "validation",
                           "--seed", str(TUNE_SEED)], out / "tune" / f"{name}-lr{lr:g}", log)
            scores.append((final(rows), -lr))
        best[name] = -max(scores)[1]
        log(f"tune {name}: " + ", ".join(f"lr {lr:g} -> {acc:.1f}%" for (acc, _), lr in zip(scores, LR_GRID))
            + f"; chosen {best[name]:g}")
    return best


def run_claims(preset: str, seeds: list[int], steps: int | None, out: Path, extra: list[str],
               docs: Path | None, log=print, tuned: bool = False) -> str:
    p = cli.PRESETS[preset]
    steps = steps or p["steps"]
    eval_size = p["eval_size"]
    shared = ["--preset", preset, "--steps", str(steps), "--lr-schedule", "cosine",
              "--warmup-steps", str(max(1, steps // 20)), *extra]
    has_base = (bundled_teacher_dir(preset) / "base" / "config.json").exists()
    names = [n for n in RUNS if has_base or n not in NEEDS_TEACHER_BASE]
    lrs = tune(shared, out, log, names) if tuned else {name: p["lr"] for name in names}
    results: dict[int, dict[str, list[dict]]] = {}
    for seed in seeds:
        results[seed] = {}
        for name in names:  # also those only a not-yet-measurable claim needs (claims_runs.md)
            results[seed][name] = _train([*RUNS[name], *shared, "--lr", repr(lrs[name]), "--seed", str(seed)],
                                         out / f"seed{seed}" / name, log)
    t_acc = teacher_accuracy(preset, eval_size)
    tab, measured = table(results, t_acc, has_base)
    lr_text = (f"lr per method from the grid {', '.join(f'{x:g}' for x in LR_GRID)} on the validation split"
               if tuned else f"every method at lr {p['lr']:g} (not tuned per method)")
    title = (f"opd_train.compare --claims: {preset} preset, {steps} steps per run, seeds "
             f"{', '.join(map(str, seeds))}; {lr_text}, warmup + cosine. d per seed, mean ± sample std over "
             "seeds; holds: mean > 0 and > spread; does not hold: mean < 0 and |mean| > spread; else mixed.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(f"{title}\n\n{tab}")
    (out / "claims_runs.md").write_text(f"Runs behind claims.md ({preset} preset, {steps} steps).\n\n"
                                        + runs_table(results, t_acc, lrs))
    plot(measured, out / "claims.png", f"claims, {preset} preset, {len(seeds)} seeds")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in ("claims.md", "claims_runs.md", "claims.png"):
            shutil.copyfile(out / f, docs / f)
    return tab
