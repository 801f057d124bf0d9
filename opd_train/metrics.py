"""Run outputs besides checkpoints: the JSONL metrics log, the curves plot and the final report."""
from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    """Append-only JSONL (rank 0 only); on resume, rows after the checkpoint's step are dropped first.

    Training rows hold ``step, loss, reward, tokens_per_s, samples, time_s`` and the method's
    extras; evaluation rows ``step, eval_accuracy, samples``.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled, self.rows = path, enabled, []
        if enabled and keep_until is not None and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= keep_until]
        if enabled:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if "eval_accuracy" in r]


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in evals], [100 * r["eval_accuracy"] for r in evals], "o-")
    a.set(xlabel="step", ylabel="held-out exact match (%)", title="accuracy", ylim=(-2, 102))
    b.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    b.set(xlabel="step", ylabel="loss", title="training loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(metrics: Metrics, out: Path, title: str, n_eval: int, train_seconds: float, log) -> dict:
    """Write ``curves.png``, log the before -> after line and return it as a dict."""
    before, after = metrics.evals[0], metrics.evals[-1]
    plot_curves(metrics.rows, out / "curves.png", title)
    gain = 100 * (after["eval_accuracy"] - before["eval_accuracy"])
    log(f"held-out exact match ({n_eval} prompts, greedy): "
        f"before {100 * before['eval_accuracy']:.1f}% -> after {100 * after['eval_accuracy']:.1f}% "
        f"({gain:+.1f} points) after {after['step']} steps, {train_seconds:.0f}s of training; "
        f"outputs in {out}")
    return {"before": before["eval_accuracy"], "after": after["eval_accuracy"],
            "train_seconds": train_seconds, "out": str(out)}
