"""Every metrics row logs the run's budgets (`opd_train.budget`), and compare plots against each."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from opd_train import budget, compare
from opd_train.train import main
from test_train import SMOKE, rows, smoke_models  # noqa: F401  (fixture)


def n_params(path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


@pytest.mark.parametrize("method", ["sft", "seqkd", "opd", "sdpo"])
def test_every_row_logs_the_budgets(method, tmp_path, smoke_models):
    out = tmp_path / "run"
    assert main(["--method", method, *SMOKE, "--out", str(out)]) == 0
    rs = rows(out)
    train, evals = [r for r in rs if "loss" in r], [r for r in rs if "eval_accuracy" in r]
    assert all(set(budget.KEYS) <= set(r) for r in rs)
    assert [r["optimizer_steps"] for r in train] == [1, 2] and evals[0]["flops"] == 0 == evals[0]["prompts"]
    last = train[-1]
    assert evals[-1] == {**evals[-1], **{k: last[k] for k in budget.COUNTS}}  # the eval row: the same totals
    spp = {"sft": 1, "seqkd": 1, "opd": 4, "sdpo": 8}[method]
    assert last["prompts"] == 2 * 16 // spp and last["samples"] == 2 * 16
    n_s, n_t = n_params(smoke_models["student"]), n_params(smoke_models["teacher"])
    assert last["flops_train"] == 6 * n_s * last["trained_tokens"] > 0
    assert last["flops_sample"] == 2 * n_s * last["generated_tokens"]
    if method in ("sft", "seqkd"):  # no student sampling; seqkd's data is the teacher's samples
        assert last["generated_tokens"] == 0
        assert (last["teacher_generated_tokens"] > 0) == (method == "seqkd")
        assert last["flops_teacher_sample"] == 2 * n_t * last["teacher_generated_tokens"]
    else:  # the sampled completion tokens are the generated ones
        assert last["generated_tokens"] == last["completion_tokens"] > 0 and last["teacher_generated_tokens"] == 0
    if method == "opd":  # the teacher scores prompt + completion of every sample
        assert last["scored_tokens"] == last["trained_tokens"] and last["flops_score"] == 2 * n_t * last["scored_tokens"]
    if method == "sdpo":  # the self-teacher (a student copy) with context, and the student's top-k pass
        assert last["scored_tokens"] > last["trained_tokens"] and last["flops_score"] == 2 * n_s * last["scored_tokens"]
    assert last["flops"] == pytest.approx(sum(last[k] for k in budget.FLOPS))
    assert 0 < last["time_s"] <= last["wall_s"]


def test_compare_plots_against_each_budget(tmp_path):
    def run(scale):
        evals = [{"step": i, "eval_accuracy": 0.1 * i, "samples": 64 * i, "generated_tokens": 300 * i,
                  "teacher_generated_tokens": 0, "flops": scale * 1e9 * i, "time_s": 2.0 * i} for i in range(3)]
        return {"evals": evals, "wall": 10.0, "tokens_per_s": [100.0], "train_seconds": 4.0}

    for x in ("samples", "tokens", "flops", "seconds"):
        out = tmp_path / x
        out.mkdir()
        table = compare.summarize({"a": run(1), "b": run(3)}, out, "t", x)
        assert "| a |" in table and (out / "compare.png").stat().st_size > 0
    assert compare.X_AXES["flops"][0](run(2)["evals"][2]) == 4e9
    with pytest.raises(SystemExit):
        compare.main(["--x", "steps"])
    assert json.dumps(sorted(compare.X_AXES)) == '["flops", "samples", "seconds", "tokens"]'
