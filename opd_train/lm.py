"""Every model as the losses see it, through `opd_kernels.hf`: hidden states and the real head.

A model's logits are ``c * tanh(((h @ W.T + b) * logit_scale) / c)`` over the first
``vocab_size`` rows of ``W`` (``c``: Gemma 2/3's ``final_logit_softcapping``; ``logit_scale``:
Cohere's; ``W`` is the embedding matrix when tied). `LM` reads all of that once with
`opd_kernels.hf.head`, which refuses a head it cannot see through (a wrapped ``lm_head``, an
unverified architecture, a config option that changes the logits in an unmodelled way) with a
``ValueError`` naming the class; the trainer turns that into a one-line error before training.

The loss functions below are the only places the trainer calls the fused ops, and each passes
every side's head (weight, bias, softcap, logit_scale) — so no method can forget a transform.
Sampling uses the model's own ``generate``, which applies the same transforms.

Precision (``--dtype bf16``): the parameters stay fp32 (the master weights the optimizer updates);
`LM` runs the backbone under ``torch.autocast(bfloat16)`` and hands the fused ops bf16 hidden
states and a bf16 copy of the head, which they read with fp32 accumulation (their losses are fp32).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

import opd_kernels as ok

IGNORE = -100


class LM(nn.Module):
    """A causal LM as (hidden states, head). ``forward`` returns the backbone's ``[B, T, d]``.

    Wrapping this module (not the HF model) in DDP keeps gradient all-reduce working while the
    loss is computed outside ``forward`` by the fused ops. ``vocab_size``: use only the first
    rows of a padded head.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        seen = ok.hf.head(model)  # ValueError naming the class if the head is not seen through
        self.model = model
        self.vocab_size = vocab_size
        self.compute_dtype = compute_dtype  # None: the parameters' dtype; torch.bfloat16: autocast
        self.sharded = False  # FSDP2 (`opd_train.fsdp`): run the model's own (hooked) forward
        self.softcap, self.logit_scale = seen.softcap, seen.logit_scale

    def forward(self, input_ids, attention_mask, position_ids):
        with autocast(input_ids.device, self.compute_dtype):
            h = ok.hf.hidden_states(self.model, input_ids, attention_mask, position_ids=position_ids,
                                    through_forward=self.sharded)
        return h if self.compute_dtype is None else h.to(self.compute_dtype)

    @property
    def head(self) -> ok.hf.Head:
        """The head as the fused ops take it: the live parameters (gradients reach the model),
        cut to ``vocab_size`` rows, with the model's softcap and logit_scale."""
        out = self.model.get_output_embeddings()
        w, b = full(out.weight), None if out.bias is None else full(out.bias)
        if self.vocab_size is not None:
            w, b = w[: self.vocab_size], None if b is None else b[: self.vocab_size]
        if self.compute_dtype is not None:  # a differentiable cast: gradients reach the fp32 weights
            w, b = w.to(self.compute_dtype), None if b is None else b.to(self.compute_dtype)
        return ok.hf.Head(w, b, self.softcap, self.logit_scale)

    @property
    def rows(self) -> int:
        """Vocabulary entries the losses use."""
        return self.vocab_size or self.model.get_output_embeddings().weight.shape[0]


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) parameter gathered whole, differentiably; other tensors as they are.
    Under FSDP the student's forward has already gathered its lm_head (the root) for the step."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for ``None`` (full precision)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# -- the fused-op calls (each carries every side's head) ------------------------------------------
def token_logprobs(lm: LM, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log p(y_t)`` ``[B, C]`` of ``targets`` (``IGNORE`` at padding -> 0); no logits built."""
    h = lm.head
    return ok.fused_linear_token_logprobs(hidden, h.weight, targets, temperature=temperature, ignore_index=IGNORE,
                                          **h.kwargs())


def distill_loss(student: LM, hidden: torch.Tensor, teacher: LM, teacher_hidden: torch.Tensor, **opts):
    """`opd_kernels.fused_linear_distill_loss` between two models' heads (``opts``: divergence, mask, ...)."""
    s, t = student.head, teacher.head
    return ok.fused_linear_distill_loss(hidden, s.weight, teacher_hidden, t.weight, **s.kwargs("student"),
                                        **t.kwargs("teacher"), **opts)


def gopd_loss(student: LM, hidden, teacher: LM, teacher_hidden, ref: LM, ref_hidden, **opts):
    """`opd_kernels.fused_linear_gopd_loss` between three models' heads."""
    s, t, r = student.head, teacher.head, ref.head
    return ok.fused_linear_gopd_loss(hidden, s.weight, teacher_hidden, t.weight, ref_hidden, r.weight,
                                     **s.kwargs("student"), **t.kwargs("teacher"), **r.kwargs("ref"), **opts)


def sparse_distill_loss(lm: LM, hidden, topk_ids, topk_logprobs, **opts):
    """`opd_kernels.fused_linear_sparse_distill_loss` of ``lm`` against top-k teacher logprobs."""
    h = lm.head
    return ok.fused_linear_sparse_distill_loss(hidden, h.weight, topk_ids, topk_logprobs, **h.kwargs(), **opts)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -- top-k (a served teacher's view): logits of a few rows at a time, no gradient -------------------
@torch.no_grad()
def teacher_topk(head: ok.hf.Head, hidden: torch.Tensor, k: int, temperature: float = 1.0,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` token ids and their full-vocabulary-normalised log-probs, ``[..., k]`` each.

    This is how a served teacher's top-k logprobs look (SDPO uses top-100). Logits (with the
    head's transforms) exist only for ``chunk`` rows at a time, without gradient.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids, lps = [], []
    for rows in flat.split(chunk):
        logits = _acc(head.logits(rows)) / temperature
        val, idx = logits.topk(k, dim=-1)
        ids.append(idx)
        lps.append(val - logits.logsumexp(-1, keepdim=True))
    shape = (*hidden.shape[:-1], k)
    return torch.cat(ids).view(shape), torch.cat(lps).view(shape)


@torch.no_grad()
def logprobs_at(head: ok.hf.Head, hidden: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                chunk: int = 1024) -> torch.Tensor:
    """Full-vocabulary-normalised log-probs of ``head`` at the given token ids ``[..., k]`` (e.g. the
    student's top-k, scored by a teacher as SDPO's reference does). ``chunk`` rows of logits at a time."""
    flat, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1])
    out = []
    for rows, idx in zip(flat.split(chunk), flat_ids.split(chunk)):
        logits = _acc(head.logits(rows)) / temperature
        out.append(logits.gather(-1, idx) - logits.logsumexp(-1, keepdim=True))
    return torch.cat(out).view(ids.shape)


@torch.no_grad()
def entropy(head: ok.hf.Head, hidden: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Entropy (nats) of ``head``'s full-vocabulary distribution at each position, ``[...]``; ``chunk``
    rows of logits at a time, without gradient (entropy-aware OPD's teacher uncertainty)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = []
    for rows in flat.split(chunk):
        lp = (_acc(head.logits(rows)) / temperature).log_softmax(-1)
        out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out).view(hidden.shape[:-1])
