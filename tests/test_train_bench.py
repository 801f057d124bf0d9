"""The bundled benchmark's pieces (issue #15): carry chains, pre-training mixes with a prior skill,
the cache key, prior-skill and per-domain evaluation, multi-teacher G-OPD (``--domain-teacher``)
and its errors. Runs use the smoke preset (2 steps)."""
from __future__ import annotations

import dataclasses
import random
import re

import pytest

from opd_train import cli, models
from opd_train.bench_assets import bundled_experts
from opd_train.models import ModelSpec, pretrain_batch, spec_key
from opd_train.task import ArithmeticTask
from opd_train.tokenizer import build_char_tokenizer
from opd_train.train import main
from test_train import SMOKE, one_line_error, rows, smoke_models  # noqa: F401  (fixture)


def test_carry_chain_and_domain():
    task = ArithmeticTask(3, "+-", eval_size=1)
    assert task.has_chain(task.make(95, 7, "+"))       # 5+7 carries 1 into 9+0+1 = 10: a chain
    assert not task.has_chain(task.make(152, 19, "+"))  # 2+9 carries into 5+1+1 = 07, which passes none on
    assert task.has_chain(task.make(100, 1, "-"))      # 0-1 borrows from 0-0-1, which borrows again
    assert [task.domain(task.make(5, 3, op)) for op in "+-"] == ["+", "-"]
    drawn = task.sample(random.Random(0), 200, chain=False)
    assert drawn and not any(task.has_chain(ex) for ex in drawn)


def _prompts(tok, seqs):
    """(question "xs+ys=" as digits and op, whether the prompt carries context) per row."""
    out = []
    for row, m in zip(seqs.input_ids[:, : seqs.prompt_len], seqs.attention_mask[:, : seqs.prompt_len].bool()):
        text = tok.decode(row[m].tolist(), skip_special_tokens=True)
        q = re.findall(r"(\d+)([+-])(\d+)=", text)[-1]
        out.append((q, any(k in text for k in ("sol ", "demo ", "fb ", "hint "))))
    return out


def test_pretrain_batch_prior_skill_and_chain_free():
    tok, task = build_char_tokenizer(), ArithmeticTask(3, "+-", eval_size=1)
    got = _prompts(tok, pretrain_batch(task, tok, random.Random(0), 200, context_fraction=1.0, prior_ops="-"))
    assert {op for (_, op, _), _ in got} == {"+", "-"}
    assert all(ctx == (op == "+") for (_, op, _), ctx in got)  # the prior skill's rows are always plain
    plain = _prompts(tok, pretrain_batch(task, tok, random.Random(0), 200, context_fraction=0.0, chain_free=True))
    exs = [task.make(int(a[::-1]), int(b[::-1]), op) for (a, op, b), _ in plain]
    assert not any(ctx for _, ctx in plain) and not any(task.has_chain(ex) for ex in exs)


def test_spec_key_keeps_old_models_keys():
    spec = cli.PRESETS["default"]["student"]
    assert spec_key(spec) == {k: v for k, v in dataclasses.asdict(spec).items() if k not in models._LATER_FIELDS}
    later = dataclasses.replace(spec, ops="+-", chain_free=True)
    assert spec_key(later)["ops"] == "+-" and spec_key(later)["chain_free"] is True
    assert "prior_ops" not in spec_key(later)


def test_prior_and_domain_accuracies_logged(tmp_path, smoke_models):
    out = tmp_path / "run"
    assert main(["--method", "sft", *SMOKE, "--ops", "+-", "--prior-ops", "-", "--out", str(out)]) == 0
    evals = [r for r in rows(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert 0.0 <= r["prior_accuracy"] <= 1.0 and sorted(r["eval_accuracy_by_domain"]) == ["+", "-"]


def test_multi_teacher_with_one_teacher_twice_equals_single_teacher(tmp_path, smoke_models):
    """Routing by domain is a token-weighted sum of one fused call per domain: with the same
    teacher for both domains the loss must equal the single-teacher loss."""
    t = str(smoke_models["teacher"])
    common = ["--method", "gopd", *SMOKE, "--ops", "+-", "--gopd-reward-scale", "1.25"]
    assert main([*common, "--teacher", t, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, f"--domain-teacher=+={t}", f"--domain-teacher=-={t}", "--out", str(tmp_path / "two")]) == 0
    one, two = ([r["loss"] for r in rows(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert len(one) == 2 and one == pytest.approx(two, rel=1e-5)


def test_smoke_experts_are_built(smoke_models):
    p = cli.PRESETS["smoke"]
    experts = bundled_experts(p, ArithmeticTask(p["digits"], p["ops"], eval_size=16))
    assert sorted(experts) == ["+", "-"] and all((d / "config.json").exists() for d in experts.values())


@pytest.mark.parametrize("extra, message", [
    (["--method", "opd", "--domain-teacher", "+=X"], "--domain-teacher is only used by --method gopd, not opd"),
    (["--method", "gopd", "--domain-teacher", "plus"], "expected DOMAIN=DIR, got 'plus'"),
    (["--method", "gopd", "--domain-teacher", "+=/nonexistent/t"], "--domain-teacher"),
])
def test_domain_teacher_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args([*extra, "--preset", "smoke"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_domain_teacher_twice_and_missing_domain(tmp_path, smoke_models, capsys):
    t = str(smoke_models["teacher"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "gopd", f"--domain-teacher=+={t}", f"--domain-teacher=+={t}"])
    assert "--domain-teacher: domain '+' given twice" in capsys.readouterr().err
    assert main(["--method", "gopd", *SMOKE, "--ops", "+-", f"--domain-teacher=+={t}",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--domain-teacher: no teacher for domain '-'" in one_line_error(capsys)


def test_model_spec_later_fields_are_optional():
    spec = ModelSpec("qwen2", 8, 1, 2, 1, 16, steps=1, batch_size=2, lr=1e-3)
    assert (spec.ops, spec.prior_ops, spec.chain_free) == (None, "", False)
