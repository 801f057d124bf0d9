"""``--rollout-engine vllm``: a colocated vLLM engine samples the student's completions (CPU).

Needs vLLM in a venv of its own (see tests/test_vllm_teacher_server.py for the set-up); the
tests that need it skip without it, and the ones that check the errors a user without it sees
run everywhere. The engine's model is a tiny head_dim-32 Qwen2 built here (`vllm_helpers`).
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from opd_train import cli
from opd_train import rollout as R
from opd_train.task import ArithmeticTask
from opd_train.tokenizer import load_tokenizer
from opd_train.train import main

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM in a venv of its own: pip install -e '.[vllm]', "
                                                      "then pip uninstall torchvision torchaudio torchcodec")
SMOKE = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "16"]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(cli.PROG)]


def test_methods_that_sample_nothing_from_the_student_refuse_it(capsys):
    for method in ("sft", "seqkd"):
        with pytest.raises(SystemExit):
            cli.parse_args(["--method", method, "--rollout-engine", "vllm"])
        assert f"--rollout-engine vllm: --method {method} samples nothing from the student" in capsys.readouterr().err


@pytest.mark.skipif(HAS_VLLM, reason="checks the error a user without vLLM sees")
def test_without_vllm_one_line_before_training(tmp_path, capsys):
    assert main(["--method", "opd", *SMOKE, "--rollout-engine", "vllm", "--out", str(tmp_path)]) == 2
    (line,) = error_lines(capsys)
    assert "--rollout-engine vllm: cannot import vLLM" in line and "pip install -e '.[vllm]'" in line
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


@needs_vllm
def test_unsupported_head_dim_one_line_before_training(tmp_path, capsys):
    """The bundled smoke student has head_dim 8, which vLLM's CPU attention does not run."""
    assert main(["--method", "opd", *SMOKE, "--rollout-engine", "vllm", "--out", str(tmp_path)]) == 2
    (line,) = error_lines(capsys)
    assert "has head_dim 8; vLLM's CPU attention supports head_dim 32, 64" in line
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    from opd_train.vllm_engine import VLLMEngine
    from vllm_helpers import build_qwen2
    d = tmp_path_factory.mktemp("student") / "model"
    build_qwen2(d, seed=1)
    tok = load_tokenizer(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    eng = VLLMEngine.start(d, model, tok, vocab_size=None, device=torch.device("cpu"), seed=0, dtype="float32",
                           gpu_memory_utilization=0.3, log=lambda m: None)
    yield eng, model, tok, d
    eng.close()


def prompts(tok, n, seed=0):
    return R.encode_prompts(tok, [ex.prompt for ex in ArithmeticTask(2, "+").sample(random.Random(seed), n)])


def recomputed(model, tok, ps, comp, mask):
    lm = R.LM(model)
    seqs = R.pack(ps, comp, mask, tok.pad_token_id)
    with torch.no_grad():
        return R.token_logprobs(lm, R.completion_hidden(lm, seqs), seqs)


@needs_vllm
def test_greedy_completions_equal_the_hf_engine(engine):
    eng, model, tok, _ = engine
    ps = prompts(tok, 64)
    comp, mask, _ = eng.generate(ps, max_new_tokens=8, greedy=True)
    want, want_mask = R.generate(model, tok, ps, max_new_tokens=8, greedy=True)
    assert mask.sum() > 0
    w = want_mask.shape[1]
    assert comp.shape[1] <= w and not want_mask[:, comp.shape[1]:].any()
    assert torch.equal(mask, want_mask[:, : comp.shape[1]])
    assert torch.equal(comp[mask], want[:, : comp.shape[1]][mask])


@needs_vllm
def test_after_a_step_the_engine_holds_the_new_weights(engine):
    """The engine's logprobs of its samples equal the HF student's, recomputed (what methods use as
    log π_old), after an optimizer step and the sync; before the sync they do not."""
    eng, model, tok, _ = engine
    ps = prompts(tok, 32, seed=1)
    comp, mask, _ = eng.generate(ps, max_new_tokens=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lm = R.LM(model)
    seqs = R.pack(ps, comp, mask, tok.pad_token_id)
    (-(R.token_logprobs(lm, R.completion_hidden(lm, seqs), seqs)).sum() / mask.sum()).backward()
    opt.step()
    comp, mask, stale = eng.generate(ps, max_new_tokens=8)
    assert (stale - recomputed(model, tok, ps, comp, mask))[mask].abs().max() > 1e-2  # the step moved them
    eng.load_weights(model)
    comp, mask, got = eng.generate(ps, max_new_tokens=8)
    assert mask.sum() > 32
    torch.testing.assert_close(got[mask], recomputed(model, tok, ps, comp, mask)[mask], rtol=0, atol=1e-4)


@needs_vllm
def test_vocab_size_limits_what_is_drawn(engine):
    eng, model, tok, _ = engine
    allowed, eng.allowed = eng.allowed, list(range(12))
    try:
        comp, mask, _ = eng.generate(prompts(tok, 32, seed=2), max_new_tokens=8, temperature=2.0)
    finally:
        eng.allowed = allowed
    assert mask.sum() > 0 and comp[mask].max() < 12


@needs_vllm
@pytest.mark.parametrize("method", ["opd", "grpo"])
def test_training_with_vllm_rollouts(engine, tmp_path, method):
    """``python -m opd_train --rollout-engine vllm`` end to end: a head_dim-32 student, the smoke teacher."""
    _, _, _, student = engine
    assert main(["--method", method, *SMOKE, "--student", str(student), "--rollout-engine", "vllm",
                 "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@needs_vllm
def test_each_rank_runs_its_own_engine_ddp_and_fsdp_agree(engine, tmp_path):
    """Under torchrun every rank samples with its own engine. The FSDP run's engines get the full
    state dict gathered from the shards, the DDP run's the replicated weights: step 2 samples
    from the synced weights, so equal step-2 losses mean equal weights in the engines."""
    _, _, _, student = engine
    losses = {}
    for mode, port in (("ddp", 29561), ("fsdp", 29562)):
        out = tmp_path / mode
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(port), "-m", "opd_train", "--method", "opd", *SMOKE, "--student", str(student),
                            "--rollout-engine", "vllm", "--out", str(out), *(["--fsdp"] if mode == "fsdp" else [])],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["ddp"]) == 2
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
