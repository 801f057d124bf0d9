"""Sequences, sampling and per-token log-probabilities: everything methods share.

Layout. A batch of (prompt, completion) pairs is packed as ``[left pad | prompt | completion |
right pad]`` with every prompt right-aligned at column ``P``, so completion token ``j`` of every
row sits at column ``P + j`` and is predicted by the hidden state at column ``P + j - 1``. Two
packings of the *same* completions under different prompts (the student's prompt and a teacher's
prompt with privileged context) therefore give hidden states of the same shape ``[B, C, d]`` that
line up token for token — which is what the fused distillation ops take.

Models are seen through `opd_train.lm.LM` (re-exported here): backbone hidden states plus the
real head (bias, tied, padded vocabulary, softcap, logit_scale) from `opd_kernels.hf`. Losses
never build ``[B, C, V]`` logits; they call the fused-linear ops through `opd_train.lm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .lm import IGNORE, LM, logprobs_at, teacher_topk  # noqa: F401 - re-exported: methods use R.LM, R.teacher_topk
from .lm import token_logprobs as lm_token_logprobs


# -- encoding ---------------------------------------------------------------------------------
def _render(tok, content: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=False)


def _template_parts(tok) -> tuple[str, str] | None:
    """(prefix, suffix) if the chat template inserts the user content verbatim, else None.

    Rendering the Jinja template costs ~1 ms per prompt, more than a tiny model's forward;
    templates that just wrap the content are rendered once and reused (checked on two probes).
    """
    if not hasattr(tok, "_opd_template_parts"):
        parts, probe = None, "\x00"
        pre, _, suf = _render(tok, probe).partition(probe)
        if all(_render(tok, c) == pre + c + suf for c in ("12+34=", "a b\nc ")):
            parts = (pre, suf)
        tok._opd_template_parts = parts
    return tok._opd_template_parts


def encode_prompts(tok, contents: list[str]) -> list[list[int]]:
    """Token ids of user turns through the tokenizer's chat template, each ready for the answer."""
    parts = _template_parts(tok)
    texts = [parts[0] + c + parts[1] if parts else _render(tok, c) for c in contents]
    return tok(texts, add_special_tokens=False).input_ids


def encode_answers(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of assistant answers, each terminated by EOS (what generation must produce)."""
    return [ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False).input_ids]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, P], attention_mask [B, P] long)``, every row ending at column P."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    am = torch.zeros(len(prompts), p, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
        am[i, p - len(x):] = 1
    return ids, am


def pad_completions(answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(ids [B, C], mask [B, C] bool)``."""
    c = max(len(a) for a in answers)
    ids = torch.full((len(answers), c), pad_id, dtype=torch.long)
    mask = torch.zeros(len(answers), c, dtype=torch.bool)
    for i, a in enumerate(answers):
        ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        mask[i, : len(a)] = True
    return ids, mask


@dataclass
class Seqs:
    """Packed ``[left pad | prompt | completion | right pad]`` rows (see the module docstring)."""
    input_ids: torch.Tensor       # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    position_ids: torch.Tensor    # [B, P + C], counted from each row's first real token
    prompt_len: int               # P
    completion: torch.Tensor      # [B, C] token ids (pad where not mask)
    mask: torch.Tensor            # [B, C] bool: real completion tokens (EOS included)

    @property
    def targets(self) -> torch.Tensor:
        """Completion ids with ``IGNORE`` at padding, as the ops' ``targets``."""
        return self.completion.masked_fill(~self.mask, IGNORE)


def pack(prompts: list[list[int]], completion: torch.Tensor, mask: torch.Tensor, pad_id: int) -> Seqs:
    ids, am = left_pad(prompts, pad_id)
    p, dev = ids.shape[1], completion.device
    ids = torch.cat([ids.to(dev), completion.masked_fill(~mask, pad_id)], dim=1)
    am = torch.cat([am.to(dev), mask.long()], dim=1)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    return Seqs(ids, am, pos, p, completion, mask)


def select(s: Seqs, rows: torch.Tensor | slice) -> Seqs:
    """The rows ``rows`` of ``s`` (same prompt length and completion width; a slice gives views)."""
    return Seqs(s.input_ids[rows], s.attention_mask[rows], s.position_ids[rows], s.prompt_len,
                s.completion[rows], s.mask[rows])


def completion_hidden(lm: nn.Module, s: Seqs) -> torch.Tensor:
    """Hidden states ``[B, C, d]`` that predict the completion tokens (``lm`` is an `LM` or its DDP)."""
    h = lm(s.input_ids, s.attention_mask, s.position_ids)
    return h[:, s.prompt_len - 1: s.prompt_len - 1 + s.completion.shape[1]]


def token_logprobs(lm: LM, hidden: torch.Tensor, s: Seqs, temperature: float = 1.0) -> torch.Tensor:
    """``log p(y_t)`` of the completion tokens, ``[B, C]``, 0 at padding (fused: no logits built)."""
    return lm_token_logprobs(lm, hidden, s.targets, temperature)


# -- sampling ---------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, tok, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False, vocab_size: int | None = None,
             synced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt with HF ``generate`` (KV cache).

    Returns ``(completion [B, C], mask [B, C])``; the mask covers tokens up to and including the
    first EOS (all tokens if none was produced). Sampling is plain ancestral sampling at
    ``temperature`` (no top-k/top-p), so the samples follow the policy the losses assume. With
    ``vocab_size`` only the first ``vocab_size`` tokens can be drawn (the `LM` of the losses).
    ``synced``: every process runs the same number of forward passes (an FSDP-sharded model, whose
    forward is a collective), until all are done.
    """
    dev = next(model.parameters()).device
    ids, am = left_pad(prompts, tok.pad_token_id)
    p = ids.shape[1]
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
        top_k=None, top_p=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id)
    was_training = model.training
    model.eval()
    extra = {} if vocab_size is None else {"logits_processor": LogitsProcessorList([_FirstTokens(vocab_size)])}
    if synced:
        extra["synced_gpus"] = True
    out = model.generate(input_ids=ids.to(dev), attention_mask=am.to(dev), generation_config=cfg, **extra)
    model.train(was_training)
    comp = out[:, p:]
    is_eos = comp == tok.eos_token_id
    # keep tokens up to and including the first EOS
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return comp, mask


class _FirstTokens(LogitsProcessor):
    """Keeps sampling inside the first ``n`` tokens (padded lm_head rows are never drawn)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.arange(self.n, scores.shape[1], device=scores.device), float("-inf"))


def decode(tok, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion texts without EOS/padding."""
    keep = mask & (completion != tok.eos_token_id)
    return [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(completion, keep)]


@torch.no_grad()
def evaluate(model: nn.Module, tok, task, examples, *, max_new_tokens: int | None = None,
             batch_size: int = 512, vocab_size: int | None = None, prompt=None, synced: bool = False) -> float:
    """Held-out exact-match accuracy of greedy decoding; ``prompt(ex)`` gives the user message
    (default: the plain prompt, no privileged context)."""
    scores = evaluate_each(model, tok, task, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           vocab_size=vocab_size, prompt=prompt, synced=synced)
    return sum(scores) / max(1, len(examples))


@torch.no_grad()
def evaluate_each(model: nn.Module, tok, task, examples, *, max_new_tokens: int | None = None,
                  batch_size: int = 512, vocab_size: int | None = None, prompt=None,
                  synced: bool = False) -> list[float]:
    """`evaluate`'s verifier reward of each example (for accuracies per domain)."""
    max_new_tokens = max_new_tokens or task.max_answer_chars + 2
    prompt = prompt or (lambda ex: ex.prompt)
    scores = []
    for i in range(0, len(examples), batch_size):
        exs = examples[i: i + batch_size]
        comp, mask = generate(model, tok, encode_prompts(tok, [prompt(ex) for ex in exs]),
                              max_new_tokens=max_new_tokens, greedy=True, vocab_size=vocab_size, synced=synced)
        scores += [task.reward(ex, text) for ex, text in zip(exs, decode(tok, comp, mask))]
    return scores
