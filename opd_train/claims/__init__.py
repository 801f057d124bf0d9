"""``python -m opd_train.compare --claims``: the survey's headline claims, each measured the way its
paper measures it, over seeds.

* `opd_train.claims.runs`: which runs (`RUNS`: each method as its paper runs it, on the ``bench``
  preset, `opd_train.cli`; its assets: `opd_train.bench_assets`), their lrs, and the pool that
  trains them (``--jobs``);
* `opd_train.claims.verdict`: what each claim measures per seed (`CLAIMS`: an accuracy
  difference, or the ratio of the budgets two runs spend to reach a target accuracy, with the
  paper's metric and axis and the regime the row tests) and the verdict from a paired 95% t
  interval over the seeds;
* `opd_train.claims.report`: the tables (with the evaluation's noise floor beside each number),
  the plot, the README copy.

A claim whose runs need an asset the preset lacks (a teacher with a kept pre-RL base, domain
experts, a strong teacher, a prior-skill evaluation: `runs.ASSET_MISSING`) is listed as *not
measured* with the reason, never guessed. Outputs: ``OUT/claims.md`` (one row per claim),
``OUT/claims_runs.md`` (every run per seed, whether it learns, its prior skill),
``OUT/claims.png``; copied to ``docs/compare/`` unless ``--preset smoke`` (the CI check) or
``--no-docs``. ``--report`` rebuilds them from the runs already in ``OUT``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import cli
from . import report, runs, verdict

__all__ = ["report", "run_claims", "runs", "verdict"]


def run_claims(preset: str, seeds: list[int], steps: int | None, out: Path, extra: list[str],
               docs: Path | None, log=print, tuned: bool = False, workers: int = 1, report_only: bool = False,
               tune_only: list[str] | None = None) -> str:
    """Tune (``tuned``; only the runs ``tune_only`` when given, the others keeping their committed lr), train every run per seed and write the tables; with ``report_only``, train
    nothing and rebuild the tables from the runs already in ``out`` (each checked against the
    options it should have been run with)."""
    p = cli.PRESETS[preset]
    steps = steps or p["steps"]
    shared = ["--preset", preset, "--steps", str(steps), "--lr-schedule", "cosine",
              "--warmup-steps", str(max(1, steps // 20)), *extra]
    have, paths = runs.assets(preset, log)
    names = [n for n in runs.RUNS if runs.NEEDS.get(n) is None or runs.NEEDS[n] in have]
    if tuned and report_only:
        raise ValueError("--tune with --report: a report trains nothing")
    grid = ", ".join(f"{x:g}" for x in runs.LR_GRID)
    if tune_only and set(tune_only) - set(names):
        raise ValueError(f"--tune-only: unknown or unmeasurable runs {sorted(set(tune_only) - set(names))}")
    if tuned:
        lrs = runs.tune(shared, out, log, [n for n in names if not tune_only or n in tune_only], paths, workers)
        if tune_only:
            lrs = {**runs.tuned_lrs(preset, steps), **lrs}
            missing = [n for n in names if n not in lrs]
            if missing:
                raise ValueError(f"--tune-only: runs {missing} have no committed lr; tune them too")
        if docs is not None:  # the chosen values become the committed defaults of this preset and budget
            table_ = json.loads(runs.TUNED_LRS.read_text()) if runs.TUNED_LRS.exists() else {}
            table_[preset] = {"steps": steps, "grid": list(runs.LR_GRID), "seed": runs.TUNE_SEED, "lr": lrs}
            runs.TUNED_LRS.write_text(json.dumps(table_, indent=1, sort_keys=True) + "\n")
        lr_text = f"lr per run: the best of the grid {grid} on the validation split (seed {runs.TUNE_SEED})"
    else:
        committed = runs.tuned_lrs(preset, steps)
        lrs = {name: committed.get(name, p["lr"]) for name in names}
        tuned_names = set(committed) & set(names)
        lr_text = (f"lr per run from `--tune` (grid {grid}, validation split, seed {runs.TUNE_SEED}; committed in "
                   f"opd_train/{runs.TUNED_LRS.name}) where committed, else the preset's {p['lr']:g} (runs table)"
                   if tuned_names else f"every run at lr {p['lr']:g} (not tuned per run)")
    tuned_set = set(names) if tuned else set(runs.tuned_lrs(preset, steps)) & set(names)
    jobs = [([*runs.run_options(name, paths), *shared, "--lr", repr(lrs[name]), "--seed", str(seed)],
             out / f"seed{seed}" / name) for seed in seeds for name in names]
    done = iter(runs.load_all(jobs) if report_only else runs.train_all(jobs, log, workers))
    results = {seed: {name: next(done) for name in names} for seed in seeds}
    refs = runs.references(preset, p["eval_size"], paths.get("experts", {}))
    tab, measured = report.table(results, refs, have, lrs, p["eval_size"])
    if report_only:
        lr_text += f"; tables rebuilt with --report from the runs in {out}"
    title = (f"opd_train.compare --claims: {preset} preset, {steps} steps per run, seeds "
             f"{', '.join(map(str, seeds))}; {lr_text}, warmup + cosine. d per seed; the verdict from a paired "
             "95% t interval over seeds (holds: wholly > 0; does not hold: wholly < 0; else inconclusive); "
             "budget claims as ratios (> 1×: as claimed), \"not reached\" where a run never reached the target.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(f"{title}\n\n{tab}")
    (out / "claims_runs.md").write_text(f"Runs behind claims.md ({preset} preset, {steps} steps).\n\n"
                                        + report.runs_table(results, refs, lrs, tuned_set, p["eval_size"]))
    report.plot(measured, out / "claims.png", f"claims, {preset} preset, {len(seeds)} seeds")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in ("claims.md", "claims_runs.md", "claims.png"):
            shutil.copyfile(out / f, docs / f)
        readme = docs.parents[1] / "README.md"
        if readme.exists():
            report.copy_to_readme(docs, readme)
    return tab
