"""``python -m opd_train --student DIR --teacher DIR`` with Qwen2-style models whose vocabulary has
151936 entries, as Qwen2 checkpoints do (their tokenizers have fewer: the lm_head is padded).
Built from config with small widths (no download), next to the bundled character tokenizer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd_train import rollout as R
from opd_train.tokenizer import build_char_tokenizer
from opd_train.train import main

QWEN2_VOCAB = 151936
RUN = ["--preset", "smoke", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--eval-size", "8"]


def qwen2(tok, d: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    tok, out = build_char_tokenizer(), {}
    for role, d, seed in (("student", 8, 0), ("teacher", 16, 1)):
        out[role] = tmp_path_factory.mktemp(role)
        qwen2(tok, d, seed).save_pretrained(out[role])
        tok.save_pretrained(out[role])
    return out


def test_generate_draws_only_the_first_vocab_size_tokens():
    tok = build_char_tokenizer()
    model = qwen2(tok, 8, 0).eval()
    with torch.no_grad():  # make the padded rows the likeliest tokens
        model.lm_head.weight[len(tok):] += 5 * model.lm_head.weight[len(tok):].sign()
    prompts = R.encode_prompts(tok, ["12+34="] * 16)
    free, _ = R.generate(model, tok, prompts, max_new_tokens=6)
    assert bool((free >= len(tok)).any())  # without the limit, padded ids are drawn
    comp, mask = R.generate(model, tok, prompts, max_new_tokens=6, vocab_size=len(tok))
    assert bool((comp < len(tok)).all())


@pytest.mark.parametrize("method", ["opd", "sdpo"])
@pytest.mark.parametrize("vocab_flag", [False, True], ids=["full-lm-head", "vocab-size"])
def test_qwen2_vocabulary_models_train(method, vocab_flag, dirs, tmp_path):
    out = tmp_path / "run"
    argv = ["--method", method, *RUN, "--student", str(dirs["student"]), "--out", str(out)]
    if method == "opd":
        argv += ["--teacher", str(dirs["teacher"])]
    if vocab_flag:
        argv += ["--vocab-size", str(len(build_char_tokenizer()))]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2]
