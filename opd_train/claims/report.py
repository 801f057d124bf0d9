"""The claims' outputs: the claims table, the runs table, the plot, and the README copy.

Every number of an accuracy sits beside the evaluation's noise floor: the binomial standard
deviation ``sqrt(p (1 − p) / n)`` of a greedy accuracy ``p`` measured on ``n`` held-out prompts (at
``n`` = 256, one prompt is 0.39 points and the floor at p = 50% is 3.1 points).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .runs import NEEDS, RUNS
from .verdict import CLAIMS, Refs, Verdict, evals, final, gain, verdict


def noise(p: float, n: int) -> float:
    """The binomial sd (points) of an accuracy ``p`` (points) measured on ``n`` prompts."""
    q = min(max(p / 100, 0.0), 1.0)
    return 100 * math.sqrt(q * (1 - q) / max(n, 1))


def eval_size(results: dict, default: int) -> int:
    """The held-out set size the runs logged (``eval_size`` in their evaluation rows), else ``default``."""
    for runs in results.values():
        for run in runs.values():
            return evals(run)[-1].get("eval_size", default)
    return default


def _shown(v: Verdict, ratio: bool) -> str:
    """``mean [low, high]``: points, or for a budget claim the ratio ``10^d``."""
    if v.mean is None:
        return "—"
    f = (lambda d: f"{10 ** d:.3g}×") if ratio else (lambda d: f"{d:+.1f}")  # noqa: E731
    return f(v.mean) + ("" if v.low is None else f" [{f(v.low)}, {f(v.high)}]")


def _claim_noise(c, runs_by_seed: list[dict], refs: Refs, n: int) -> str:
    if c.ratio:  # where the target is crossed: the floor at the target accuracy
        target = statistics.fmean(c.target(r, refs) for r in runs_by_seed)
        return f"±{noise(target, n):.1f} at the target {target:.1f}%"
    key = "prior_accuracy" if c.needs == "prior" else "eval_accuracy"
    ps = [statistics.fmean(100 * evals(r[name])[-1][key] for r in runs_by_seed) for name in c.runs]
    return f"±{math.sqrt(sum(noise(p, n) ** 2 for p in ps)):.1f}"


def table(results: dict[int, dict[str, list[dict]]], refs: Refs, assets: set[str], lrs: dict[str, float],
          n_eval: int) -> tuple[str, list]:
    """The claims table (markdown) and, per measured claim, (text, verdict, per-seed d) for the plot."""
    from .runs import ASSET_MISSING

    seeds = sorted(results)
    n = eval_size(results, n_eval)
    lines = ["| claim | metric and axis (as claimed: > 0, or ratio > 1×) | regime | runs (lr) | per seed "
             "| mean [95% interval] | eval noise (1 sd) | verdict |", "|---|---|---|---|---|---|---|---|"]
    measured = []
    for c in CLAIMS:
        runs = ", ".join(f"{r} ({lrs[r]:g})" if r in lrs else r for r in c.runs)
        missing = next((need for need in [c.needs, *(NEEDS.get(r) for r in c.runs)] if need and need not in assets),
                       None)
        if missing:
            lines.append(f"| {c.text} | {c.metric} | {c.regime} | {runs} | — | — | — | "
                         f"not measured: {ASSET_MISSING[missing]} |")
            continue
        vals = [c.value(results[s], refs) for s in seeds]
        v = verdict(vals)
        per = ", ".join(x.text for x in vals) if c.ratio else ", ".join(f"{x:+.1f}" for x in vals)
        floor = _claim_noise(c, [results[s] for s in seeds], refs, n)
        lines.append(f"| {c.text} | {c.metric} | {c.regime} | {runs} | {per} | {_shown(v, c.ratio)} | {floor} "
                     f"| **{v.text}** |")
        measured.append((c.text, v, [x.d if c.ratio else x for x in vals]))
    return "\n".join(lines) + "\n", measured


def _start_end(runs: list[list[dict]], key: str) -> str:
    """Mean over seeds of ``key`` at the first and the last evaluation (points), or — if not logged."""
    if not all(key in evals(r)[0] for r in runs):
        return "—"
    start = statistics.fmean(100 * evals(r)[0][key] for r in runs)
    return f"{start:.1f} → {statistics.fmean(100 * evals(r)[-1][key] for r in runs):.1f}"


LEARNS = {"holds": "yes", "does not hold": "no (loses)"}


def runs_table(results: dict[int, dict[str, list[dict]]], refs: Refs, lrs: dict[str, float],
               tuned: set[str] | None = None, n_eval: int = 256) -> str:
    """Every run: options, lr, start → final per seed, its gain (does it learn?) and the prior skill."""
    seeds = sorted(results)
    n = eval_size(results, n_eval)
    lines = ["| run | options | lr | " + " | ".join(f"seed {s}: start → final" for s in seeds)
             + " | gain, mean [95% interval] | eval noise at the final acc. (1 sd) | learns? "
             "| prior skill, start → final (mean) | self-teacher with context, start → final (mean) |",
             "|---|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for name, opts in RUNS.items():
        if not all(name in results[s] for s in seeds):
            continue
        runs = [results[s][name] for s in seeds]
        cells = [f"{100 * evals(r)[0]['eval_accuracy']:.1f} → {final(r):.1f}" for r in runs]
        v = verdict([gain(r) for r in runs])
        learns = LEARNS.get(v.text, "not shown (" + v.text + ")")
        prior, teacher = (_start_end(runs, key) for key in ("prior_accuracy", "teacher_context_accuracy"))
        lr = f"{lrs[name]:g}" + ("" if tuned is None or name in tuned else " (preset lr, not tuned)")
        floor = noise(statistics.fmean(final(r) for r in runs), n)
        lines.append(f"| {name} | `{' '.join(opts)}` | {lr} | " + " | ".join(cells)
                     + f" | {_shown(v, False)} | ±{floor:.1f} | {learns} | {prior} | {teacher} |")
    text = "\n".join(lines) + f"\n\nHeld-out prompts per evaluation: {n}. The external teacher's held-out accuracy: {refs.teacher:.1f}%."
    multi = next(name for name, need in NEEDS.items() if need == "experts")
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

    colors = {"holds": "tab:green", "does not hold": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * max(1, len(measured))))
    for i, (text, v, vals) in enumerate(measured):
        color = colors.get(v.text.split(" (")[0], "tab:grey")
        if v.mean is not None:
            err = [[v.mean - v.low], [v.high - v.mean]] if v.low is not None else None
            ax.errorbar([v.mean], [i], xerr=err, fmt="o", color=color, capsize=3, label=v.text.split(" (")[0])
        ax.plot([x for x in vals if x is not None], [i] * sum(x is not None for x in vals), "x", color="k", alpha=0.6)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(measured)), [t for t, _, _ in measured], fontsize=7)
    ax.invert_yaxis()
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower left")
    ax.set(xlabel="d (> 0: as claimed): points, or log10 of a budget ratio; mean and 95% t interval over seeds; "
                  "x: each seed", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
