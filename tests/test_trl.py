"""FusedGKDTrainer in TRL's own training loop (CPU, tiny config-built models, local tokenizer):
per-step losses and the trained weights equal stock ``GKDTrainer``'s, and a step's peak memory at a
real vocabulary (V=151936) is lower; ``gkd_loss`` passes the heads' logit transforms to the fused op."""
import copy
import ctypes
import gc
import importlib

import pytest
import torch

from helpers import assert_same_training, require_extra  # noqa: E402

trl = require_extra("trl", "trl")
from packaging.version import Version  # noqa: E402

if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
    pytest.skip(f"trl {trl.__version__} is outside the tested range", allow_module_level=True)

import transformers as T  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402

import opd_kernels as ok  # noqa: E402
import reference as oracle  # noqa: E402
import transform_cases as tc  # noqa: E402
from reference import softcap_f64  # noqa: E402
from opd_kernels.integrations import trl as okt  # noqa: E402
from opd_kernels.integrations.trl import FusedGKDTrainer, GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402


def tokenizer(n=64):
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, n)}}
    tok = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                    pad_token="<pad>", eos_token="<eos>")
    return tok


def lm(vocab, hidden, seed):
    torch.manual_seed(seed)
    cfg = T.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, initializer_range=0.2,
                        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return T.Qwen2ForCausalLM(cfg)


def dataset(n, prompt_len, completion_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "completion": []}
    for i in range(n):
        p = prompt_len - i % 3  # ragged prompts and completions
        c = completion_len - (i * 2) % 5
        rows["prompt"].append(torch.randint(2, vocab, (p,), generator=g).tolist())
        rows["completion"].append(torch.randint(2, vocab, (c,), generator=g).tolist() + [1])
    return Dataset.from_dict(rows)


def collate(examples):
    """input_ids right-padded; labels -100 on prompt and padding; prompts left-padded (for generation)."""
    L = max(len(e["prompt"]) + len(e["completion"]) for e in examples)
    P = max(len(e["prompt"]) for e in examples)
    out = {k: torch.zeros(len(examples), n, dtype=torch.long)
           for k, n in (("input_ids", L), ("attention_mask", L), ("prompts", P), ("prompt_attention_mask", P))}
    out["labels"] = torch.full((len(examples), L), -100)
    for i, e in enumerate(examples):
        p, c = e["prompt"], e["completion"]
        out["input_ids"][i, : len(p) + len(c)] = torch.tensor(p + c)
        out["attention_mask"][i, : len(p) + len(c)] = 1
        out["labels"][i, len(p): len(p) + len(c)] = torch.tensor(c)
        out["prompts"][i, P - len(p):] = torch.tensor(p)
        out["prompt_attention_mask"][i, P - len(p):] = 1
    return out


class Recording:
    """Records each compute_loss value (exact, unlike the Trainer's rounded logs)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        self.seen.append((loss[0] if return_outputs else loss).item())
        return loss


class StockRec(Recording, GKDTrainer):
    seen = None


class FusedRec(Recording, FusedGKDTrainer):
    seen = None


def train(cls, student, teacher, data, tmp_path, callbacks=(), **cfg):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=3e-2,
                lmbda=0.0, beta=0.5, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                data_seed=0, max_new_tokens=4, dataloader_num_workers=0, lr_scheduler_type="constant",
                bf16=False)  # TRL defaults to bf16 autocast; exact comparisons run in fp32
    args.update(cfg)
    trainer = cls(model=student, teacher_model=teacher, args=GKDConfig(**args), train_dataset=data,
                  data_collator=collate, processing_class=tokenizer(), callbacks=list(callbacks))
    trainer.seen = []
    trainer.train()
    return trainer


@pytest.mark.parametrize("beta,accum", [(0.5, 1), (0.0, 1), (1.0, 2)])
def test_losses_and_weights_equal_stock_gkd(tmp_path, beta, accum):
    student, teacher = lm(257, 32, seed=0), lm(257, 48, seed=1)
    data = dataset(16, 6, 9, 64)
    # plain SGD: Adam's normalized step would turn rounding-level noise in near-zero gradients into
    # lr-sized weight differences, so the weights would not be comparable
    kw = dict(beta=beta, gradient_accumulation_steps=accum, optim="sgd", learning_rate=1.0)
    stock = train(StockRec, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / "a", **kw)
    fused = train(FusedRec, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / "b", **kw)
    assert_same_training(stock, fused, student, steps=4 * accum)


def test_bf16_autocast_like_stock(tmp_path):
    """With TRL's default bf16=True (autocast inside the forward), the first step's loss is no
    farther from the float32 loss than stock's bf16 loss is (plus 1e-4)."""
    student, teacher = lm(257, 32, seed=0), lm(257, 48, seed=1)
    data = dataset(8, 6, 9, 64)
    run = {name: train(cls, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / name, max_steps=2,
                       bf16=bf16).seen
           for name, cls, bf16 in (("fp32", StockRec, False), ("stock", StockRec, True), ("fused", FusedRec, True))}
    assert run["stock"][0] != run["fp32"][0]  # bf16 really was on
    err, stock_err = (abs(run[k][0] - run["fp32"][0]) for k in ("fused", "stock"))
    assert err <= 2 * stock_err + 1e-4, run


def test_on_policy_generation_runs(tmp_path):
    """lmbda=1: every step samples from the student (TRL's generate path), then the fused loss."""
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    fused = train(FusedRec, student, teacher, dataset(8, 6, 9, 64), tmp_path, lmbda=1.0, max_steps=2)
    assert len(fused.seen) == 2 and all(x == x and x > 0 for x in fused.seen)


def test_eval_returns_logits(tmp_path):
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    data = dataset(4, 6, 9, 64)
    fused = train(FusedRec, student, teacher, data, tmp_path, max_steps=1)
    batch = collate([data[i] for i in range(2)])
    loss, out = fused.compute_loss(fused.model, batch, return_outputs=True)
    with torch.no_grad():
        want = fused.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)


def _status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(key)


class PeakRSS(T.TrainerCallback):
    """Per training step: peak resident set size above the resident size at the step's start
    (``/proc/self/clear_refs`` mode 5 resets VmHWM; freed memory is first returned to the OS)."""

    def __init__(self):
        self.peaks = []

    def on_step_begin(self, args, state, control, **kw):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def on_step_end(self, args, state, control, **kw):
        self.peaks.append(_status_mb("VmHWM") - self.base)


def _can_reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmHWM") > 0
    except (OSError, RuntimeError):
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs (peak RSS reset)")
def test_peak_memory_per_step_lower_at_real_vocab(tmp_path):
    V, B, L = 151936, 2, 64
    student, teacher = lm(V, 16, seed=0), lm(V, 16, seed=1)
    data = dataset(8, 8, L - 8, 64)
    logits_mb = B * (L - 1) * V * 4 / 2 ** 20  # one fp32 [B, L, V] logits tensor
    peaks = {}
    for name, cls in (("stock", StockRec), ("fused", FusedRec)):
        cb = PeakRSS()
        train(cls, copy.deepcopy(student), copy.deepcopy(teacher), data, tmp_path / name, callbacks=[cb],
              max_steps=3, learning_rate=1e-3)
        peaks[name] = max(cb.peaks[1:])  # step 0 also allocates the optimizer state
    print(f"peak RSS per step: stock {peaks['stock']:.0f} MB, fused {peaks['fused']:.0f} MB "
          f"(one [B, L, V] fp32 logits = {logits_mb:.0f} MB)")
    assert peaks["stock"] > 2 * logits_mb  # the measurement sees the logits buffers
    assert peaks["fused"] < peaks["stock"] - 2 * logits_mb


def test_version_outside_tested_range_fails_at_import(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "0.19.1")
    with pytest.raises(ImportError, match=r"tested with trl>=1.16,<1.17 .*found trl 0.19.1"):
        importlib.reload(okt)
    monkeypatch.undo()
    importlib.reload(okt)


def test_unsupported_model_fails_at_construction(tmp_path):
    student, teacher = lm(257, 32, seed=0), lm(257, 32, seed=1)
    student.lm_head = type("Wrapped", (torch.nn.Linear,), {})(32, 257, bias=False)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.lm_head is a .*Wrapped, not a plain torch.nn.Linear"):
        train(FusedGKDTrainer, student, teacher, dataset(4, 6, 9, 64), tmp_path, max_steps=1)


def test_gkd_loss_matches_generalized_jsd_loss():
    """The loss function alone, at a temperature != 1 and with num_items_in_batch (TRL's formula)."""
    student, teacher = lm(257, 32, seed=0), lm(257, 40, seed=1)
    batch = collate([dataset(3, 6, 9, 64)[i] for i in range(3)])
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    for beta, T_, n in ((0.3, 0.7, None), (0.0, 1.3, torch.tensor(40)), (1.0, 1.0, 17)):
        hs = ok.hf.hidden_states(student, ids, attn)[:, :-1]
        ht = ok.hf.hidden_states(teacher, ids, attn)[:, :-1].detach()
        got = okt.gkd_loss(hs, ok.hf.head(student), ht, ok.hf.head(teacher), labels, beta=beta, temperature=T_,
                           num_items_in_batch=n)
        s = student(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
        t = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].double().detach()
        want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=T_, num_items_in_batch=n)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_missing_trl_fails_with_the_install_hint(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    with pytest.raises(ImportError, match=r"needs TRL: pip install 'opd-kernels\[trl\]'"):
        importlib.reload(okt)
    monkeypatch.undo()
    importlib.reload(okt)


def test_trl_gkd_loss_passes_the_heads_transforms():
    """``integrations.trl.gkd_loss`` builds its kwargs from ``hf.Head.kwargs(side)``: a Gemma-like
    softcap student head and a Cohere-like scaled teacher head reach the fused op."""
    require_extra("trl", "trl")
    from opd_kernels.integrations import trl as trl_int
    hs, ws, bs, ht, wt, bt, *_ = tc.models(torch.float64, "cpu")
    student = ok.hf.Head(weight=ws, softcap=2.0)
    teacher = ok.hf.Head(weight=wt, bias=bt, logit_scale=0.5)
    assert set(student.kwargs("student")) == {"student_softcap"}
    assert set(teacher.kwargs("teacher")) == {"teacher_bias", "teacher_logit_scale"}
    labels = tc.targets(banned=0, dev="cpu")[None]
    x = hs[None].clone().requires_grad_()
    loss = trl_int.gkd_loss(x, student, ht[None], teacher, labels, beta=tc.BETA, temperature=tc.TEMP)
    x64 = hs.clone().requires_grad_()
    mask = labels[0] != -100
    rows = oracle.divergence_rows(softcap_f64(x64 @ ws.T, 1.0, 2.0), softcap_f64(ht @ wt.T + bt, 0.5), "jsd", tc.BETA,
                                  tc.TEMP)
    want = oracle.reduce(rows, mask, "sum") / mask.sum()
    oracle.close(loss, want, torch.float64)
    oracle.close(torch.autograd.grad(loss, x)[0][0], torch.autograd.grad(want, x64)[0], torch.float64, "grad")
