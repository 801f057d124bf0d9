"""The trainer sees real heads: every method's loss equals a float64 oracle built on ``model(...).logits``.

Gemma2 (``final_logit_softcapping``) and Cohere (``logit_scale``) students and teachers, built from
config with the bundled 57-token character tokenizer, tied embeddings, weights scaled so the
transform changes the logits by whole units. For each method, one batch is prepared by the method
(sampling, teacher passes) and its loss and the student's gradients are compared with the same
loss written out from the models' own logits (log_softmax in float64). A trainer that dropped a
softcap or a logit_scale on any side would fail here (`test_transforms_matter` shows by how much).
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

import opd_kernels as ok
from opd_train import cli, models, trainer
from opd_train.methods import METHODS
from opd_train.methods import opsd as opsd_module
from opd_train.methods.sdpo import teacher_contexts
from opd_train.task import ArithmeticTask
from opd_train.tokenizer import build_char_tokenizer

FAMILIES = ("gemma2", "cohere")


def build(family: str, tok, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    else:
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=3.0))
    assert model.config.tie_word_embeddings
    with torch.no_grad():  # logits of a few units, so the softcap / the scale changes them
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok, out = build_char_tokenizer(), {}
    for family in FAMILIES:
        for role, seed in (("student", 0), ("teacher", 1)):
            d = tmp_path_factory.mktemp(f"{family}-{role}")
            build(family, tok, seed).save_pretrained(d)
            tok.save_pretrained(d)
            out[family, role] = d
    return out


@pytest.fixture
def float64(monkeypatch):
    """The trainer loads every model in float64 (the oracle's precision)."""
    def load(path, device="cpu"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(device)
    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(opsd_module, "load", load)


# -- the oracle: each method's loss written out from full float64 logits -----------------------------
def logprobs(model, s) -> torch.Tensor:
    """log_softmax of ``model(...).logits`` at the completion positions, ``[B, C, V]``."""
    logits = model(input_ids=s.input_ids, attention_mask=s.attention_mask, position_ids=s.position_ids,
                   use_cache=False).logits.double()
    return logits[:, s.prompt_len - 1: s.prompt_len - 1 + s.completion.shape[1]].log_softmax(-1)


def gather(lp, s):
    return lp.gather(-1, s.completion[..., None])[..., 0] * s.mask


def mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl(lp_a, lp_b):
    """KL(a ‖ b) per token from log-probabilities."""
    return (lp_a.exp() * (lp_a - lp_b)).sum(-1)


def jsd(lp_p, lp_q, beta):
    """β·KL(p‖M) + (1−β)·KL(q‖M), M = βp + (1−β)q (p: teacher, q: student)."""
    lm = torch.logaddexp(lp_p + torch.log(torch.tensor(beta, dtype=lp_p.dtype)),
                         lp_q + torch.log(torch.tensor(1 - beta, dtype=lp_q.dtype)))
    return beta * kl(lp_p, lm) + (1 - beta) * kl(lp_q, lm)


def bucket(lp_k):
    """Top-k log-probs ``[..., k]`` and the tail's, ``[..., k + 1]``."""
    return torch.cat([lp_k, torch.log1p(-lp_k.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))], -1)


def surrogate(lp, adv, clip):
    ratio = torch.exp(lp - lp.detach())
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def oracle(method, b) -> torch.Tensor:
    tr, a, s = method.tr, method.args, b.seqs
    student = tr.student.model
    lp = logprobs(student, s)
    tok_lp = gather(lp, s)
    name = method.name
    if name in ("sft", "seqkd"):
        return -tok_lp.sum() / s.mask.sum()
    if name == "grpo":
        per = surrogate(tok_lp, b.advantages[:, None], a.ppo_clip)
        if a.grpo_loss_norm == "max-tokens":
            return (per * s.mask).sum() / (s.mask.shape[0] * tr.max_new_tokens)
        return mean(per, s.mask)
    with torch.no_grad():
        if name in ("gkd", "opd", "eopd", "iwopd", "topk-rkl"):
            lp_t = logprobs(tr.teacher.model, s)
        elif name == "opsd":
            ctx = [tr.task.with_context(ex, "solution") for ex in b.examples]
            lp_t = logprobs(method.teacher.model, method.repack(s, ctx))
        elif name == "sdft":
            ctx = [tr.task.with_context(ex, "demo") for ex in b.examples]
            lp_t = logprobs(method.ema.model, method.repack(s, ctx))
        elif name == "sdpo":
            g = method.samples_per_prompt
            ctx = teacher_contexts(tr.task, b.examples, b.texts, b.rewards.tolist(), g, a.sdpo_feedback)
            lp_t = logprobs(method.ema.model, method.repack(s, [c[0] for c in ctx]))
        elif name == "gopd":
            lp_t, lp_r = logprobs(tr.teacher.model, s), logprobs(method.ref.model, s)
    if name == "gkd":
        return mean(jsd(lp_t, lp, a.gkd_beta), s.mask)
    if name == "opd":
        if a.opd_loss == "fullvocab":
            return mean(kl(lp, lp_t), s.mask)
        adv = gather(lp_t, s) - tok_lp.detach()
        return mean(-torch.exp(tok_lp - tok_lp.detach()) * adv, s.mask)
    if name == "eopd":  # reverse KL everywhere, forward KL where the teacher's entropy exceeds τ
        high = (-(lp_t.exp() * lp_t).sum(-1) > a.eopd_entropy_threshold) & s.mask
        assert 0 < high.sum() < s.mask.sum()  # both kinds of token in the batch
        return (kl(lp, lp_t) * s.mask + a.eopd_forward_weight * kl(lp_t, lp) * high).sum() / s.mask.sum()
    if name == "iwopd":  # sampled-token OPD, weighted by 1 + γ (1 - drift before t / total drift), as TRL writes it
        adv = (gather(lp_t, s) - tok_lp.detach()) * s.mask
        drift = adv.abs()
        w = 1 + a.iwopd_gamma * (1 - (drift.cumsum(1) - drift) / drift.sum(1, keepdim=True).clamp(min=1e-8))
        return mean(-torch.exp(tok_lp - tok_lp.detach()) * w * adv, s.mask)
    if name == "topk-rkl":  # reverse KL over the k+1 buckets {the student's top-k, the tail}
        ids = lp.detach().topk(min(a.topk_rkl_k, lp.shape[-1]), -1).indices
        p_k, q_k = lp_t.gather(-1, ids), lp.gather(-1, ids)
        return mean(kl(bucket(q_k), bucket(p_k)), s.mask)
    if name == "opsd":
        return mean(jsd(lp_t, lp, a.opsd_beta), s.mask)
    if name == "sdft":
        return mean(kl(lp_t, lp), s.mask)
    if name == "sdpo":  # k+1 buckets: the student's top-k ids and the tail
        whose = lp.detach() if a.sdpo_topk_from == "student" else lp_t
        ids = whose.topk(b.topk_ids.shape[-1], -1).indices
        assert torch.equal(ids, b.topk_ids)
        p_k, q_k = lp_t.gather(-1, ids), lp.gather(-1, ids)
        sd = mean(jsd(bucket(p_k), bucket(q_k), a.sdpo_alpha), b.sd_mask)
        w = a.sdpo_distill_weight
        return sd if w == 1 else (1 - w) * mean(surrogate(tok_lp, b.advantages[:, None], a.ppo_clip), s.mask) + w * sd
    lam = a.gopd_reward_scale  # gopd
    if a.gopd_loss == "fullvocab":
        target = (lam * lp_t + (1 - lam) * lp_r).log_softmax(-1)
        return mean(kl(lp, target), s.mask)
    lp_tok_t, lp_tok_r = gather(lp_t, s), gather(lp_r, s)
    adv = lam * (lp_tok_t - lp_tok_r) - (tok_lp.detach() - lp_tok_r)
    return mean(surrogate(tok_lp, adv, a.ppo_clip), s.mask)


VARIANTS = [["sft"], ["seqkd"], ["grpo"], ["grpo", "--grpo-loss-norm", "max-tokens"], ["gkd"], ["opd"], ["opd", "--opd-loss", "fullvocab"],
            ["eopd"], ["iwopd"], ["topk-rkl", "--topk-rkl-k", "5"], ["opsd"],
            ["sdft"], ["sdpo", "--sdpo-topk", "5"],
            ["sdpo", "--sdpo-topk", "5", "--sdpo-distill-weight", "0.5", "--sdpo-topk-from", "teacher"], ["gopd"], ["gopd", "--gopd-loss", "sampled"]]


def setup(family, variant, dirs, tmp_path):
    name = variant[0]
    argv = ["--method", *variant, "--preset", "smoke", "--batch-size", "8", "--eval-size", "4",
            "--student", str(dirs[family, "student"]), "--out", str(tmp_path), "--max-new-tokens", "5"]
    if METHODS[name].teacher == "external":
        argv += ["--teacher", str(dirs[family, "teacher"])]
    args = cli.parse_args(argv)
    task = trainer.make_task(args)
    tr = trainer.build(args, task, None, 0, 1, torch.device("cpu"), lambda *x: None)
    return METHODS[name](tr), task


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(x.lstrip("-") for x in v))
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_the_logits_oracle(family, variant, dirs, tmp_path, float64):
    method, task = setup(family, variant, dirs, tmp_path)
    params = [p for p in method.tr.student.model.parameters() if p.requires_grad]
    assert params[0].dtype == torch.float64
    b = method.prepare(task.sample(random.Random(0), method.args.batch_size // method.samples_per_prompt))
    if b.advantages is not None:  # untrained models earn no reward: give the policy-gradient terms some signal
        b.advantages = torch.randn(b.advantages.shape, generator=torch.Generator().manual_seed(1))
    if method.name == "eopd":  # τ at the batch's median teacher entropy: forward KL on about half the tokens
        method.args.eopd_entropy_threshold = float(b.teacher_entropy[b.seqs.mask].median())
    loss, _ = method.loss(b)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want_loss = oracle(method, b)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-12)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_transforms_matter(family, dirs, float64):
    """Without its softcap / logit_scale the head's logits differ by whole units (so the oracle test can fail)."""
    model = models.load(dirs[family, "student"])
    head = ok.hf.head(model)
    assert (head.softcap, head.logit_scale) == ((2.0, None) if family == "gemma2" else (None, 3.0))
    h = ok.hf.hidden_states(model, torch.arange(10)[None])
    bare = ok.hf.Head(head.weight, head.bias)
    assert (head.logits(h) - bare.logits(h)).abs().max() > 1.0


def test_fused_calls_carry_the_softcap(dirs, tmp_path, float64, monkeypatch):
    """Every fused-op call of GKD and OPD (full vocabulary and sampled) passes each side's softcap."""
    calls = []
    for fn in ("fused_linear_distill_loss", "fused_linear_token_logprobs"):
        real = getattr(ok, fn)
        monkeypatch.setattr(ok, fn, lambda *x, _real=real, _fn=fn, **kw: calls.append((_fn, kw)) or _real(*x, **kw))
    for variant in (["gkd"], ["opd"], ["opd", "--opd-loss", "fullvocab"]):
        method, task = setup("gemma2", variant, dirs, tmp_path)
        method.loss(method.prepare(task.sample(random.Random(0), 2)))
    assert {fn for fn, _ in calls} == {"fused_linear_distill_loss", "fused_linear_token_logprobs"}
    for fn, kw in calls:
        caps = [kw.get("softcap")] if fn == "fused_linear_token_logprobs" else [kw.get("student_softcap"),
                                                                                kw.get("teacher_softcap")]
        assert caps == [2.0] * len(caps), (fn, kw)


def test_a_head_the_trainer_cannot_see_through_fails_before_training(dirs, tmp_path, capsys):
    """A config option that changes the logits in a way `opd_kernels.hf` does not model: one error line
    naming the flag, the directory and the class, exit status 2."""
    from opd_train.train import main
    d = tmp_path / "wrapped"
    model = models.load(dirs["gemma2", "student"])
    model.save_pretrained(d)
    build_char_tokenizer().save_pretrained(d)
    (d / "config.json").write_text((d / "config.json").read_text()
                                   .replace('"final_logit_softcapping": 2.0', '"final_logit_softcapping": 2.0, '
                                            '"logits_scaling": 4.0'))
    capsys.readouterr()
    assert main(["--method", "sft", "--preset", "smoke", "--student", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m opd_train: error: --student") and "\n" not in err, err
    assert "Gemma2ForCausalLM" in err and "logits_scaling" in err
