"""``python -m opd_train.compare``: every method on the same budget and seed, one table, one plot.

Each method runs as its own ``python -m opd_train`` process with the same preset, steps,
completions per step (``--batch-size``) and seed, so all see the same number of sampled or
dataset completions. The bundled teacher and student are pre-trained (or found in the cache)
first, so no method's wall time includes pre-training. Writes ``OUT/compare.md`` (final
held-out accuracy, accuracy at fixed sample budgets, time in training steps and process wall
time, tokens/s) and
``OUT/compare.png``: accuracy against one of the budgets every run logs (`opd_train.budget`),
``--x samples`` (training completions), ``tokens`` (generated tokens: the student's samples, or
the teacher's for seqkd; sft generates none), ``flops`` (estimated training + sampling + teacher
FLOPs) or ``seconds`` (seconds in training steps).

``--claims`` instead checks the survey's headline claims over several seeds (`opd_train.claims`):
``python -m opd_train.compare --claims`` (bench preset, 5 seeds, writes
``docs/compare/claims.md``) or ``--claims --preset smoke`` (a quick end-to-end check).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import cli
from .argtypes import pos_int
from .methods import METHODS


def prepare_models(preset: str) -> None:
    """Pre-train/cache the bundled models once, outside the timed runs."""
    import torch

    from .bench_assets import bundled_teacher
    from .models import PRETRAIN_SEED, get_pretrained
    from .task import ArithmeticTask

    torch.set_num_threads(1)
    p = cli.PRESETS[preset]
    task = ArithmeticTask(p["digits"], p["ops"], eval_size=p["eval_size"])
    bundled_teacher(p, task)
    get_pretrained("student", p["student"], task, PRETRAIN_SEED)


def accuracy_at(evals: list[dict], samples: int) -> float:
    """Held-out accuracy of the last evaluation made within ``samples`` training completions."""
    seen = [r for r in evals if r["samples"] <= samples]
    return seen[-1]["eval_accuracy"] if seen else float("nan")


# --x -> (how to read it from an evaluation row, axis label)
X_AXES = {
    "samples": (lambda r: r["samples"], "training completions (samples)"),
    "tokens": (lambda r: r["generated_tokens"] + r["teacher_generated_tokens"],
               "generated tokens (student samples; seqkd: the teacher's)"),
    "flops": (lambda r: r["flops"], "estimated FLOPs (training + sampling + teacher passes)"),
    "seconds": (lambda r: r["time_s"], "seconds in training steps"),
}


def summarize(runs: dict[str, dict], out: Path, title: str, x: str = "samples") -> str:
    total = min(max(r["samples"] for r in run["evals"]) for run in runs.values())
    budgets = [total // 4, total // 2]
    head = ("| method | final acc. | " + " | ".join(f"acc. @ {b:,} samples" for b in budgets)
            + " | train time (s) | wall time (s) | train tokens/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, run in runs.items():
        ev = run["evals"]
        cells = [f"{100 * ev[0]['eval_accuracy']:.1f} → **{100 * ev[-1]['eval_accuracy']:.1f}**"]
        cells += [f"{100 * accuracy_at(ev, b):.1f}" for b in budgets]
        cells += [f"{run['train_seconds']:.0f}", f"{run['wall']:.0f}", f"{statistics.median(run['tokens_per_s']):,.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(f"{title}\n\n{table}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    read, label = X_AXES[x]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        ax.plot([read(r) for r in run["evals"]], [100 * r["eval_accuracy"] for r in run["evals"]],
                "o-", ms=3, label=name)
    ax.set(xlabel=label, ylabel="held-out exact match (%)", ylim=(-2, 102), title=title)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_train.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(cli.PRESETS), default=None,
                   help="default: 'default', or 'bench' with --claims (the bundled benchmark of all methods)")
    p.add_argument("--claims", action="store_true", help="check the headline claims over --seeds instead")
    p.add_argument("--tune", action="store_true",
                   help="--claims: choose each run's lr from a shared grid on the validation split first")
    p.add_argument("--tune-only", nargs="+", metavar="RUN",
                   help="--claims --tune: tune only these runs (names as in the runs table); the others keep "
                        "their committed lr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds of --claims (the verdicts' t intervals need at least 2; 5 by default)")
    p.add_argument("--report", action="store_true",
                   help="--claims: train nothing; rebuild the tables from the runs already in --out")
    p.add_argument("--jobs", type=pos_int, default=1,
                   help="--claims: runs at once, each a subprocess on one CPU thread (2 on a 2-core machine)")
    p.add_argument("--no-docs", action="store_true",
                   help="--claims: do not copy the results to docs/compare (never copied with --preset smoke)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--x", choices=sorted(X_AXES), default="samples",
                   help="the plot's x-axis: a budget every run logs (samples, generated tokens, estimated FLOPs, "
                        "seconds in training steps)")
    p.add_argument("--steps", type=pos_int, help="steps per method (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: runs/compare (runs/claims with --claims)")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after '--': more options passed to every run (e.g. -- --batch-size 64)")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "bench" if args.claims else "default"
    out = Path(args.out or ("runs/claims" if args.claims else "runs/compare"))
    if args.tune_only and not (args.claims and args.tune):
        p.error("--tune-only needs --claims --tune")
    if args.claims:
        from .claims import run_claims

        docs = None if args.no_docs or args.preset == "smoke" else Path(__file__).resolve().parents[1] / "docs" / "compare"
        print(run_claims(args.preset, args.seeds, args.steps, out, [a for a in args.extra if a != "--"], docs,
                         tuned=args.tune, workers=args.jobs, report_only=args.report, tune_only=args.tune_only))
        print(f"wrote {out / 'claims.md'}" + (f" (and copied it to {docs})" if docs else ""))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    print(f"preparing the bundled models ({args.preset} preset) ...", flush=True)
    prepare_models(args.preset)

    runs = {}
    for m in args.methods:
        cmd = [sys.executable, "-m", "opd_train", "--method", m, "--preset", args.preset,
               "--seed", str(args.seed), "--out", str(out / m), *extra]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        rows = [json.loads(line) for line in (out / m / "metrics.jsonl").read_text().splitlines()]
        runs[m] = {"wall": time.perf_counter() - t0, "evals": [r for r in rows if "eval_accuracy" in r],
                   "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r],
                   "train_seconds": max(r.get("time_s", 0.0) for r in rows)}
    steps = args.steps or cli.PRESETS[args.preset]["steps"]
    title = f"opd_train.compare: {args.preset} preset, {steps} steps, seed {args.seed}"
    print(summarize(runs, out, title, args.x))
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
