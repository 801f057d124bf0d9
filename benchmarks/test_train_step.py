"""Smoke test of the real-vocabulary training-step benchmark: both providers run a step on a
tiny configuration and compute the same loss (the benchmark compares equal work)."""
import argparse

import pytest

import train_step


@pytest.mark.filterwarnings("ignore")
def test_both_providers_same_losses():
    base = dict(batch=1, seq=16, vocab=3001, d_student=16, d_teacher=24, steps=1, device="cpu")
    rows = [train_step.worker(argparse.Namespace(provider=p, **base)) for p in ("naive", "fused")]
    assert rows[0]["losses"] == pytest.approx(rows[1]["losses"], rel=1e-5)
    assert all(r["peak_mb_median"] >= 0 and r["step_s_median"] > 0 for r in rows)
