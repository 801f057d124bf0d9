"""The method options from the reference recipes (issue #15) and ``python -m opd_train.compare --claims``.

Unit tests of the pieces (lr schedule, GRPO advantages, SDPO teacher contexts and mask, the task's
hint feedback and partial reward, teacher log-probs at given ids, the claim verdict rule and
table), method runs with the new options on the smoke preset, and the claims run end to end on
the smoke preset (about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch

import opd_kernels as ok
from opd_train import claims, cli
from opd_train.claims import verdict as V
from opd_train import rollout as R
from opd_train.methods.grpo import group_advantages
from opd_train.methods.sdpo import teacher_contexts
from opd_train.task import ArithmeticTask
from opd_train.train import lr_at, main
from test_train import SMOKE, one_line_error, rows, run_smoke, smoke_models  # noqa: F401  (fixture)


# -- learning-rate schedule ---------------------------------------------------------------------
def test_lr_schedule_constant_is_todays_and_cosine_warms_up_and_decays():
    const = argparse.Namespace(lr=1e-3, lr_schedule="constant", warmup_steps=0, steps=100)
    assert all(lr_at(const, s) == 1e-3 for s in (1, 50, 100))  # the default: unchanged behaviour
    cos = argparse.Namespace(lr=1e-3, lr_schedule="cosine", warmup_steps=10, steps=100)
    lrs = [lr_at(cos, s) for s in range(1, 101)]
    assert lrs[:10] == pytest.approx([1e-4 * k for k in range(1, 11)])  # linear warmup to the peak
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # then strictly decreasing
    assert 0 < lrs[-1] < 1e-5  # the last step still moves, barely
    assert lr_at(argparse.Namespace(lr=1e-3, lr_schedule="cosine", warmup_steps=0, steps=10), 1) < 1e-3


# -- GRPO / Dr.GRPO -----------------------------------------------------------------------------
def test_group_advantages_std_norm_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    dr = group_advantages(r, 4, std_norm=False)
    torch.testing.assert_close(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    std = group_advantages(r, 4, std_norm=True)
    torch.testing.assert_close(std[:4], dr[:4] / (r[:4].std() + 1e-4))
    assert torch.equal(std[4:], torch.zeros(4))  # a group with one reward value has no signal either way


def test_task_hint_does_not_repeat_the_attempt_and_partial_reward():
    task = ArithmeticTask(3, "+", eval_size=1)
    ex = task.make(347, 85, "+")  # answer 2340: columns 7+5+0=12 4+8+1=13 3+0+1=04, final carry 0
    assert task.hint(ex, "2340") == "right"
    assert task.hint(ex, "2350") == "col 3 carry 1"  # first wrong column (least significant = 1) and its carry in
    assert task.hint(ex, "1340") == "col 1 carry 0"
    assert task.hint(ex, "2341") == "col 4 carry 0"  # the final carry digit's column gets the last carry out
    assert task.hint(ex, "234") == task.hint(ex, "2a40") == "need 4 digits"
    ctx = task.with_context(ex, "hint", attempt="2350")
    assert ctx == "hint col 3 carry 1\n743+580=" and "2350" not in ctx
    assert "2350" in task.with_context(ex, "feedback", attempt="2350")  # the old feedback is still there
    assert [task.partial_reward(ex, a) for a in ("2340", "2350", "1351", "234")] == [1.0, 0.75, 0.25, 0.0]
    with pytest.raises(ValueError, match="unknown context kind 'x'"):
        task.with_context(ex, "x")


def test_subtraction_problems_are_held_out_too():
    task = ArithmeticTask(2, "-", eval_size=20)  # looped forever before: no "-" problem was ever held out
    held = {ex.prompt for ex in task.eval_examples()}
    assert len(held) > 5 and not held & {ex.prompt for ex in task.sample(__import__("random").Random(0), 500)}
    assert any("-" in ex.prompt for ex in ArithmeticTask(2, "+-", eval_size=40).eval_examples())


# -- SDPO teacher contexts and the self-distillation mask ----------------------------------------
def test_sdpo_teacher_contexts_sibling_self_success_and_feedback():
    task = ArithmeticTask(2, "+", eval_size=1)
    ex = task.make(12, 34, "+")  # answer 640
    exs = [ex] * 6
    texts = ["640", "650", "600", "640", "650", "640"]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # group 1: samples 0-2 (one success); group 2: 3-5 (3 is right)
    out = teacher_contexts(task, exs, texts, rewards, 3, "hint")
    # the lone success of group 1 is not its own demonstration: no context, masked out
    assert out[0] == (ex.prompt, False, False)
    assert out[1] == (task.with_context(ex, "demo", demo="640"), True, True)
    assert out[2][1:] == (True, True)
    assert out[3] == (ex.prompt, False, False)
    assert out[4] == (task.with_context(ex, "demo", demo="640"), True, True)
    # no successful sibling and a failure: feedback of the chosen kind, or nothing with "none"
    alone = teacher_contexts(task, [ex] * 2, ["650", "600"], [0.0, 0.0], 2, "hint")
    assert alone[0] == ("hint col 2 carry 0\n21+43=", True, False)
    assert teacher_contexts(task, [ex] * 2, ["650", "600"], [0.0, 0.0], 2, "attempt")[0][0] == \
        task.with_context(ex, "feedback", attempt="650")
    assert teacher_contexts(task, [ex] * 2, ["650", "600"], [0.0, 0.0], 2, "none") == [(ex.prompt, False, False)] * 2


def test_logprobs_at_equals_full_log_softmax_gather():
    torch.manual_seed(0)

    head = ok.hf.Head(torch.randn(11, 5), torch.randn(11))
    h, ids = torch.randn(3, 4, 5), torch.randint(0, 11, (3, 4, 6))
    ref = torch.log_softmax(h @ head.weight.T + head.bias, -1).gather(-1, ids)
    torch.testing.assert_close(R.logprobs_at(head, h, ids, chunk=5), ref)
    top_ids, top_lp = R.teacher_topk(head, h, 6)
    torch.testing.assert_close(R.logprobs_at(head, h, top_ids), top_lp)  # student-side ids, same numbers


# -- the new options end to end (smoke preset) ------------------------------------------------------
NEW_VARIANTS = [
    ["grpo", "--no-grpo-std-norm", "--grpo-loss-norm", "max-tokens", "--grpo-reward", "digits"],
    ["sdpo", "--sdpo-feedback", "hint", "--sdpo-topk", "8", "--sdpo-distill-weight", "0.5",
     "--lr-schedule", "cosine", "--warmup-steps", "1"],
    ["sdpo", "--sdpo-feedback", "none", "--no-sdpo-mask", "--sdpo-topk-from", "teacher", "--sdpo-topk", "5"],
    ["sdft", "--sdft-teacher", "frozen", "--sdft-skip-tokens", "1"],
    ["sdpo", "--sdpo-teacher", "frozen", "--sdpo-topk", "5"],
    ["opsd"],
]


@pytest.mark.parametrize("variant", NEW_VARIANTS, ids=lambda v: "-".join(x.lstrip("-") for x in v))
def test_new_method_options_run(variant, tmp_path, smoke_models):
    out, train, evals = run_smoke(variant, tmp_path)
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert all(r["completion_tokens"] > 0 for r in train) and train[0]["completion_tokens"] < train[1]["completion_tokens"]
    if "--lr-schedule" in variant:
        assert [r["lr"] for r in train] == [lr_at(argparse.Namespace(lr=3e-3, lr_schedule="cosine", warmup_steps=1,
                                                                     steps=2), s) for s in (1, 2)]
    else:
        assert all(r["lr"] == cli.PRESETS["smoke"]["lr"] for r in train)
    if variant[0] == "sdpo":
        assert all(0.0 <= r["context_fraction"] <= 1.0 for r in train)
    frozen = variant[0] == "opsd" or "frozen" in variant
    if variant[0] in ("sdft", "opsd", "sdpo"):  # the self-teacher's accuracy with its context, at every evaluation
        accs = [r["teacher_context_accuracy"] for r in evals]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
        assert accs[0] == accs[1] or not frozen  # a frozen teacher does not change
    if variant[0] in ("sdft", "sdpo") and frozen:  # the frozen teacher is the initial student
        from transformers import AutoModelForCausalLM

        init = AutoModelForCausalLM.from_pretrained(smoke_models["student"]).state_dict()
        ema = torch.load(out / "ckpt" / "state.pt", weights_only=False)["method"]["ema"]
        assert all(torch.equal(init[k], ema[k]) for k in init)


def test_gopd_ref_teacher_base(tmp_path, smoke_models, capsys):
    """--gopd-ref teacher-base reads TEACHER_DIR/base; a teacher without one is refused in one line."""
    common = ["--method", "gopd", "--gopd-ref", "teacher-base", *SMOKE, "--out", str(tmp_path / "run")]
    assert main(common) == 2
    assert re.search(r"--gopd-ref teacher-base: the teacher .* has no pre-RL base model", one_line_error(capsys))
    teacher = tmp_path / "teacher"
    shutil.copytree(smoke_models["teacher"], teacher)
    shutil.copytree(smoke_models["student"], teacher / "base")  # any model of the same vocabulary
    assert main([*common, "--teacher", str(teacher)]) == 0
    assert [r["step"] for r in rows(tmp_path / "run") if "eval_accuracy" in r] == [0, 2]


# -- claims: the verdict rule, the table, the smoke run --------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ([3.0, 4.0, 5.0], "holds"),               # 4 ± 4.303 · 1 / √3: [1.5, 6.5]
    ([1.0, -1.0, 3.0], "inconclusive"),
    ([-3.0, -4.0, -5.0], "does not hold"),
    ([0.0, 0.0, 0.0], "inconclusive"),         # [0, 0]: not wholly on either side
    ([1.0, 1.2], "inconclusive"),             # two seeds: t(0.975, 1) = 12.7 makes the interval [-0.17, 2.37]
    ([1.0, 1.2, 0.9, 1.1, 1.0], "holds"),
    ([2.0], "inconclusive (one seed)"),
])
def test_verdict_rule(values, expected):
    v = V.verdict(values)
    assert v.text == expected and v.mean == pytest.approx(sum(values) / len(values))
    if len(values) > 1:
        half = V.T975[len(values) - 2] * statistics.stdev(values) / math.sqrt(len(values))
        assert (v.low, v.high) == pytest.approx((v.mean - half, v.mean + half))


def test_t_quantiles_are_the_standard_table():
    assert V.t975(1) == 12.706 and V.t975(4) == 2.776 and V.t975(30) == 2.042 and V.t975(200) == 2.042
    assert len(V.T975) == 30 and all(a > b for a, b in zip(V.T975, V.T975[1:]))  # decreasing in df


def fake_run(accs, samples_per_eval=100, tokens_per_eval=400, prior=None, by_domain=None, flops_per_eval=1e9,
             teacher_sample_share=0.0):
    rows = [{"step": i, "eval_accuracy": a, "samples": i * samples_per_eval, "completion_tokens": i * tokens_per_eval,
             "generated_tokens": i * tokens_per_eval, "teacher_generated_tokens": 0, "time_s": float(i),
             "flops": i * flops_per_eval, "flops_teacher_sample": i * flops_per_eval * teacher_sample_share,
             "eval_size": 256}
            for i, a in enumerate(accs)]
    if prior is not None:
        for r, p in zip(rows, prior):
            r["prior_accuracy"] = p
    if by_domain is not None:
        rows[-1]["eval_accuracy_by_domain"] = by_domain
    return rows


def test_budget_to_reach_a_target_and_not_reached():
    fast = fake_run([0.1, 0.5, 0.9, 0.9], flops_per_eval=1e9)
    slow = fake_run([0.1, 0.2, 0.5, 0.9], flops_per_eval=5e9)
    assert V.to_reach(fast, 90.0, "flops") == 2e9 and V.to_reach(slow, 90.0, "flops") == 15e9
    r = V.ratio(fast, slow, 90.0, "flops")
    assert r.d == pytest.approx(math.log10(7.5)) and r.text == "7.5×"
    never = fake_run([0.1, 0.2, 0.3, 0.4])
    assert V.to_reach(never, 90.0, "flops") is None
    assert V.ratio(never, slow, 90.0, "flops") == V.Reach(None, "not reached", claimed_missed=True)
    bound = V.ratio(fast, never, 90.0, "flops")  # the baseline never got there: its whole budget is a lower bound
    assert bound.d == pytest.approx(math.log10(3e9 / 2e9)) and bound.text.startswith("≥ 1.5×")
    assert V.ratio(never, never, 90.0, "flops").text == "neither reached"
    # without the teacher's sampling: FLOPs − flops_teacher_sample
    seqkd = fake_run([0.1, 0.9], flops_per_eval=10e9, teacher_sample_share=0.8)
    assert V.to_reach(seqkd, 90.0, "flops-teacher_sample") == pytest.approx(2e9)
    # verdicts over seeds with "not reached": never a made-up number
    assert V.verdict([V.ratio(never, slow, 90.0, "flops")] * 3).text == "does not hold (target not reached)"
    mixed = V.verdict([r, r, V.ratio(never, slow, 90.0, "flops")])
    assert mixed.text == "inconclusive (a budget ratio in 2 of 3 seeds)" and mixed.low is None
    assert V.verdict([r] * 3).text == "holds"


def test_claims_table_from_per_seed_numbers():
    def seed(opd_final, seqkd_final):
        runs = {name: fake_run([0.1, 0.1, 0.1, 0.1, 0.1]) for name in claims.runs.RUNS}
        runs["opd"] = fake_run([0.1, 0.3, 0.4, 0.5, opd_final])
        runs["seqkd"] = fake_run([0.1, 0.2, 0.2, 0.2, seqkd_final], flops_per_eval=3e9, teacher_sample_share=0.5)
        runs["grpo"] = fake_run([0.1, 0.5, 0.8, 0.9, 0.9], flops_per_eval=10e9)
        runs["opd-strong"] = fake_run([0.1, 0.95, 0.99, 1.0, 1.0])
        return runs

    results = {0: seed(0.6, 0.2), 1: seed(0.7, 0.3), 2: seed(0.5, 0.2)}
    lrs = {name: 1e-3 for name in claims.runs.RUNS}
    tab, measured = claims.report.table(results, V.Refs(60.0), set(), lrs, 256)
    lines = tab.strip().split("\n")
    assert len(lines) == 2 + len(V.CLAIMS)
    row = lambda prefix: next(x for x in lines if x.startswith(prefix))  # noqa: E731
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    opd_seqkd = cells(row("| OPD beats off-policy distillation at equal samples"))
    assert opd_seqkd[4] == "+40.0, +40.0, +30.0" and opd_seqkd[5].startswith("+36.7 [")
    assert opd_seqkd[7] == "**holds**" and opd_seqkd[3] == "opd (0.001), seqkd (0.001)"
    assert opd_seqkd[6].startswith("±")  # the noise floor of the difference at n = 256
    # 95% of the 60% teacher = 57%: OPD reaches it at its last evaluation (4e9 FLOPs) or never, SeqKD never
    cheaper = cells(row("| OPD is cheaper than off-policy distillation (Thinking"))
    assert cheaper[4] == "≥ 3× (baseline not reached), ≥ 3× (baseline not reached), neither reached"
    assert cheaper[7] == "**inconclusive (a budget ratio in 2 of 3 seeds)**"
    without = cells(row("| OPD is cheaper than off-policy distillation, without"))
    assert without[4].startswith("≥ 1.5× (baseline not reached)")
    assert "not reached" in row("| SDPO reaches GRPO's best accuracy in fewer")  # sdpo-frozen stays at 10%
    exceed = cells(row("| ExOPD can exceed"))
    assert exceed[4] == "-50.0, -50.0, -50.0" and exceed[7] == "**does not hold**"
    assert sum("not measured:" in x for x in lines) == 5  # base, experts, strong, prior (two SDFT rows)
    assert [t for t, _, _ in measured] == [c.text for c in V.CLAIMS
                                           if not any(n in claims.runs.NEEDS for n in c.runs) and not c.needs]
    for why in claims.runs.ASSET_MISSING.values():  # no base, no experts, no strong teacher, no prior skill
        assert f"not measured: {why}" in tab
    # with the assets, each of those claims is measured from its own runs
    for seed_runs in results.values():
        seed_runs["gopd-1.25-base"] = fake_run([0.1, 0.2, 0.3, 0.4, 0.35])
        seed_runs["sft"] = fake_run([0.1, 0.2], prior=[0.9, 0.5])     # forgets 40 points
        seed_runs["sdft"] = fake_run([0.1, 0.15], prior=[0.9, 0.8])   # forgets 10
        seed_runs["sdft-frozen"] = fake_run([0.1, 0.15], prior=[0.9, 0.9])  # forgets nothing
        seed_runs["multi-1.25"] = fake_run([0.1, 0.5], by_domain={"+": 0.62, "-": 0.9})
    refs = V.Refs(80.0, experts={"+": 64.0, "-": 95.0})
    tab, _ = claims.report.table(results, refs, {"base", "prior", "experts", "strong"}, lrs, 256)
    row = lambda prefix: cells(next(x for x in tab.split("\n") if x.startswith(prefix)))  # noqa: E731
    assert row("| reward correction")[4:6] == ["+25.0, +25.0, +25.0", "+25.0 [+25.0, +25.0]"]
    assert row("| reward correction")[7] == "**holds**"
    assert row("| SDFT learns")[4] == "+30.0, +30.0, +30.0" and row("| SDFT learns")[7] == "**holds**"
    assert row("| SDFT (frozen teacher) learns")[4] == "+40.0, +40.0, +40.0"
    # the strong teacher's OPD reaches GRPO's final 90% at the first evaluation after 0: 1e9 vs GRPO's 30e9
    strong = row("| OPD reaches RL's accuracy")
    assert strong[4] == "30×, 30×, 30×" and strong[5].startswith("30× [30×, 30×]") and strong[7] == "**holds**"
    assert "at the target 90.0%" in strong[6]
    # worst domain: "-" (90 - 95 = -5) rather than "+" (62 - 64 = -2)
    assert row("| a multi-teacher")[4] == "-5.0, -5.0, -5.0" and row("| a multi-teacher")[7] == "**does not hold**"
    runs_md = claims.report.runs_table(results, refs, lrs, tuned={"sft"})
    sft = next(x for x in runs_md.split("\n") if x.startswith("| sft |"))
    assert "| 90.0 → 50.0 |" in sft and "| 0.001 |" in sft
    assert "0.001 (preset lr, not tuned)" in next(x for x in runs_md.split("\n") if x.startswith("| opd |"))
    assert "`+` 64.0%, `-` 95.0%" in runs_md and "`+` 62.0%, `-` 90.0%" in runs_md
    assert "Held-out prompts per evaluation: 256." in runs_md


def test_noise_floor_is_binomial():
    assert claims.report.noise(50.0, 256) == pytest.approx(100 * math.sqrt(0.25 / 256))  # 3.1 points
    assert claims.report.noise(100.0, 256) == 0.0 and claims.report.noise(0.0, 1024) == 0.0


def test_claims_smoke_end_to_end(tmp_path, smoke_models):
    from opd_train import compare

    out = tmp_path / "claims"
    assert compare.main(["--claims", "--preset", "smoke", "--seeds", "0", "1", "--steps", "4",
                         "--out", str(out)]) == 0
    md = (out / "claims.md").read_text()
    title, tab = md.split("\n\n", 1)
    assert "smoke preset, 4 steps per run, seeds 0, 1" in title and "paired 95% t interval" in title
    rows_ = [x for x in tab.strip().split("\n")[2:]]
    assert len(rows_) == len(V.CLAIMS)
    for line, claim in zip(rows_, V.CLAIMS):  # each measured row's verdict follows from its own per-seed numbers
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[4] == "—":
            assert cells[7].startswith("not measured:")
            continue
        if claim.ratio:
            assert len(cells[4].split(", ")) == 2
            assert cells[7].strip("*").split(" (")[0] in ("holds", "does not hold", "inconclusive")
            continue
        values = [float(x) for x in cells[4].split(",")]
        assert len(values) == 2
        assert cells[7] == f"**{V.verdict(values).text}**"
    # the smoke preset has a prior skill, domain experts and a strong teacher, but no teacher with a kept base
    assert sum(x.endswith(f"not measured: {claims.runs.ASSET_MISSING['base']} |") for x in rows_) == 1
    for new in ("entropy-aware OPD", "IW-OPD", "student-top-k", "OPD reaches RL's", "OPSD needs fewer"):
        assert "not measured" not in next(x for x in rows_ if new in x)
    for name in set(claims.runs.RUNS) - {"gopd-1.25-base"}:  # every run, per seed, with the shared schedule
        args = json.loads((out / "seed1" / name / "args.json").read_text())
        assert (args["seed"], args["steps"], args["lr_schedule"]) == (1, 4, "cosine")
        evals = [r for r in rows(out / "seed1" / name) if "eval_accuracy" in r]
        assert all("prior_accuracy" in r and r["flops"] > 0 for r in evals[1:])
    multi = json.loads((out / "seed0" / "multi-1.25" / "args.json").read_text())
    assert multi["ops"] == "+-" and sorted(multi["domain_teacher"]) == ["+", "-"]
    assert json.loads((out / "seed0" / "opd-strong" / "args.json").read_text())["teacher"]
    last = [r for r in rows(out / "seed0" / "multi-1.25") if "eval_accuracy" in r][-1]
    assert sorted(last["eval_accuracy_by_domain"]) == ["+", "-"]
    assert (out / "claims.png").stat().st_size > 0 and "| sdft |" in (out / "claims_runs.md").read_text()
    # --report rebuilds the same tables from these runs without training; a run made otherwise is refused
    runs_md = (out / "claims_runs.md").read_text()
    assert compare.main(["--claims", "--preset", "smoke", "--seeds", "0", "1", "--steps", "4", "--report",
                         "--out", str(out)]) == 0
    assert (out / "claims.md").read_text().split("\n\n", 1)[1] == tab
    assert "tables rebuilt with --report" in (out / "claims.md").read_text() and (out / "claims_runs.md").read_text() == runs_md
    args_path = out / "seed1" / "opd" / "args.json"
    args_path.write_text(args_path.read_text().replace('"steps": 4', '"steps": 5'))
    with pytest.raises(ValueError, match=r"--report: .*seed1/opd was run with steps 5, this report needs 4"):
        compare.main(["--claims", "--preset", "smoke", "--seeds", "0", "1", "--steps", "4", "--report",
                      "--out", str(out)])


def test_validation_split_is_disjoint_from_test_and_training():
    import random

    test = ArithmeticTask(2, "+", eval_size=64)
    val = ArithmeticTask(2, "+", eval_size=64, split="validation")
    t, v = {ex.prompt for ex in test.eval_examples()}, {ex.prompt for ex in val.eval_examples()}
    assert len(val.eval_examples()) == 64 and not t & v
    assert not v & {ex.prompt for ex in val.sample(random.Random(0), 3000)}
    assert [ex.prompt for ex in test.eval_examples()] == [ex.prompt for ex in ArithmeticTask(2, "+", eval_size=64).eval_examples()]
    with pytest.raises(ValueError, match="split must be 'test' or 'validation', got 'dev'"):
        ArithmeticTask(2, "+", split="dev")


def test_eval_split_validation_refused_with_own_data(tmp_path, smoke_models, capsys):
    from test_train import write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl")
    assert main(["--method", "sft", *SMOKE, "--student", str(smoke_models["student"]), "--data", str(data),
                 "--eval-split", "validation", "--out", str(tmp_path / "run")]) == 2
    assert "--eval-split validation: only the bundled task has a validation split" in one_line_error(capsys)


def test_claims_tune_picks_the_best_validation_lr(tmp_path, smoke_models, monkeypatch):
    monkeypatch.setattr(claims.runs, "RUNS", {"sft": ["--method", "sft"], "opd": ["--method", "opd"]})
    monkeypatch.setattr(claims.runs, "LR_GRID", (1e-3, 1e-2))
    shared = ["--preset", "smoke", "--steps", "3", "--eval-size", "32"]
    best = claims.runs.tune(shared, tmp_path, log=lambda *a: None, workers=2)  # 2 subprocesses at once
    for name in ("sft", "opd"):
        finals = []
        for lr in (1e-3, 1e-2):
            d = tmp_path / "tune" / f"{name}-lr{lr:g}"
            args = json.loads((d / "args.json").read_text())
            assert (args["eval_split"], args["lr"], args["seed"]) == ("validation", lr, claims.runs.TUNE_SEED)
            finals.append(V.final(rows(d)))
        assert best[name] == (1e-3 if finals[0] >= finals[1] else 1e-2)


def test_rl_teacher_keeps_its_base_and_serves_gopd_reward_correction(tmp_path, smoke_models, monkeypatch):
    """get_rl_teacher: GRPO on the SFT teacher, cached with the SFT model as DIR/base."""
    from transformers import AutoModelForCausalLM

    from opd_train.bench_assets import RLSpec, get_rl_teacher

    monkeypatch.setenv("OPD_TRAIN_CACHE", str(tmp_path / "cache"))  # a fresh cache: built here, not found
    for role in ("teacher", "student"):
        shutil.copytree(smoke_models[role], tmp_path / "cache" / Path(smoke_models[role]).name)
    p = cli.PRESETS["smoke"]
    task = ArithmeticTask(p["digits"], p["ops"], eval_size=16)
    path = get_rl_teacher(p["teacher"], RLSpec(steps=2, batch_size=16, lr=1e-3), task, log=lambda *a: None)
    meta = json.loads((path / "meta.json").read_text())
    assert 0.0 <= meta["base_eval_accuracy"] <= 1.0 and 0.0 <= meta["eval_accuracy"] <= 1.0
    base = AutoModelForCausalLM.from_pretrained(path / "base").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(smoke_models["teacher"]).state_dict()
    rl = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(base[k], sft[k]) for k in sft) and any(not torch.equal(rl[k], sft[k]) for k in sft)
    assert get_rl_teacher(p["teacher"], RLSpec(steps=2, batch_size=16, lr=1e-3), task) == path  # cached
    out = tmp_path / "run"
    assert main(["--method", "gopd", "--gopd-ref", "teacher-base", "--teacher", str(path), *SMOKE,
                 "--out", str(out)]) == 0


def test_claims_copy_to_readme_replaces_only_its_blocks(tmp_path):
    docs = tmp_path / "docs" / "compare"
    docs.mkdir(parents=True)
    (docs / "claims.md").write_text("title\n\n| a |\n|---|\n| 1 |\n")
    (docs / "claims_runs.md").write_text("title\n\n| run |\n|---|\n\nteacher 74%.\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- compare: claims -->\nold\n<!-- compare: end -->\ny\n"
                      "<!-- compare: claims_runs -->\nold\n<!-- compare: end -->\nz\n")
    claims.report.copy_to_readme(docs, readme)
    assert readme.read_text() == ("x\n<!-- compare: claims -->\n| a |\n|---|\n| 1 |\n<!-- compare: end -->\ny\n"
                                  "<!-- compare: claims_runs -->\n| run |\n|---|\n\nteacher 74%.\n<!-- compare: end -->\nz\n")
    readme.write_text("no blocks\n")
    with pytest.raises(ValueError, match="no block '<!-- compare: claims -->"):
        claims.report.copy_to_readme(docs, readme)
