"""Helpers shared by the public ops: dtypes, flattening, masks, reductions, lm_head slices."""
from __future__ import annotations

import math

import torch

from .._validate import check_mask, check_no_padding_with_group, check_vocab


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation/output dtype: float64 stays float64 (the oracle), everything else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def transform_logits(x: torch.Tensor, tf) -> torch.Tensor:
    """A model's logit transform ``tf = (scale, cap)`` on a few logits in torch (differentiable):
    ``x * scale``, then ``cap * tanh(x / cap)`` when ``cap > 0``; ``-inf`` (banned) stays ``-inf``
    with slope 0, as in the backends. For the k gathered logits of the sparse ops."""
    scale, cap = tf
    if scale != 1.0:
        x = x * scale
    if cap:
        x = torch.where(torch.isneginf(x), -math.inf, cap * torch.tanh(x / cap))
    return x


def row_slice(x, i: int, j: int):
    """Rows ``i:j`` of an optional per-row tensor (None stays None)."""
    return None if x is None else x[i:j]


def rows2d(x: torch.Tensor, V: int) -> torch.Tensor:
    """``x[..., :V]`` flattened to ``[N, V]`` with a contiguous last dim (a view when possible)."""
    x = x[..., :V] if x.shape[-1] != V else x
    x = x.reshape(-1, V)
    return x if x.stride(-1) == 1 else x.contiguous()


def flat_mask(mask, lead_shape, device) -> torch.Tensor:
    check_mask(mask, lead_shape)
    if mask is None:
        return torch.ones(int(torch.Size(lead_shape).numel()), dtype=torch.bool, device=device)
    return mask.reshape(-1).to(device)


def reduce_rows(values: torch.Tensor, mask: torch.Tensor, reduction: str, lead_shape):
    """Masked rows give exactly 0 (and zero gradient); mean is over unmasked rows (0 if none)."""
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "none":
        return values.view(lead_shape)
    total = values.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1).to(values.dtype)


def row_weights(mask: torch.Tensor, reduction: str, dtype=torch.float32) -> torch.Tensor:
    """Per-row (g_main, g_ent) coefficients of a scalar reduction, for gradient-in-forward."""
    w = mask.to(dtype)
    if reduction == "mean":
        w = w / mask.sum().clamp(min=1).to(dtype)
    return torch.stack([w, torch.zeros_like(w)], -1)


def jsd_kind(divergence: str, beta: float) -> str:
    """``jsd`` at the endpoints is forward KL (beta=0) / reverse KL (beta=1), TRL's convention."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def linear_vocab(weight, vocab_size, group) -> int:
    """Rows of a single fused ``weight`` in use: all, or the first ``vocab_size`` (padded)."""
    check_no_padding_with_group(vocab_size, group)
    if vocab_size is None:
        return weight.shape[0]
    return check_vocab("weight", weight.shape[0], "weight", weight.shape[0], vocab_size)


def linear_args(hidden, weight, bias, vocab):
    """(h [N, d], W[:vocab], b[:vocab]) with h flattened over the leading dims; the head itself
    when it has ``vocab`` rows (a slice would cost its backward a zero-filled ``[V, d]`` and a copy)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if weight.shape[0] == vocab:
        return h, weight, bias
    return h, weight[:vocab], None if bias is None else bias[:vocab]
