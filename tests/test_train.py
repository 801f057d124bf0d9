"""End-to-end tests of the trainer (`python -m opd_train`) on the smoke preset.

The bundled smoke teacher/student are pre-trained once into $OPD_TRAIN_CACHE (default
~/.cache/opd_train) and shared by every test. Runs are in-process (one import of torch and
transformers) except where a real process boundary is the point: the crash/resume test and
the torchrun DDP test.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_train import cli
from opd_train.methods import METHODS
from opd_train.models import PRETRAIN_SEED, get_pretrained
from opd_train.task import ArithmeticTask
from opd_train.train import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "16"]
TIMING_KEYS = {"tokens_per_s", "time_s", "wall_s"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]


@pytest.fixture(scope="module")
def smoke_models() -> dict[str, Path]:
    p = cli.PRESETS["smoke"]
    task = ArithmeticTask(p["digits"], p["ops"], eval_size=16)
    return {role: get_pretrained(role, p[role], task, PRETRAIN_SEED) for role in ("teacher", "student")}


def one_line_error(capsys) -> str:
    """stderr of a refused run: exactly one ``python -m opd_train: error: ...`` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m opd_train: error: ") and "\n" not in err, err
    return err


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: int = 300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- every method, end to end -----------------------------------------------------------------
VARIANTS = [[m] for m in METHODS] + [
    ["opd", "--opd-loss", "fullvocab"],
    ["gopd", "--gopd-loss", "sampled", "--epochs-per-batch", "2"],
    ["opsd", "--opsd-divergence", "forward_kl", "--opsd-clip", "0.5"],
    ["sdpo", "--sdpo-topk", "8", "--epochs-per-batch", "2"],
]


def run_smoke(variant, tmp_path):
    """Run ``--method variant[0] *variant[1:]`` on the smoke preset for 2 steps; return the output
    dir and its metrics rows split into training steps and evaluations."""
    out = tmp_path / "run"
    assert main(["--method", variant[0], *variant[1:], *SMOKE, "--out", str(out)]) == 0
    rs = rows(out)
    return out, [r for r in rs if "loss" in r], [r for r in rs if "eval_accuracy" in r]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(x.lstrip("-") for x in v))
def test_method_smoke(variant, tmp_path, smoke_models):
    out, train, evals = run_smoke(variant, tmp_path)
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    if variant[0] != "sft" and not (variant[0] == "gkd"):
        assert all(0.0 <= r["reward"] <= 1.0 for r in train)  # methods that sample report the verifier reward
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "ckpt" / "model" / "config.json").exists() and (out / "ckpt" / "state.pt").exists()
    assert torch.load(out / "ckpt" / "state.pt", weights_only=False)["progress"]["step"] == 2


def test_training_changes_the_student(tmp_path, smoke_models):
    """The update is real: after a few OPD steps the weights differ from the initial student."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["--method", "opd", *SMOKE, "--out", str(out)]) == 0
    a = AutoModelForCausalLM.from_pretrained(smoke_models["student"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "ckpt" / "model").state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -- resume after a hard crash ----------------------------------------------------------------
def test_resume_after_crash_matches_uninterrupted(tmp_path, smoke_models):
    base = ["--method", "sdpo", "--sdpo-teacher", "ema", "--preset", "smoke", "--steps", "5", "--save-every", "2",
            "--eval-every", "2", "--eval-size", "16", "--lr-schedule", "cosine", "--warmup-steps", "2"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    # killed (os._exit) right after step 3: the checkpoint is from step 2, metrics reach step 3
    r = run_subprocess([sys.executable, "-m", "opd_train", *base, "--out", str(tmp_path / "b")],
                       {"OPD_TRAIN_TEST_CRASH_STEP": "3"})
    assert r.returncode == 3, r.stderr[-2000:]
    assert max(x["step"] for x in rows(tmp_path / "b")) == 3
    assert main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = comparable(rows(tmp_path / "a")), comparable(rows(tmp_path / "b"))
    assert a == b  # bit-identical losses, rewards and accuracies (EMA teacher, RNG, optimizer restored)


def test_resume_refuses_changed_options(tmp_path, smoke_models, capsys):
    out = str(tmp_path / "run")
    assert main(["--method", "sft", *SMOKE, "--out", out]) == 0
    capsys.readouterr()
    assert main(["--method", "sft", *SMOKE, "--out", out, "--resume", "--lr", "0.1"]) == 2
    assert "--lr was 0.003, now 0.1" in one_line_error(capsys)
    assert main(["--method", "sft", *SMOKE, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "--resume: no checkpoint in" in one_line_error(capsys)
    # a fresh run refused during setup (malformed data) leaves the older run's checkpoint in place
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="\n')
    assert main(["--method", "sft", *SMOKE, "--out", out, "--student", str(smoke_models["student"]),
                 "--data", str(bad)]) == 2
    assert f"--data {bad}:1: not valid JSON" in one_line_error(capsys)
    assert (Path(out) / "ckpt" / "state.pt").exists()


# -- data parallel ----------------------------------------------------------------------------
def test_torchrun_ddp_two_processes(tmp_path, smoke_models):
    out = tmp_path / "ddp"
    r = run_subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29400 + os.getpid() % 500), "-m", "opd_train",
                        "--method", "opd", *SMOKE, "--out", str(out)], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in rows(out) if "loss" in x]
    per_step = cli.PRESETS["smoke"]["batch_size"]
    assert [x["samples"] for x in train] == [2 * per_step, 4 * per_step]  # both processes' samples count
    assert (out / "ckpt" / "rng-0.pt").exists() and (out / "ckpt" / "rng-1.pt").exists()


# -- faults and bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected a positive integer, got '0'"),
    (["--steps", "ten"], "--steps: expected a positive integer"),
    (["--lr=-1e-3"], "--lr: expected a positive finite number"),
    (["--gkd-beta", "1.5"], "--gkd-beta: expected a number in [0, 1]"),
    (["--sdpo-ema", "0"], "--sdpo-ema: expected a number in (0, 1]"),
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--method", "opd", "--batch-size", "6"], "must be a multiple of the samples per prompt (4 for opd)"),
    (["--method", "sdpo", "--teacher", "x"], "sdpo uses the student itself as teacher"),
    (["--ref", "x"], "--ref is only used by --method gopd"),
    (["--method", "sft", "--teacher", "x"], "--teacher: sft uses no teacher"),
])
def test_bad_cli_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert message in one_line_error(capsys)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, smoke_models, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("OPD_TRAIN_TEST_NAN_STEP", "3")
    rc = main(["--method", "opd", "--preset", "smoke", "--steps", "4", "--save-every", "2",
               "--eval-every", "2", "--eval-size", "16", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3 (method opd" in err and "last good checkpoint" in err
    assert torch.load(out / "ckpt" / "state.pt", weights_only=False)["progress"]["step"] == 2
    assert max(r["step"] for r in rows(out)) == 2  # nothing logged for the failed step


# -- bring your own models and data -----------------------------------------------------------
def write_jsonl(path: Path, n: int = 40) -> Path:
    import random

    task = ArithmeticTask(2, "+")
    with open(path, "w") as f:
        for ex in task.sample(random.Random(0), n):
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "solution": ex.solution}) + "\n")
    return path


@pytest.mark.parametrize("method", ["opd", "sdpo"])
def test_bring_your_own_models_and_data(method, tmp_path, smoke_models):
    data = write_jsonl(tmp_path / "train.jsonl")
    byo = ["--student", str(smoke_models["student"]), "--data", str(data), "--eval-size", "8"]
    if method == "opd":
        byo += ["--teacher", str(smoke_models["teacher"])]
    out = tmp_path / "run"
    assert main(["--method", method, *SMOKE, *byo, "--out", str(out)]) == 0
    assert [r["step"] for r in rows(out) if "eval_accuracy" in r] == [0, 2]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1+1=", "answer": "2"\n', "train.jsonl:3: not valid JSON (Expecting ',' delimiter at the end of the line)"),
    ('{"prompt": "1+1=" "answer": "2"}\n', "train.jsonl:3: not valid JSON (Expecting ',' delimiter at column 19)"),
    ('{"prompt": "1+1="}\n', "train.jsonl:3: missing required field 'answer'"),
    ('{"prompt": "1+1=", "answer": 2}\n', "train.jsonl:3: field 'answer' must be a string"),
    ('["1+1=", "2"]\n', "train.jsonl:3: expected a JSON object"),
    ('{"prompt": "1+1=", "answer": "2", "hint": "x"}\n', "train.jsonl:3: unknown field(s) ['hint']"),
])
def test_malformed_data_line_names_file_and_line(line, message, tmp_path, smoke_models, capsys):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "12+34=", "answer": "640"}) + "\n"
    data.write_text(good + "\n" + line + good)  # line 2 is blank (skipped), line 3 is bad
    assert main(["--method", "sft", *SMOKE, "--student", str(smoke_models["student"]), "--data", str(data),
                 "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert f"--data {data}:3: " in err and message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything ran


def test_refuses_mismatched_tokenizer_and_vocabulary(tmp_path, smoke_models, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl")
    common = ["--method", "opd", *SMOKE, "--student", str(smoke_models["student"]), "--data", str(data),
              "--eval-size", "8", "--out", str(tmp_path / "run")]
    # a teacher whose tokenizer has an extra token
    bad_tok = tmp_path / "teacher_tok"
    AutoModelForCausalLM.from_pretrained(smoke_models["teacher"]).save_pretrained(bad_tok)
    tok = AutoTokenizer.from_pretrained(smoke_models["teacher"])
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad_tok)
    assert main([*common, "--teacher", str(bad_tok)]) == 2
    assert "tokenizer mismatch" in one_line_error(capsys)
    # a teacher with a padded lm_head (same tokenizer): refused, then accepted with --vocab-size
    padded = tmp_path / "teacher_padded"
    model = AutoModelForCausalLM.from_pretrained(smoke_models["teacher"])
    model.resize_token_embeddings(len(tok) + 7)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(smoke_models["teacher"]).save_pretrained(padded)
    assert main([*common, "--teacher", str(padded)]) == 2
    assert re.search(r"student lm_head has \d+ rows, teacher \d+; pass --vocab-size", one_line_error(capsys))
    n = len(AutoTokenizer.from_pretrained(smoke_models["student"]))
    assert main([*common, "--teacher", str(padded), "--vocab-size", str(n)]) == 0
