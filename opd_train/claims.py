"""``python -m opd_train.compare --claims``: the survey's headline claims, each checked over seeds.

Every run is a ``python -m opd_train`` run (in this process, one after another) of the ``bench``
preset (`opd_train.cli`; its assets: `opd_train.bench_assets`) with the same student, steps,
completions per step and seed for every method, and a warmup + cosine schedule
(``--lr-schedule cosine --warmup-steps steps/20``). Each run's options (`RUNS`) are its method
as the paper runs it (Dr.GRPO, SDPO with the self-distillation mask and hint feedback, SDFT with
an EMA or a frozen teacher, G-OPD at λ = 1, 1.25, 2, with the teacher's base as reference, and
with domain experts). The lr: with ``--tune`` each run's best of the shared grid `LR_GRID`,
chosen by the final accuracy on the bundled task's validation split (``--eval-split validation``,
disjoint from the test set; one run per grid point at seed `TUNE_SEED`, ties to the smaller lr);
the choice is committed in ``opd_train/claims_lrs.json`` (preset, steps, grid, chosen lr per run)
and used by later runs of that preset and budget; without one, the preset's lr for every run.

Each claim turns one seed's runs into one number ``d`` whose sign the claim predicts (> 0 when
the claim holds); over the seeds it gets the mean ``m`` and the spread ``s`` (sample standard
deviation; 0 for a single seed) and a verdict by `verdict`:

* **holds** if ``m > 0`` and ``m > s`` (the claimed sign, by more than the seed-to-seed spread);
* **does not hold** if ``m < 0`` and ``−m > s`` (the opposite sign, by more than the spread);
* **mixed** otherwise (the spread covers 0 or ``m = 0``).

A claim whose runs need an asset the preset lacks (a teacher with a kept pre-RL base, domain
experts, a prior-skill evaluation: `ASSET_MISSING`) is listed as *not measured* with the reason,
never guessed. Outputs: ``OUT/claims.md`` (one row per claim), ``OUT/claims_runs.md`` (every
run per seed, whether it learns, its prior skill), ``OUT/claims.png``; copied to
``docs/compare/`` unless ``--preset smoke`` (the CI check) or ``--no-docs``.
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import cli

# name -> method options, each as its paper runs it; every run also gets the shared
# preset/steps/seed/schedule options. Runs that need a benchmark asset are in NEEDS.
RUNS = {
    "sft": ["--method", "sft"],  # on the dataset's reference answers
    "seqkd": ["--method", "seqkd"],  # SFT on the teacher's samples: off-policy distillation
    "grpo": ["--method", "grpo", "--no-grpo-std-norm", "--grpo-reward", "digits"],  # Dr.GRPO, group 8
    "opd": ["--method", "opd"],
    "opsd": ["--method", "opsd"],
    "sdft": ["--method", "sdft"],  # EMA teacher (the paper's)
    "sdft-frozen": ["--method", "sdft", "--sdft-teacher", "frozen"],
    "sdpo": ["--method", "sdpo", "--sdpo-feedback", "hint"],  # self-distillation mask on (default); EMA teacher
    "sdpo-frozen": ["--method", "sdpo", "--sdpo-feedback", "hint", "--sdpo-teacher", "frozen"],
    "gopd-1": ["--method", "gopd", "--gopd-reward-scale", "1"],
    "gopd-1.25": ["--method", "gopd", "--gopd-reward-scale", "1.25"],
    "gopd-2": ["--method", "gopd", "--gopd-reward-scale", "2"],
    "gopd-1.25-base": ["--method", "gopd", "--gopd-reward-scale", "1.25", "--gopd-ref", "teacher-base"],
    # both operations, each prompt's teacher the expert of its domain (--domain-teacher per expert)
    "multi-1.25": ["--method", "gopd", "--gopd-reward-scale", "1.25", "--ops", "+-"],
}
# run -> the asset it needs: "base" (a teacher with a kept pre-RL base: presets with teacher_rl),
# "experts" (a preset's domain experts), "prior" (a prior-skill evaluation: presets with prior_ops)
NEEDS = {"gopd-1.25-base": "base", "multi-1.25": "experts"}
ASSET_MISSING = {
    "base": "this preset's teacher has no kept pre-RL base (presets with teacher_rl have one)",
    "experts": "this preset has no domain experts (presets with experts have them)",
    "prior": "this preset has no prior-skill evaluation (presets with prior_ops have one)",
}

LR_GRID = (3e-4, 1e-3, 3e-3)
TUNE_SEED = 1000  # not one of the test seeds
TUNED_LRS = Path(__file__).with_name("claims_lrs.json")  # preset -> run -> lr, written by --tune


@dataclass(frozen=True)
class Refs:
    """Accuracies (points) the claims compare against: the external teacher and each domain expert."""
    teacher: float
    experts: dict = field(default_factory=dict)  # domain -> the expert's accuracy on that domain


def evals(run: list[dict]) -> list[dict]:
    return [r for r in run if "eval_accuracy" in r]


def final(run: list[dict]) -> float:
    return 100 * evals(run)[-1]["eval_accuracy"]


def gain(run: list[dict]) -> float:
    ev = evals(run)
    return 100 * (ev[-1]["eval_accuracy"] - ev[0]["eval_accuracy"])


def acc_at_samples(run: list[dict], fraction: float) -> float:
    """Accuracy (points) of the last evaluation within ``fraction`` of the run's training samples."""
    ev = evals(run)
    budget = fraction * ev[-1]["samples"]
    return 100 * [r for r in ev if r["samples"] <= budget][-1]["eval_accuracy"]


def gain_per_100k_tokens(run: list[dict]) -> float:
    """Held-out accuracy gain (points) per 100,000 sampled completion tokens of training."""
    return 100_000 * gain(run) / max(evals(run)[-1]["completion_tokens"], 1)


def prior_drop(run: list[dict]) -> float:
    """How much of the prior skill was lost (points): prior accuracy at the start − at the end."""
    ev = evals(run)
    return 100 * (ev[0]["prior_accuracy"] - ev[-1]["prior_accuracy"])


def worst_domain_margin(run: list[dict], experts: dict) -> float:
    """min over domains of the student's final accuracy there − that domain's expert's (points)."""
    by = evals(run)[-1]["eval_accuracy_by_domain"]
    return min(100 * by[d] - acc for d, acc in experts.items())


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str                 # what d is, in words (its sign: > 0 if the claim holds)
    runs: tuple[str, ...]       # RUNS it needs
    value: object = None        # (runs of one seed: name -> metric rows, Refs) -> d
    needs: str | None = None    # an asset beyond its runs' (see ASSET_MISSING)

    def why_not(self, assets: set[str]) -> str | None:
        for need in [self.needs, *(NEEDS.get(r) for r in self.runs)]:
            if need and need not in assets:
                return ASSET_MISSING[need]
        return None


CLAIMS = [
    Claim("OPD beats SFT (on the teacher's samples) at equal samples", "final acc. OPD − SeqKD (points)",
          ("opd", "seqkd"), lambda r, t: final(r["opd"]) - final(r["seqkd"])),
    Claim("OPD beats SFT (on reference answers) at equal samples", "final acc. OPD − SFT (points)", ("opd", "sft"),
          lambda r, t: final(r["opd"]) - final(r["sft"])),
    Claim("OPD reaches GRPO's accuracy with far fewer samples",
          "acc. of OPD at 1/4 of the samples − GRPO's final acc. (points)", ("opd", "grpo"),
          lambda r, t: acc_at_samples(r["opd"], 0.25) - final(r["grpo"])),
    Claim("OPSD is more token-efficient than GRPO",
          "gain per 100k completion tokens, OPSD − GRPO (points)", ("opsd", "grpo"),
          lambda r, t: gain_per_100k_tokens(r["opsd"]) - gain_per_100k_tokens(r["grpo"])),
    Claim("SDFT learns the new skill with less forgetting than SFT",
          "prior-skill acc. drop, SFT − SDFT EMA (points)", ("sdft", "sft"),
          lambda r, t: prior_drop(r["sft"]) - prior_drop(r["sdft"]), needs="prior"),
    Claim("SDFT (frozen teacher) learns the new skill with less forgetting than SFT",
          "prior-skill acc. drop, SFT − SDFT frozen (points)", ("sdft-frozen", "sft"),
          lambda r, t: prior_drop(r["sft"]) - prior_drop(r["sdft-frozen"]), needs="prior"),
    Claim("SDPO beats GRPO at equal samples", "final acc. SDPO − GRPO (points)", ("sdpo", "grpo"),
          lambda r, t: final(r["sdpo"]) - final(r["grpo"])),
    Claim("SDPO (frozen teacher) beats GRPO at equal samples", "final acc. SDPO frozen − GRPO (points)",
          ("sdpo-frozen", "grpo"), lambda r, t: final(r["sdpo-frozen"]) - final(r["grpo"])),
    Claim("ExOPD >= OPD (λ = 1.25)", "final acc. G-OPD λ=1.25 − λ=1 (points)", ("gopd-1.25", "gopd-1"),
          lambda r, t: final(r["gopd-1.25"]) - final(r["gopd-1"])),
    Claim("ExOPD >= OPD (λ = 2)", "final acc. G-OPD λ=2 − λ=1 (points)", ("gopd-2", "gopd-1"),
          lambda r, t: final(r["gopd-2"]) - final(r["gopd-1"])),
    Claim("ExOPD can exceed an imperfect teacher", "final acc. G-OPD λ=1.25 − the teacher's (points)",
          ("gopd-1.25",), lambda r, t: final(r["gopd-1.25"]) - t.teacher),
    Claim("reward correction with the teacher's base helps",
          "final acc. G-OPD λ=1.25 ref=teacher base − ref=student init (points)", ("gopd-1.25-base", "gopd-1.25"),
          lambda r, t: final(r["gopd-1.25-base"]) - final(r["gopd-1.25"])),
    Claim("a multi-teacher student >= each expert on its domain",
          "per-domain acc. of the G-OPD λ=1.25 student − the expert's, worst domain (points)", ("multi-1.25",),
          lambda r, t: worst_domain_margin(r["multi-1.25"], t.experts)),
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


def table(results: dict[int, dict[str, list[dict]]], refs: Refs, assets: set[str]) -> tuple[str, list]:
    """The claims table (markdown) and, per measured claim, its per-seed values (for the plot)."""
    seeds = sorted(results)
    lines = ["| claim | metric (> 0: as claimed) | per seed | mean ± spread | verdict |", "|---|---|---|---|---|"]
    measured = []
    for c in CLAIMS:
        why = c.why_not(assets)
        if why:
            lines.append(f"| {c.text} | {c.metric} | — | — | not measured: {why} |")
            continue
        vals = [c.value(results[s], refs) for s in seeds]
        m, sd, v = verdict(vals)
        per = ", ".join(f"{x:+.1f}" for x in vals)
        lines.append(f"| {c.text} | {c.metric} | {per} | {m:+.1f} ± {sd:.1f} | **{v}** |")
        measured.append((c.text, vals))
    return "\n".join(lines) + "\n", measured


def _start_end(runs: list[list[dict]], key: str) -> str:
    """Mean over seeds of ``key`` at the first and the last evaluation (points), or — if not logged."""
    if not all(key in evals(r)[0] for r in runs):
        return "—"
    start = statistics.fmean(100 * evals(r)[0][key] for r in runs)
    return f"{start:.1f} → {statistics.fmean(100 * evals(r)[-1][key] for r in runs):.1f}"


def runs_table(results: dict[int, dict[str, list[dict]]], refs: Refs, lrs: dict[str, float]) -> str:
    """Every run: options, lr, start → final per seed, its gain (does it learn?) and the prior skill."""
    seeds = sorted(results)
    lines = ["| run | options | lr | " + " | ".join(f"seed {s}: start → final" for s in seeds)
             + " | gain, mean ± spread | learns? | prior skill, start → final (mean) "
             "| self-teacher with context, start → final (mean) |",
             "|---|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for name, opts in RUNS.items():
        if not all(name in results[s] for s in seeds):
            continue
        runs = [results[s][name] for s in seeds]
        cells = [f"{100 * evals(r)[0]['eval_accuracy']:.1f} → {final(r):.1f}" for r in runs]
        m, sd, v = verdict([gain(r) for r in runs])
        learns = {"holds": "yes", "does not hold": "no (loses)", "mixed": "no (within spread)"}[v]
        prior, teacher = (_start_end(runs, key) for key in ("prior_accuracy", "teacher_context_accuracy"))
        lines.append(f"| {name} | `{' '.join(opts)}` | {lrs[name]:g} | " + " | ".join(cells)
                     + f" | {m:+.1f} ± {sd:.1f} | {learns} | {prior} | {teacher} |")
    text = "\n".join(lines) + f"\n\nThe external teacher's held-out accuracy: {refs.teacher:.1f}%."
    multi = next(n for n, need in NEEDS.items() if need == "experts")
    if refs.experts and all(multi in results[s] for s in seeds):
        by = {d: statistics.fmean(100 * evals(results[s][multi])[-1]["eval_accuracy_by_domain"][d]
                                  for s in seeds) for d in refs.experts}
        text += (" Domain experts on their domain: " + ", ".join(f"`{d}` {a:.1f}%" for d, a in refs.experts.items())
                 + "; the multi-teacher student at the end (mean): "
                 + ", ".join(f"`{d}` {a:.1f}%" for d, a in by.items()) + ".")
    return text + "\n"


def plot(measured: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"holds": "tab:green", "does not hold": "tab:red", "mixed": "tab:grey"}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * max(1, len(measured))))
    for i, (text, vals) in enumerate(measured):
        m, s, v = verdict(vals)
        ax.errorbar([m], [i], xerr=[s], fmt="o", color=colors[v], capsize=3, label=v)
        ax.plot(vals, [i] * len(vals), "x", color="k", alpha=0.6)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(measured)), [t for t, _ in measured], fontsize=8)
    ax.invert_yaxis()
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower left")
    ax.set(xlabel="claim metric d (> 0: as claimed): mean ± sample std over seeds; x: each seed", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _task(preset: str, ops: str | None = None, eval_size: int | None = None):
    from .task import ArithmeticTask

    p = cli.PRESETS[preset]
    return ArithmeticTask(p["digits"], ops or p["ops"], eval_size=eval_size or p["eval_size"])


def assets(preset: str, log=print) -> tuple[set[str], dict]:
    """The benchmark assets a preset has (see `NEEDS`), building them if needed; and its experts' dirs."""
    from .bench_assets import bundled_experts, bundled_teacher

    p, task = cli.PRESETS[preset], _task(preset)
    have = set()
    if (bundled_teacher(p, task, log) / "base" / "config.json").exists():
        have.add("base")
    experts = {d: str(path) for d, path in bundled_experts(p, task, log).items()}
    if experts:
        have.add("experts")
    if p.get("prior_ops"):
        have.add("prior")
    return have, experts


def references(preset: str, eval_size: int, experts: dict) -> Refs:
    """The external teacher's greedy held-out accuracy on the runs' test set, and each expert's on
    its own domain of the multi-teacher run's test set (points)."""
    import torch

    from . import rollout as R
    from .bench_assets import bundled_teacher
    from .models import load
    from .tokenizer import load_tokenizer

    torch.set_num_threads(1)
    task = _task(preset, eval_size=eval_size)
    path = bundled_teacher(cli.PRESETS[preset], task)
    teacher = 100 * R.evaluate(load(path), load_tokenizer(path), task, task.eval_examples())
    accs = {}
    if experts:
        both = _task(preset, ops="".join(experts), eval_size=eval_size)
        for d, path in experts.items():
            exs = [ex for ex in both.eval_examples() if both.domain(ex) == d]
            accs[d] = 100 * R.evaluate(load(path), load_tokenizer(path), both, exs)
    return Refs(teacher, accs)


def _train_all(jobs: list[tuple[list[str], Path]], log, workers: int = 1) -> list[list[dict]]:
    """Run ``python -m opd_train ARGV --out OUT`` for each job; its metrics rows, in job order.

    One worker runs them in this process, one after another; more run that many subprocesses at
    once (each run uses one CPU thread, ``--threads 1``, so 2 workers fill 2 cores; the claims use
    accuracies and sample counts, never times)."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from .train import main as train_main

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


def _load_all(jobs: list[tuple[list[str], Path]]) -> list[list[dict]]:
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


def run_options(name: str, experts: dict) -> list[str]:
    """A run's method options, plus one --domain-teacher per expert for the multi-teacher run."""
    extra = [f"--domain-teacher={d}={path}" for d, path in experts.items()] if NEEDS.get(name) == "experts" else []
    return [*RUNS[name], *extra]


def tune(shared: list[str], out: Path, log=print, names=None, experts=None, workers: int = 1) -> dict[str, float]:
    """Per run: the lr of `LR_GRID` with the best final validation accuracy (ties: the smaller lr)."""
    names = list(names or RUNS)
    jobs = [([*run_options(name, experts or {}), *shared, "--lr", repr(lr), "--eval-split", "validation",
              "--seed", str(TUNE_SEED)], out / "tune" / f"{name}-lr{lr:g}") for name in names for lr in LR_GRID]
    finals = iter([final(rows) for rows in _train_all(jobs, log, workers)])
    best = {}
    for name in names:
        scores = [(next(finals), -lr) for lr in LR_GRID]
        best[name] = -max(scores)[1]
        log(f"tune {name}: " + ", ".join(f"lr {lr:g} -> {acc:.1f}%" for (acc, _), lr in zip(scores, LR_GRID))
            + f"; chosen {best[name]:g}")
    return best


def tuned_lrs(preset: str, steps: int) -> dict[str, float] | None:
    """The committed lr choice of `--tune` for this preset and budget, if there is one."""
    if not TUNED_LRS.exists():
        return None
    entry = json.loads(TUNED_LRS.read_text()).get(preset)
    return entry["lr"] if entry and entry["steps"] == steps else None


def run_claims(preset: str, seeds: list[int], steps: int | None, out: Path, extra: list[str],
               docs: Path | None, log=print, tuned: bool = False, workers: int = 1, report: bool = False) -> str:
    """Tune (``tuned``), train every run per seed and write the tables; with ``report``, train
    nothing and rebuild the tables from the runs already in ``out`` (each checked against the
    options it should have been run with)."""
    p = cli.PRESETS[preset]
    steps = steps or p["steps"]
    eval_size = p["eval_size"]
    shared = ["--preset", preset, "--steps", str(steps), "--lr-schedule", "cosine",
              "--warmup-steps", str(max(1, steps // 20)), *extra]
    have, experts = assets(preset, log)
    names = [n for n in RUNS if NEEDS.get(n) is None or NEEDS[n] in have]
    committed = tuned_lrs(preset, steps)
    if tuned and report:
        raise ValueError("--tune with --report: a report trains nothing")
    if tuned:
        lrs = tune(shared, out, log, names, experts, workers)
        if docs is not None:  # the chosen values become the committed defaults of this preset and budget
            table_ = json.loads(TUNED_LRS.read_text()) if TUNED_LRS.exists() else {}
            table_[preset] = {"steps": steps, "grid": list(LR_GRID), "seed": TUNE_SEED, "lr": lrs}
            TUNED_LRS.write_text(json.dumps(table_, indent=1, sort_keys=True) + "\n")
        lr_text = (f"lr per run: the best of the grid {', '.join(f'{x:g}' for x in LR_GRID)} on the validation "
                   f"split (seed {TUNE_SEED})")
    elif committed and all(n in committed for n in names):
        lrs = committed
        lr_text = (f"lr per run from `--tune` (grid {', '.join(f'{x:g}' for x in LR_GRID)}, validation split, "
                   f"seed {TUNE_SEED}; committed in opd_train/{TUNED_LRS.name})")
    else:
        lrs = {name: p["lr"] for name in names}
        lr_text = f"every run at lr {p['lr']:g} (not tuned per run)"
    jobs = [([*run_options(name, experts), *shared, "--lr", repr(lrs[name]), "--seed", str(seed)],
             out / f"seed{seed}" / name) for seed in seeds for name in names]
    done = iter(_load_all(jobs) if report else _train_all(jobs, log, workers))
    results = {seed: {name: next(done) for name in names} for seed in seeds}
    refs = references(preset, eval_size, experts)
    tab, measured = table(results, refs, have)
    if report:
        lr_text += f"; tables rebuilt with --report from the runs in {out}"
    title = (f"opd_train.compare --claims: {preset} preset, {steps} steps per run, seeds "
             f"{', '.join(map(str, seeds))}; {lr_text}, warmup + cosine. d per seed, mean ± sample std over "
             "seeds; holds: mean > 0 and > spread; does not hold: mean < 0 and |mean| > spread; else mixed.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(f"{title}\n\n{tab}")
    (out / "claims_runs.md").write_text(f"Runs behind claims.md ({preset} preset, {steps} steps).\n\n"
                                        + runs_table(results, refs, lrs))
    plot(measured, out / "claims.png", f"claims, {preset} preset, {len(seeds)} seeds")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in ("claims.md", "claims_runs.md", "claims.png"):
            shutil.copyfile(out / f, docs / f)
        readme = docs.parents[1] / "README.md"
        if readme.exists():
            copy_to_readme(docs, readme)
    return tab


def copy_to_readme(docs: Path, readme: Path) -> None:
    """Replace the README's ``<!-- compare: claims -->`` and ``<!-- compare: claims_runs -->``
    blocks by the tables of ``docs/claims.md`` and ``docs/claims_runs.md`` (after their title)."""
    text, end = readme.read_text(), "<!-- compare: end -->"
    for name in ("claims", "claims_runs"):
        start = f"<!-- compare: {name} -->\n"
        if start not in text or end not in text.split(start, 1)[1]:
            raise ValueError(f"{readme}: no block '{start.strip()} ... {end}' to replace")
        body = (docs / f"{name}.md").read_text().split("\n\n", 1)[1].strip()
        before, rest = text.split(start, 1)
        text = before + start + body + "\n" + end + rest.split(end, 1)[1]
    readme.write_text(text)
