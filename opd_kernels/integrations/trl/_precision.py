"""The dtype the fused head runs in under the Trainer's mixed precision."""
from __future__ import annotations

import dataclasses

import torch

MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's mixed_precision -> autocast dtype


def head_in_dtype(head, hidden):
    """``head`` (an ``opd_kernels.hf.Head``) with its weight and bias cast to ``hidden``'s dtype.

    Under the Trainer's mixed precision (accelerate's autocast around the model's forward) the
    hidden states come out in bf16/fp16 and the model's own ``lm_head`` would run in that dtype:
    so does the fused op (the cast is differentiable; gradients reach the fp32 weight)."""
    if head.weight.dtype == hidden.dtype:
        return head
    return dataclasses.replace(head, weight=head.weight.to(hidden.dtype),
                               bias=None if head.bias is None else head.bias.to(hidden.dtype))
