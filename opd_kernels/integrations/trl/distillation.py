"""TRL's stable ``DistillationTrainer`` with its loss through :func:`opd_kernels.fused_linear_distill_loss`.

``FusedDistillationTrainer`` is a drop-in subclass: same arguments, same ``DistillationConfig``,
same on-policy generation (HF ``generate`` or TRL's vLLM), tool masks, multimodal inputs and
logging. Only the loss changes: stock TRL 1.16 projects both models' hidden states through their
heads tile by tile in ``trl.kernels.ChunkedDivergenceFunction``; this runs the same divergence in
``fused_linear_distill_loss`` (4 GEMM passes, gradients computed during forward).

Conventions, as TRL 1.16's ``DistillationTrainer._compute_loss`` + ``_chunked_divergence_loss``:

* ``beta`` in [0, 1]: the generalized JSD with mixture ``M = beta p + (1 - beta) q`` (``p``
  teacher, ``q`` student); ``beta = 0`` is KL(p||q) (forward KL), ``beta = 1`` is KL(q||p)
  (TRL's default). This is ``fused_linear_distill_loss(divergence="jsd", beta=beta)``.
* ``args.temperature`` divides both models' logits (after logit scale and softcap), as in stock
  TRL; it is also the sampling temperature.
* positions: the completion tokens (``completion_mask``, times ``tool_mask`` when present); the
  hidden states are TRL's own (``_get_last_hidden_state``: the backbone's, shifted by one).
* reduction: sum over kept positions divided by ``num_items_in_batch`` (TRL passes the count over
  the generated completions, divided by the number of processes), else by the kept positions.
* heads: ``opd_kernels.hf.head`` (weight, bias, ``final_logit_softcapping``, ``logit_scale``;
  all rows of ``lm_head``). Configs whose logit scaling ``opd_kernels.hf`` does not model
  (``logits_scaling``, ``output_multiplier``, ``lm_head_multiplier``, ...) are refused at
  construction, as are architectures outside ``opd_kernels.hf.VERIFIED_MODEL_TYPES`` unless
  ``strict=False``.
* precision: under autocast (``bf16=True``, TRL's default, or ``fp16``) the heads run in the
  autocast dtype, as stock TRL projects in it; fp32 accumulation either way.
* the ``entropy`` metric: stock TRL gets the student's entropy from its loss kernel; the fused
  loss does not compute it. ``log_entropy=True`` computes it in one extra no-grad pass over the
  vocabulary (``fused_linear_token_logprobs``); by default it is logged as missing (TRL's
  ``log`` turns the NaN into ``None``), never as a made-up number.
"""
from __future__ import annotations

import math

import torch
from trl import DistillationConfig, DistillationTrainer

import opd_kernels as ok

from ._precision import head_in_dtype

__all__ = ["FusedDistillationTrainer", "DistillationConfig", "distillation_loss"]

# the multimodal fields TRL 1.16 passes from generation to the backbone (DistillationTrainer._compute_loss)
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")


def distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask, *, beta=1.0,
                      temperature=1.0, num_items_in_batch=None, chunk_size=None, impl="auto"):
    """TRL's ``_chunked_divergence_loss(...)[0]`` on hidden states ``[B, K, d]`` (each model its
    own ``d``) and ``opd_kernels.hf.Head`` s: the generalized JSD (``beta``) at ``temperature``,
    summed over ``mask [B, K]`` (nonzero = kept) and divided by ``num_items_in_batch`` when given,
    else by the number of kept positions (at least 1)."""
    student_head = head_in_dtype(student_head, student_hidden)
    teacher_head = head_in_dtype(teacher_head, teacher_hidden)
    keep = mask != 0
    total = ok.fused_linear_distill_loss(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                                         divergence="jsd", beta=beta, temperature=temperature, mask=keep,
                                         reduction="sum", chunk_size=chunk_size, impl=impl,
                                         **student_head.kwargs("student"), **teacher_head.kwargs("teacher"))
    if num_items_in_batch is None:
        return total / keep.sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _autocast_dtype(device):
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class FusedDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss runs through ``fused_linear_distill_loss``.

    Extra keyword arguments: ``chunk_size`` and ``impl`` of the fused op, ``strict`` of
    :func:`opd_kernels.hf.head` (False accepts an architecture outside
    ``opd_kernels.hf.VERIFIED_MODEL_TYPES``), and ``log_entropy`` (see the module docstring). Both
    heads are checked at construction, so an unsupported model fails before training starts.
    """

    def __init__(self, *args, chunk_size=None, impl="auto", strict=True, log_entropy=False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("FusedDistillationTrainer needs a teacher model (teacher_model= or "
                             "args.teacher_model_name_or_path): its loss runs on the teacher's hidden states and head")
        self.fused_kw = dict(chunk_size=chunk_size, impl=impl)
        self.hf_strict = strict
        self.log_entropy = log_entropy
        for model in (self.model, self.teacher_model):
            ok.hf.head(self.accelerator.unwrap_model(model), strict=strict)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Stock ``_compute_loss`` with ``fused_linear_distill_loss`` in place of
        ``_chunked_divergence_loss``; returns ``(loss, entropy_sum, n_valid)`` as stock does
        (``entropy_sum`` NaN unless ``log_entropy``)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        keep_last = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL if k in inputs}
        hs = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep_last, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            ht = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                           unwrapped_teacher, input_ids, attention_mask, keep_last, **multimodal)
        sh = ok.hf.head(unwrapped_student, strict=self.hf_strict)
        th = ok.hf.head(unwrapped_teacher, strict=self.hf_strict)
        if sh.weight.device != th.weight.device:
            raise ValueError(f"the student's lm_head is on {sh.weight.device} but the teacher's is on "
                             f"{th.weight.device}: FusedDistillationTrainer needs both heads on one device "
                             "(set their device_map)")
        device = sh.weight.device
        hs, ht, mask = hs.to(device), ht.to(device), mask.to(device)
        low = _autocast_dtype(device)
        if low is not None:  # stock TRL projects in the autocast dtype; the fused op runs outside autocast
            hs, ht = hs.to(low), ht.to(low)
        with torch.autocast(device.type, enabled=False):
            loss = distillation_loss(hs, sh, ht, th, mask, beta=self.beta, temperature=self.temperature,
                                     num_items_in_batch=num_items_in_batch, **self.fused_kw)
            n_valid = (mask != 0).sum()
            entropy_sum = self._entropy_sum(hs.detach(), sh, mask)
        return loss, entropy_sum, n_valid

    def _entropy_sum(self, hs, head, mask):
        if not self.log_entropy:
            return torch.tensor(math.nan, device=hs.device)
        head = head_in_dtype(head, hs)
        targets = torch.zeros(mask.shape, dtype=torch.long, device=hs.device).masked_fill(mask == 0, -100)
        with torch.no_grad():
            _, ent = ok.fused_linear_token_logprobs(hs, head.weight, targets, temperature=self.temperature,
                                                    return_entropy=True, **head.kwargs(), **self.fused_kw)
        return (ent.float() * (mask != 0)).sum()
