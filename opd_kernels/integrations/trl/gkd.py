"""TRL's ``GKDTrainer`` with its loss through :func:`opd_kernels.fused_linear_distill_loss`.

``FusedGKDTrainer`` is a drop-in subclass: same arguments, same ``GKDConfig``, same on-policy
sampling (``lmbda``), ``seq_kd`` and data handling, same loss value. Only ``compute_loss``
changes: instead of ``model(...).logits`` for the student and the teacher (two ``[B, L, V]``
tensors, plus the log-softmaxes and the mixture of ``generalized_jsd_loss``), it takes the final
hidden states (``opd_kernels.hf.hidden_states``) and the heads (``opd_kernels.hf.head``) and
computes the divergence fused with the output projection, never materializing ``[N, V]``.

Conventions, as TRL's ``GKDTrainer.compute_loss`` + ``generalized_jsd_loss`` (TRL 1.16):

* ``beta`` in [0, 1]: the generalized JSD with mixture ``M = beta p + (1 - beta) q`` (``p``
  teacher, ``q`` student); ``beta = 0`` is KL(p||q) (forward KL), ``beta = 1`` is KL(q||p).
* the loss is taken at temperature 1: stock ``compute_loss`` does not pass
  ``args.temperature`` (the sampling temperature) to ``generalized_jsd_loss``; neither does this.
* positions: logits at ``i`` against labels at ``i + 1``; positions whose shifted label is
  ``-100`` (prompt, padding) are excluded.
* reduction: sum over kept positions divided by ``num_items_in_batch`` when the Trainer passes
  it, else by the number of kept positions (at least 1).
* the full rows of ``lm_head`` are used (padded vocabulary rows included), as stock TRL does.
* precision: the hidden states come from the model's own (possibly autocast-wrapped) forward;
  under mixed precision (``bf16=True``, TRL's default, or ``fp16``) the fused head runs in that
  dtype (hidden states and weights cast; fp32 accumulation), as autocast runs ``lm_head``.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl.experimental.gkd import GKDConfig, GKDTrainer

import opd_kernels as ok

from ._precision import MIXED, head_in_dtype

__all__ = ["FusedGKDTrainer", "GKDConfig", "gkd_loss"]


def gkd_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, *, beta=0.5, temperature=1.0,
             num_items_in_batch=None, chunk_size=None, impl="auto"):
    """TRL's ``generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
    num_items_in_batch=...)`` (``reduction="batchmean"``) on hidden states ``[B, L, d]`` and
    ``opd_kernels.hf.Head`` s, fused with the heads. ``labels [B, L]`` are aligned with the
    hidden states (already shifted), ``-100`` = ignored."""
    student_head = head_in_dtype(student_head, student_hidden)
    teacher_head = head_in_dtype(teacher_head, teacher_hidden)
    mask = labels != -100
    kw = dict(divergence="jsd", beta=beta, temperature=temperature, mask=mask, chunk_size=chunk_size, impl=impl)
    total = ok.fused_linear_distill_loss(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                                         reduction="sum", **kw, **student_head.kwargs("student"),
                                         **teacher_head.kwargs("teacher"))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / mask.sum().clamp_min(1)


class FusedGKDTrainer(GKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` whose loss never materializes the logits.

    Extra keyword arguments: ``chunk_size`` and ``impl`` of the fused op, and ``strict`` of
    :func:`opd_kernels.hf.head` (False accepts an architecture outside
    ``opd_kernels.hf.VERIFIED_MODEL_TYPES``). Both heads are checked at construction, so an
    unsupported model fails before training starts. ``compute_loss(..., return_outputs=True)``
    (evaluation with ``prediction_loss_only=False``) returns the student's logits, computed then.
    """

    def __init__(self, *args, chunk_size=None, impl="auto", strict=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_kw = dict(chunk_size=chunk_size, impl=impl)
        self.hf_strict = strict
        ok.hf.head(self.model, strict=strict)
        ok.hf.head(self.teacher_model, strict=strict)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        hs = ok.hf.hidden_states(model, ids, attn)
        self.teacher_model.eval()
        with torch.no_grad():
            ht = ok.hf.hidden_states(self.teacher_model, ids, attn)
        sh = ok.hf.head(model, strict=self.hf_strict)
        th = ok.hf.head(self.teacher_model, strict=self.hf_strict)
        low = MIXED.get(str(getattr(self.accelerator, "mixed_precision", "no")))
        if low is not None:  # autocast would run lm_head in this dtype
            hs, ht = hs.to(low), ht.to(low)
        loss = gkd_loss(hs[:, :-1], sh, ht[:, :-1], th, inputs["labels"][:, 1:], beta=self.beta,
                        num_items_in_batch=num_items_in_batch, **self.fused_kw)
        if return_outputs:
            return loss, CausalLMOutputWithPast(loss=loss, logits=sh.logits(hs))
        return loss
