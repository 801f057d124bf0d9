"""Helpers shared by the public ops: flattening, masks, reductions, backend and shard resolution."""
from __future__ import annotations

import torch

from .. import _dispatch
from .._validate import check_mask
from ..parallel import shard_layout


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


def backend_name(impl: str, device: torch.device) -> str:
    return _backend_name(impl, device.type)


@torch.compiler.assume_constant_result
def _backend_name(impl: str, device_type: str) -> str:
    """Resolved once per call in eager mode, once per trace under ``torch.compile``."""
    return _dispatch.resolve(impl, torch.device(device_type)).NAME


def shard_layout_or_local(V_local: int, group) -> tuple[int, int]:
    """(vocab_start, global V): (0, V_local) without a process group."""
    return (0, V_local) if group is None else shard_layout(V_local, group)


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
