"""Tiny Llama/Qwen2-style models for the bundled task, built from config and cached on disk.

The teacher (a Llama) is trained once by SFT until it solves the task; the student (a smaller
Qwen2) gets a brief SFT so it starts weak. Both pre-trainings mix prompts with and without
privileged context (worked solution, demonstration, feedback on an attempt) so that the
self-teacher methods (OPSD, SDFT, SDPO) find a student that can use such context in-context.

How the student is weak matters for on-policy distillation. Its plain (context-free) rows are
mostly carry-free problems (`ModelSpec.plain_carry_share`, 0.2 in the presets), so it starts
near the carry-free share of held-out problems (~14% for 3 digits) and has *seen* carries
without having learned when they occur: at carry positions it hedges between the candidate
digits (mean probability of the right one ~0.47, measured). Reverse-KL methods can move mass
among tokens the student already gives some probability, so they lift this student quickly
(default OPD preset: ~14% -> 55-90% in 1000 steps). Trained on carry-free rows only (share 0),
it instead learned "digit sum >= 10 -> 9" with probability ~0.99 at carry positions; the right
digit then has probability ~0, its reverse-KL gradient scales with that probability, and OPD
pushed the wrong tokens' mass onto letters (13.7% -> 0%, measured). Trained on all problems as
drawn, the same small model stayed on a plateau (0.4% after 300 steps) that distillation did
not leave either.

Each pre-trained model is saved with ``save_pretrained`` (plus the tokenizer) under
``$OPD_TRAIN_CACHE`` (default ``~/.cache/opd_train``) in a directory named after a hash of
everything that determines it, so it is trained once per machine and shared by runs and tests.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from . import rollout as R
from .task import CONTEXT_KINDS, ArithmeticTask
from .tokenizer import build_char_tokenizer

CACHE_VERSION = 3  # bump when pre-training code changes what a cached model is
PRETRAIN_SEED = 0  # the cached teacher/student do not depend on --seed


@dataclass(frozen=True)
class ModelSpec:
    arch: str          # "llama" | "qwen2"
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    steps: int         # SFT steps of pre-training
    batch_size: int
    lr: float
    context_fraction: float = 0.5  # share of pre-training prompts carrying privileged context
    # Share of plain (context-free) pre-training rows whose problem needs a carry; None: as drawn
    # (most 3-digit additions do). A small share leaves a student that has seen carries but not
    # learned them, so it hedges between candidate digits: see `pretrain_batch`.
    plain_carry_share: float | None = None
    max_positions: int = 128
    # Fields below enter the cache key only when set (models cached before they existed keep their key).
    ops: str | None = None       # pre-training operations (None: the run's task's)
    prior_ops: str = ""          # operations learned as a plain skill: plain rows as drawn, never context
    chain_free: bool = False     # plain rows without a carry chain (an imperfect teacher: fails on chains)
    context_kinds: tuple[str, ...] = CONTEXT_KINDS  # kinds of privileged context mixed in


_LATER_FIELDS = ("ops", "prior_ops", "chain_free", "context_kinds")


def spec_key(spec: ModelSpec) -> dict:
    """The spec as it enters the cache key: fields added after `CACHE_VERSION` 3 only where set."""
    default = ModelSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__ if f not in _LATER_FIELDS})
    return {k: v for k, v in asdict(spec).items() if k not in _LATER_FIELDS or v != getattr(default, k)}


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_TRAIN_CACHE", Path.home() / ".cache" / "opd_train"))


def build(spec: ModelSpec, tok) -> torch.nn.Module:
    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[spec.arch]
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=spec.d_model, intermediate_size=spec.mlp,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                  tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return cls(cfg)


@functools.lru_cache(maxsize=None)
def _one_op_task(digits: int, op: str) -> ArithmeticTask:
    """A sampler of ``op`` problems only (for pre-training rows re-drawn within one operation)."""
    return ArithmeticTask(digits, op, eval_size=1)


def pretrain_batch(task, tok, rng: random.Random, n: int, context_fraction: float,
                   plain_carry_share: float | None = None, *, context_kinds=CONTEXT_KINDS,
                   prior_ops: str = "", chain_free: bool = False) -> R.Seqs:
    """SFT rows: a prompt (plain, or with a random kind of privileged context) and its answer.

    With ``plain_carry_share`` a plain row needs a carry with that probability (else it is
    carry-free; ``None`` takes problems as drawn), while rows with context cover all problems
    as drawn: the model sees carries worked out in context but rarely has to find them itself.
    A problem of an operation in ``prior_ops`` is always a plain row as drawn (a skill the model
    simply learns); ``chain_free`` keeps plain rows without carry chains.
    """
    chain = False if chain_free else None
    users, examples = [], []
    for ex in task.sample(rng, n):
        op = task.domain(ex)
        if op in prior_ops:
            users.append(ex.prompt)
        elif rng.random() < context_fraction:
            kind = rng.choice(context_kinds)
            attempt = task.corrupt(rng, ex) if kind in ("feedback", "hint") else None
            users.append(task.with_context(ex, kind, attempt=attempt))
        else:
            if plain_carry_share is not None or chain_free:
                carry = None if plain_carry_share is None else rng.random() < plain_carry_share
                ex = _one_op_task(task.digits, op).sample(rng, 1, carry=carry, chain=chain)[0]
            users.append(ex.prompt)
        examples.append(ex)
    answers = R.encode_answers(tok, [ex.answer for ex in examples])
    comp, mask = R.pad_completions(answers, tok.pad_token_id)
    return R.pack(R.encode_prompts(tok, users), comp, mask, tok.pad_token_id)


def pretrain(model, tok, task, spec: ModelSpec, seed: int, desc: str) -> None:
    """Plain SFT (token cross-entropy via the fused logprob op), cosine LR with warmup."""
    from .methods.sft import sft_loss

    rng = random.Random(seed)
    torch.manual_seed(seed)
    lm = R.LM(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))))
    bar = tqdm(range(spec.steps), desc=desc, dynamic_ncols=True, leave=False)
    for _ in bar:
        loss = sft_loss(lm, pretrain_batch(task, tok, rng, spec.batch_size, spec.context_fraction,
                                           spec.plain_carry_share, context_kinds=spec.context_kinds,
                                           prior_ops=spec.prior_ops, chain_free=spec.chain_free))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def get_pretrained(role: str, spec: ModelSpec, task: ArithmeticTask, seed: int, log=print) -> Path:
    """Directory of the pre-trained ``role`` ("teacher"/"student") model, training it if not cached.

    It is pre-trained on ``task``'s digits with ``spec.ops`` (default: ``task``'s operations) and
    evaluated on held-out problems of those operations."""
    if spec.ops is not None and spec.ops != task.ops:
        task = ArithmeticTask(task.digits, spec.ops, eval_size=len(task.eval_examples()))
    key = json.dumps({"v": CACHE_VERSION, "role": role, "spec": spec_key(spec), "seed": seed,
                      "task": {"digits": task.digits, "ops": task.ops}}, sort_keys=True)
    path = cache_dir() / f"{role}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (path / "meta.json").exists():
        return path
    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = build(spec, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pre-training the {role} ({spec.arch}, {n_params / 1e6:.2f}M params, {spec.steps} SFT steps); "
        f"cached at {path}")
    t0 = time.time()
    pretrain(model, tok, task, spec, seed, desc=f"pre-train {role}")
    acc = R.evaluate(model, tok, task, task.eval_examples())
    log(f"{role}: held-out exact match {100 * acc:.1f}% after {time.time() - t0:.0f}s of pre-training")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "meta.json").write_text(json.dumps({"key": json.loads(key), "eval_accuracy": acc,
                                               "params": n_params, "seconds": time.time() - t0}, indent=1))
    try:
        os.rename(tmp, path)  # atomic publish; a concurrent writer may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device)
