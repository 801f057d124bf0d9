"""``--verifier exact|number|MODULE:FUNCTION`` and the GSM8K-format example shipped in opd_train/examples."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from opd_train import verifiers
from opd_train.data import JsonlTask, load_jsonl
from opd_train.train import main
from test_train_inputs import refused, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "opd_train" / "examples" / "gsm8k.jsonl"
RUN = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "4",
       "--batch-size", "8", "--max-new-tokens", "8"]


@pytest.mark.parametrize("completion,answer,reward", [
    ("so she has 24 pencils", "12 + 12 = <<12+12=24>>24 pencils.\n#### 24", 1.0),
    ("The answer is 24.", "#### 24", 1.0),
    ("24.0", "#### 24", 1.0),
    ("it costs $1,500", "1250 + 250 = 1500\n#### 1,500", 1.0),
    ("they pay $24.5 in total", "#### 24.5", 1.0),
    ("-3", "#### -3", 1.0),
    ("24 and then 25", "#### 24", 0.0),           # the completion's last number counts
    ("no number here", "#### 24", 0.0),
    ("7", "3 + 4 = 7", 1.0),                       # no ####: the answer's last number
    ("7", "no number", 0.0),
])
def test_number_compares_the_last_numbers(completion, answer, reward):
    assert verifiers.number("q", completion, answer) == (reward, None)


def test_exact_strips_whitespace():
    assert verifiers.exact("q", " 42\n", "42") == (1.0, None)
    assert verifiers.exact("q", "42.0", "42") == (0.0, None)


def test_gsm8k_example_loads_and_its_answers_verify():
    rows = load_jsonl(str(GSM8K))
    assert len(rows) >= 20
    for ex in rows:  # the worked answer itself ends in its number
        assert "####" in ex.answer
        assert verifiers.number(ex.prompt, ex.answer, ex.answer)[0] == 1.0
        assert verifiers.exact(ex.prompt, "0", ex.answer)[0] == 0.0


@pytest.fixture(autouse=True)
def fresh_module(monkeypatch):
    """Each test imports its own my_verifier (not the one an earlier test cached)."""
    monkeypatch.delitem(sys.modules, "my_verifier", raising=False)


def write_module(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_verifier.py"
    path.write_text(body)
    return path


def test_user_function_reward_and_feedback(tmp_path, monkeypatch):
    path = write_module(tmp_path, "def check(prompt, completion, answer):\n"
                                  "    ok = completion.strip() == answer.strip()\n"
                                  "    return (1.0, None) if ok else (0.0, f'expected {len(answer)} characters')\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "answer": "abc"}\n{"prompt": "q", "answer": "de"}\n')
    for spec in (f"{path}:check", "my_verifier:check"):  # a file, or a module on sys.path
        monkeypatch.syspath_prepend(str(tmp_path))
        task = JsonlTask(str(data), verifier=verifiers.resolve(spec))
        ex = task.train[0]
        assert task.reward(ex, "abc") == 1.0 and task.reward(ex, "x") == 0.0
        assert task.feedback(ex, "x") == "expected 3 characters"
        assert task.feedback(ex, "abc") == "The previous attempt was correct."  # no text: the generic one
        assert "expected 3 characters" in task.with_context(ex, "feedback", attempt="x")


@pytest.mark.parametrize("body,spec,message", [
    (None, "no_such_module_xyz:f", "cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("x = 1\n", "my_verifier:f", "my_verifier has no attribute 'f'"),
    ("f = 3\n", "my_verifier:f", "my_verifier.f is not callable (int)"),
    ("def f(a):\n    return 1.0\n", "my_verifier:f", "cannot be called as fn(prompt, completion, answer)"),
    ("raise RuntimeError('boom')\n", "my_verifier:f", "cannot import my_verifier (RuntimeError: boom)"),
    (None, "numbers", "expected exact, number or MODULE:FUNCTION"),
])
def test_bad_verifier_fails_before_training_in_one_line(body, spec, message, tmp_path, capsys, monkeypatch):
    if body is not None:
        write_module(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    student = tiny_model_dir(tmp_path / "student")
    err = refused(["--method", "sft", *RUN, "--student", str(student), "--data", str(GSM8K),
                   "--verifier", spec, "--out", str(tmp_path / "o")], capsys)
    assert f"--verifier {spec}: " in err and message in err, err


def test_verifier_needs_data(tmp_path, capsys):
    assert "--verifier number needs --data" in refused(["--verifier", "number", "--preset", "smoke"], capsys)


def test_a_reward_outside_0_1_stops_the_run_in_one_line(tmp_path, capsys):
    path = write_module(tmp_path, "def f(prompt, completion, answer):\n    return 1.5\n")
    student = tiny_model_dir(tmp_path / "student")
    err = refused(["--method", "grpo", *RUN, "--student", str(student), "--data", str(GSM8K),
                   "--verifier", f"{path}:f", "--out", str(tmp_path / "o")], capsys)
    assert "returned 1.5; expected a reward in [0, 1]" in err


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "sdpo", "opd"])
def test_gsm8k_format_run_with_the_number_verifier(method, tmp_path):
    student = tiny_model_dir(tmp_path / "student")
    argv = ["--method", method, *RUN, "--student", str(student), "--data", str(GSM8K), "--verifier", "number",
            "--out", str(tmp_path / "run")]
    if method == "opd":
        argv += ["--teacher", str(tiny_model_dir(tmp_path / "teacher"))]
    assert main(argv) == 0
    rs = rows(tmp_path / "run")
    assert [r["step"] for r in rs if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 for r in rs if "loss" in r)
    assert [r["step"] for r in rs if "eval_accuracy" in r] == [0, 2]


def test_user_verifier_rewards_reach_the_metrics(tmp_path):
    """A constant user reward of 0.25 is every step's mean reward and the held-out accuracy."""
    path = write_module(tmp_path, "def f(prompt, completion, answer):\n    return 0.25, 'look again'\n")
    student = tiny_model_dir(tmp_path / "student")
    assert main(["--method", "sdpo", *RUN, "--student", str(student), "--data", str(GSM8K),
                 "--verifier", f"{path}:f", "--out", str(tmp_path / "run")]) == 0
    rs = rows(tmp_path / "run")
    assert [r["reward"] for r in rs if "loss" in r] == [0.25, 0.25]
    assert [r["eval_accuracy"] for r in rs if "eval_accuracy" in r] == [0.25, 0.25]
