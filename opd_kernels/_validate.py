"""Input checks shared by every public op. Each error names the argument and what was seen."""
from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def check_logits(name: str, x, *, ndim_min: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {x.dtype}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dim(s), got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> torch.device:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")
    return next(iter(devices))


def check_options(*, temperature=1.0, divergence=None, beta=None, reduction=None, reward_scale=None) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence is not None and divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if beta is not None and (not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reward_scale is not None and (not isinstance(reward_scale, (int, float)) or not math.isfinite(reward_scale)):
        raise ValueError(f"reward_scale must be a finite number, got {reward_scale!r}")


def check_pair(sname: str, s: torch.Tensor, tname: str, t: torch.Tensor, vocab_size=None) -> int:
    """Leading dims must match; the vocabularies too unless ``vocab_size`` selects a common prefix."""
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"{sname} and {tname} must have the same leading dims, got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    return check_vocab(sname, s.shape[-1], tname, t.shape[-1], vocab_size)


def check_vocab(sname: str, vs: int, tname: str, vt: int, vocab_size=None) -> int:
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"vocabulary mismatch: {sname} has {vs} entries, {tname} has {vt}; "
                             f"pass vocab_size= to use the first vocab_size entries of both")
        return vs
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size must be an int in [1, min({vs}, {vt})], got {vocab_size!r}")
    return vocab_size


def check_mask(mask, lead_shape) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have the leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}")


def check_targets(targets, lead_shape, V: int, ignore_index, *, check_range: bool = True,
                  name: str = "targets") -> None:
    """Integer ids of the leading shape, each in [0, V) or equal to ``ignore_index`` (None: no
    id is ignored). CPU tensors are checked here; CUDA tensors by a device-side assert."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the logits' leading dims), "
                         f"got {tuple(targets.shape)}")
    if not check_range or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= V)
    if ignore_index is not None:
        bad &= targets != ignore_index
    allowed = f"[0, {V})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(f"{name} must be in {allowed}, got values {targets[bad].unique()[:8].tolist()}")
    else:  # device-side assert (no host sync on the hot path), traceable by torch.compile
        torch._assert_async(~bad.any(), f"{name} must be in {allowed}")
