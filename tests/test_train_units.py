"""Unit tests of the trainer's building blocks: task, tokenizer, packing, sampling, SDPO buckets."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import opd_kernels as ok
from opd_train import rollout as R
from opd_train.methods import EMATeacher
from opd_train.task import ArithmeticTask
from opd_train.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)  # what the trainer sees: a real HF tokenizer from disk


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


# -- task ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, op, answer", [(347, 85, "+", "2340"), (999, 999, "+", "8991"),
                                              (347, 85, "-", "262"), (100, 1, "-", "990"), (5, 5, "-", "000")])
def test_answers_are_least_significant_digit_first(a, b, op, answer):
    ex = ArithmeticTask(3, "+-", eval_size=1).make(a, b, op)
    assert ex.answer == answer
    assert ex.prompt == f"{a:03d}"[::-1] + op + f"{b:03d}"[::-1] + "="
    # the worked solution's columns carry the answer digits (and the final carry)
    cols = ex.solution.split()
    assert "".join(c[-1] for c in cols) == answer[:3]


def test_heldout_split_is_disjoint_and_verifier_is_exact_match():
    task = ArithmeticTask(2, "+", eval_size=50)
    held = {ex.prompt for ex in task.eval_examples()}
    train = {ex.prompt for ex in task.sample(random.Random(0), 2000)}
    assert len(held) > 10 and not held & train
    ex = task.make(12, 34, "+")
    assert task.reward(ex, "640") == 1.0 and task.reward(ex, " 640 ") == 1.0 and task.reward(ex, "64") == 0.0
    assert task.feedback(ex, "650") == "650 wrong =x="
    assert task.feedback(ex, "640") == "640 right"
    assert task.feedback(ex, "6a") == "6a wrong format"
    assert task.with_context(ex, "feedback", attempt="650").endswith("\n21+43=")



def test_carry_filter_and_plain_carry_share(tok):
    from opd_train.models import pretrain_batch

    task, rng = ArithmeticTask(3, "+", eval_size=1), random.Random(0)
    assert task.has_carry(task.make(5, 5, "+")) and not task.has_carry(task.make(123, 456, "+"))
    assert all(task.has_carry(ex) for ex in task.sample(rng, 50, carry=True))
    assert not any(task.has_carry(ex) for ex in task.sample(rng, 50, carry=False))
    drawn = task.sample(rng, 400)
    assert 0.7 < sum(map(task.has_carry, drawn)) / 400 < 0.95  # 1 - 0.55**3 ~ 0.83 need a carry as drawn

    def carry_rate(share):  # plain rows only (no privileged context): the share of them that need a carry
        s = pretrain_batch(task, tok, random.Random(1), 400, context_fraction=0.0, plain_carry_share=share)
        prompts = [t.split("<|user|>")[1].split("<|assistant|>")[0] for t in tok.batch_decode(s.input_ids)]
        return sum(task.has_carry(task.make(int(p[:3][::-1]), int(p[4:7][::-1]), "+")) for p in prompts) / 400

    assert carry_rate(0.0) == 0.0 and carry_rate(1.0) == 1.0
    assert 0.1 < carry_rate(0.2) < 0.3

# -- tokenizer ----------------------------------------------------------------------------------
def test_char_tokenizer_roundtrip_and_chat_template(tok):
    text = "sol 7+5+0=12\n347+085="
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    prompt = R.encode_prompts(tok, ["12+34="])[0]
    assert tok.decode(prompt) == "<bos><|user|>12+34=<|assistant|>"
    assert R.encode_answers(tok, ["640"])[0][-1] == tok.eos_token_id



@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_saved_next_to_a_model_loads_back_unchanged(tmp_path, arch):
    """As in every bundled model dir. transformers 5 gives qwen2 dirs its own tokenizer class,
    which rebuilds the pre-tokenizer and dropped spaces and newlines; load_tokenizer must not."""
    from transformers import Qwen2Config

    from opd_train.tokenizer import load_tokenizer

    built = build_char_tokenizer()
    cfg = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](vocab_size=len(built))
    cfg.save_pretrained(tmp_path)
    built.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "fb 8525 wrong x==x\nsol 2+7+0=09 4+1+0=05\n242+710="
    assert tok(text, add_special_tokens=False).input_ids == built(text, add_special_tokens=False).input_ids
    assert R.encode_prompts(tok, [text]) == R.encode_prompts(built, [text])
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (built.pad_token_id, built.eos_token_id, "left")

# -- packing and sampling ------------------------------------------------------------------------
def test_pack_aligns_completions_under_different_prompts(tok):
    comp, mask = R.pad_completions(R.encode_answers(tok, ["640", "12"]), tok.pad_token_id)
    a = R.pack(R.encode_prompts(tok, ["12+34=", "1+1="]), comp, mask, tok.pad_token_id)
    b = R.pack(R.encode_prompts(tok, ["demo 640\n12+34=", "1+1="]), comp, mask, tok.pad_token_id)
    for s in (a, b):
        assert torch.equal(s.input_ids[:, s.prompt_len:], comp.masked_fill(~mask, tok.pad_token_id))
        assert torch.equal(s.attention_mask[:, s.prompt_len:].bool(), mask)
        # position ids count from each row's first real token
        first = s.attention_mask.argmax(1)
        assert torch.equal(s.position_ids[torch.arange(2), first], torch.zeros(2, dtype=torch.long))
    assert torch.equal(a.targets, b.targets)


def test_generate_logprobs_match_packed_forward(tok):
    """Sampling with left padding + KV cache and the packed training forward agree token by token."""
    model = tiny_llama(tok)
    prompts = R.encode_prompts(tok, ["12+34=", "demo 1234\n12+34=", "sol 1+2+0=03 3+4+0=07\n99+01="])
    ids, am = R.left_pad(prompts, tok.pad_token_id)
    p = ids.shape[1]
    assert am.sum(1).tolist() == list(map(len, prompts)) and bool((am[:, -1] == 1).all())  # right-aligned
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=None, top_p=None, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=am, generation_config=cfg)
    comp = out.sequences[:, p:]
    ref = torch.stack(out.logits, 1).log_softmax(-1).gather(2, comp[..., None])[..., 0]
    is_eos = comp == tok.eos_token_id
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    s = R.pack(prompts, comp, mask, tok.pad_token_id)
    lm = R.LM(model)
    with torch.no_grad():
        lp = R.token_logprobs(lm, R.completion_hidden(lm, s), s)
    torch.testing.assert_close(lp, ref * mask, atol=1e-5, rtol=0)


def test_generate_mask_stops_after_first_eos(tok):
    model = tiny_llama(tok)
    head = torch.nn.Linear(32, len(tok), bias=True)  # EOS is the certain next token
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0
    model.lm_head = head
    comp, mask = R.generate(model, tok, R.encode_prompts(tok, ["1+1="]), max_new_tokens=4, greedy=True)
    assert comp[0, 0] == tok.eos_token_id and mask.tolist() == [[True] + [False] * (comp.shape[1] - 1)]
    assert R.decode(tok, comp, mask) == [""]


def test_ema_teacher_tracks_the_student(tok):
    student = tiny_llama(tok, seed=0)
    ema = EMATeacher(student, rate=0.25)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(student)
    for b, t in zip(before, ema.model.parameters()):
        torch.testing.assert_close(t, b + 0.25)
    assert not any(p.requires_grad for p in ema.model.parameters())
