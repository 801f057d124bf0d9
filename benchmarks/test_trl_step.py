"""Smoke test of the DistillationTrainer step benchmark: stock TRL and the fused trainer run in
TRL's loop on a tiny configuration and compute the same losses (the benchmark compares equal work)."""
import argparse

import pytest

pytest.importorskip("trl", reason="needs the trl extra: pip install -e '.[trl]'")

import trl_step  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_both_trainers_same_losses():
    base = dict(batch=2, prompt=5, completion=6, vocab=3001, d_student=16, d_teacher=24, beta=0.5, steps=1)
    rows = [trl_step.worker(argparse.Namespace(trainer=t, **base)) for t in ("stock", "fused")]
    assert len(rows[0]["losses"]) == 2
    assert rows[0]["losses"] == pytest.approx(rows[1]["losses"], rel=1e-5)
    assert all(r["peak_mb_median"] >= 0 and r["step_s_median"] > r["no_gen_s_median"] > 0 for r in rows)
