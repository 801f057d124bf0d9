"""FusedDistillationTrainer in TRL's own loop (CPU, tiny config-built models, local tokenizer):
on the same on-policy completions, per-step losses and the trained weights equal stock
``trl.DistillationTrainer``'s (whose loss is TRL's chunked kernel)."""
import copy
import math

import pytest
import torch

from helpers import assert_same_training, require_extra  # noqa: E402

trl = require_extra("trl", "trl")
from packaging.version import Version  # noqa: E402

if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
    pytest.skip(f"trl {trl.__version__} is outside the tested range (the trl extra: pip install -e '.[trl]')",
                allow_module_level=True)

import transformers as T  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import opd_kernels as ok  # noqa: E402
from opd_kernels.integrations.trl import DistillationConfig, FusedDistillationTrainer, distillation_loss  # noqa: E402
from trl import DistillationTrainer  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402


def tokenizer(n=64):
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def lm(vocab, hidden, seed, **cfg):
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, initializer_range=0.2,
              pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    kw.update(cfg)
    return T.Qwen2ForCausalLM(T.Qwen2Config(**kw))


def prompts(n, length=5, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in torch.randint(2, vocab, (length - k % 3,),
                                                                                   generator=g).tolist())
                                         for k in range(n)]})


class Recording:
    """Records each compute_loss value (exact, unlike the Trainer's rounded logs) and each batch of
    generated completions."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        self.seen.append((loss[0] if return_outputs else loss).item())
        return loss

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.completions.append(out["completion_ids"].tolist())
        return out


class StockRec(Recording, DistillationTrainer):
    pass


class FusedRec(Recording, FusedDistillationTrainer):
    pass


def train(cls, student, teacher, data, tmp_path, trainer_kw=None, **cfg):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, optim="sgd",
                learning_rate=1.0, beta=0.5, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                seed=0, data_seed=0, max_completion_length=6, dataloader_num_workers=0,
                lr_scheduler_type="constant", bf16=False)  # TRL defaults to bf16; exact comparisons run in fp32
    args.update(cfg)
    trainer = cls(model=student, teacher_model=teacher, args=DistillationConfig(**args), train_dataset=data,
                  processing_class=tokenizer(), **(trainer_kw or {}))
    trainer.seen, trainer.completions = [], []
    trainer.train()
    return trainer


# plain SGD: Adam's normalized step would turn rounding-level noise in near-zero gradients into
# lr-sized weight differences, so the weights would not be comparable
@pytest.mark.parametrize("beta,temperature,accum", [(0.5, 1.0, 1), (0.0, 0.7, 1), (1.0, 1.0, 2)])
def test_losses_and_weights_equal_stock_distillation_trainer(tmp_path, beta, temperature, accum):
    student, teacher = lm(257, 32, seed=0), lm(257, 48, seed=1)
    data = prompts(12)
    kw = dict(beta=beta, temperature=temperature, gradient_accumulation_steps=accum)
    stock = train(StockRec, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / "a", **kw)
    fused = train(FusedRec, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / "b", **kw)
    assert stock.completions == fused.completions  # same on-policy samples, so the losses are comparable
    assert_same_training(stock, fused, student, steps=3 * accum)


def test_bf16_like_stock(tmp_path):
    """With TRL's default bf16=True the losses equal stock's (in one CPU process stock's forward
    redirection replaces accelerate's autocast wrapper, so both run in fp32), and under autocast
    itself (the path of a wrapped model) the fused loss is no farther from the float32 loss than
    stock's bf16 loss is (plus 1e-4)."""
    student, teacher = lm(257, 32, seed=0), lm(257, 48, seed=1)
    run = {name: train(cls, copy.deepcopy(student), copy.deepcopy(teacher), prompts(4), tmp_path / name,
                       max_steps=2, bf16=True)
           for name, cls in (("stock", StockRec), ("fused", FusedRec))}
    assert run["stock"].completions == run["fused"].completions
    assert run["fused"].seen == pytest.approx(run["stock"].seen, rel=1e-5, abs=1e-6)
    prompt, completion, mask = _tiny_batch()
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion,
                  completion_mask=mask)
    loss = {}
    for name in ("stock", "fused"):
        t = run[name]
        loss[name + "32"] = t._compute_loss(t.model, inputs, None)[0].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss[name] = t._compute_loss(t.model, inputs, None)[0].item()
    assert loss["stock"] != loss["stock32"]  # autocast really was on
    assert loss["fused32"] == pytest.approx(loss["stock32"], rel=1e-5)
    err, stock_err = abs(loss["fused"] - loss["stock32"]), abs(loss["stock"] - loss["stock32"])
    assert err <= 2 * stock_err + 1e-4, loss


def test_entropy_metric_is_stocks_or_missing(tmp_path):
    """log_entropy=True logs stock's entropy; by default the metric is logged as missing (None)."""
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    logs = {}
    for name, cls, kw in (("stock", StockRec, None), ("on", FusedRec, {"log_entropy": True}),
                          ("off", FusedRec, None)):
        t = train(cls, copy.deepcopy(student), copy.deepcopy(teacher), prompts(4), tmp_path / name, max_steps=2,
                  temperature=0.8, trainer_kw=kw)
        logs[name] = [h["entropy"] for h in t.state.log_history if "entropy" in h]
    assert len(logs["stock"]) == 2 and all(x > 0 for x in logs["stock"])
    assert logs["on"] == pytest.approx(logs["stock"], rel=1e-5)
    assert logs["off"] == [None, None]


def _tiny_batch(vocab=257, B=3, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    return torch.randint(2, vocab, (B, 4), generator=g), torch.randint(2, vocab, (B, K), generator=g), mask


@pytest.mark.parametrize("beta,temperature,n", [(0.3, 0.7, None), (0.0, 1.3, torch.tensor(40.0)), (1.0, 1.0, 17)])
@pytest.mark.parametrize("transform", ["none", "softcap+scale"])
def test_distillation_loss_matches_trl_chunked_divergence(beta, temperature, n, transform):
    """The loss function alone against TRL's own ``_chunked_divergence_loss`` (values and the
    student's gradients), with biases, a logit scale and a softcap when asked."""
    cfg = {} if transform == "none" else dict(final_logit_softcapping=3.0)
    student, teacher = lm(257, 32, seed=0, **cfg), lm(257, 40, seed=1)
    if transform != "none":
        student.config.logit_scale = 0.5
        teacher.config.final_logit_softcapping = 5.0
        student.lm_head.bias = torch.nn.Parameter(torch.randn(257) * 0.3)
    prompt, completion, mask = _tiny_batch()
    ids = torch.cat([prompt, completion], 1)
    hs = ok.hf.hidden_states(student, ids)[:, 3:-1].detach().requires_grad_()
    ht = ok.hf.hidden_states(teacher, ids)[:, 3:-1].detach()
    sh, th = ok.hf.head(student), ok.hf.head(teacher)
    got = distillation_loss(hs, sh, ht, th, mask, beta=beta, temperature=temperature, num_items_in_batch=n)
    g_got = torch.autograd.grad(got, [hs, sh.weight])
    want = _chunked_divergence_loss(hs, ht, sh.weight, th.weight, mask, beta, num_items_in_batch=n,
                                    student_lm_head_bias=sh.bias, student_logit_scale=sh.logit_scale or 1.0,
                                    student_final_logit_softcapping=sh.softcap,
                                    teacher_final_logit_softcapping=th.softcap, temperature=temperature)[0]
    g_want = torch.autograd.grad(want, [hs, sh.weight])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got.item() > 0 and not math.isnan(got.item())


def test_unsupported_model_fails_at_construction(tmp_path):
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    teacher.lm_head = type("Wrapped", (torch.nn.Linear,), {})(32, 257, bias=False)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.lm_head is a .*Wrapped, not a plain torch.nn.Linear"):
        train(FusedDistillationTrainer, student, teacher, prompts(4), tmp_path, max_steps=1)


def test_unmodelled_logit_scaling_fails_at_construction(tmp_path):
    """Stock TRL divides by Granite's ``logits_scaling``; opd_kernels.hf refuses what it does not model."""
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    student.config.logits_scaling = 4.0
    with pytest.raises(ValueError, match=r"config.logits_scaling=4.0 changes the logits in a way opd_kernels.hf "
                                         "does not model"):
        train(FusedDistillationTrainer, student, teacher, prompts(4), tmp_path, max_steps=1)


def test_missing_teacher_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="FusedDistillationTrainer needs a teacher model"):
        train(FusedDistillationTrainer, lm(257, 32, seed=0), None, prompts(4), tmp_path, max_steps=1)


def test_heads_on_different_devices_fail_with_one_line(tmp_path):
    trainer = train(FusedRec, lm(257, 32, seed=0), lm(257, 32, seed=1), prompts(4), tmp_path, max_steps=1)
    meta = torch.nn.Linear(32, 257, bias=False, device="meta")
    trainer.teacher_model.lm_head = meta
    prompt, completion, mask = _tiny_batch()
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=completion,
                  completion_mask=mask)
    with pytest.raises(ValueError, match=r"the student's lm_head is on cpu but the teacher's is on meta: "
                                         r"FusedDistillationTrainer needs both heads on one device"):
        trainer._compute_loss(trainer.model, inputs, None)
