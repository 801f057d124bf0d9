"""Input checks shared by every public op. Each error names the argument and what was seen.

Shape, dtype and option checks read only metadata. The two value checks (ids in range, top-k
logprobs <= 0) read the tensor: on CPU in eager mode they raise a ``ValueError`` listing the
offending values (reading a CPU tensor is no device sync); on CUDA, and under ``torch.compile``,
they become a device-side assert (``torch._assert_async``), so the hot path never waits.
"""
from __future__ import annotations

import math
import numbers

import torch

IDENTITY = (1.0, 0.0)
"""The identity logit transform ``(scale, cap)``: no logit scale, no softcap."""


def check_transform(tf, name: str = "tf") -> tuple[float, float]:
    """``(scale, cap)`` as floats, checked; ``None`` (the whole pair or the cap) = no transform/cap."""
    if tf is None:
        return IDENTITY
    try:
        scale, cap = tf
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (scale, cap) pair, got {tf!r}") from None
    scale, cap = float(scale), 0.0 if cap is None else float(cap)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{name}: the logit scale must be finite and > 0, got {scale!r}")
    if not (math.isfinite(cap) and cap >= 0.0):
        raise ValueError(f"{name}: the softcap must be finite and >= 0 (0 = no cap), got {cap!r}")
    return scale, cap


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# Top-k logprobs may exceed 0 by this much (a producer's rounding); more is a caller's bug,
# e.g. probabilities or logits passed as logprobs (a +1.0 "logprob" gave a loss of 534.6).
TOPK_LOGPROB_SLACK = 1e-4


def check_float_tensor(name: str, x, *, ndim_min: int = 0) -> None:
    """A floating-point tensor (fp32/bf16/fp16/fp64) with at least ``ndim_min`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {x.dtype}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dim(s), got shape {tuple(x.shape)}")


def check_logits(name: str, x) -> None:
    """Logits ``[..., V]``: floating point, with a vocabulary dim."""
    check_float_tensor(name, x, ndim_min=1)


def check_hidden_weight(hname: str, hidden, wname: str, weight, bname: str | None = None, bias=None) -> int:
    """``hidden [..., d]``, ``weight [V, d]``, ``bias [V]`` (or None); returns d."""
    check_float_tensor(hname, hidden, ndim_min=1)
    check_float_tensor(wname, weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wname} must be [V, d] with d = {hname}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor(bname, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bname} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return hidden.shape[-1]


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


def check_logit_transform(softcap=None, logit_scale=None, *, prefix: str = "") -> tuple[float, float]:
    """One model's public ``{prefix}softcap=`` / ``{prefix}logit_scale=`` (None: absent) as the
    backends' ``(scale, cap)`` pair (``check_transform``): its raw logits ``x`` become
    ``softcap * tanh(logit_scale * x / softcap)`` (``logit_scale * x`` without a softcap), before
    the temperature divides them."""
    cname, sname = f"{prefix}softcap", f"{prefix}logit_scale"
    for name, v in ((cname, softcap), (sname, logit_scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise TypeError(f"{name} must be a number or None, got {type(v).__name__} {v!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{cname} must be a finite number > 0 (None: no softcap), got {softcap!r}")
    scale, _ = check_transform((1.0 if logit_scale is None else logit_scale, None), sname)
    return check_transform((scale, softcap), f"{prefix}(logit_scale, softcap)")


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


def check_no_padding_with_group(vocab_size, group) -> None:
    if group is not None and vocab_size is not None:
        raise ValueError("vocab_size is not supported with process_group: pass the unpadded shard instead")


def check_vocab_shard(start, size_total, V_local: int) -> None:
    """A ``VocabShard``'s layout against this rank's ``V_local`` entries."""
    for name, x in (("start", start), ("size_total", size_total)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"VocabShard.{name} must be an int >= 0, got {x!r}")
    if start + V_local > size_total:
        raise ValueError(f"VocabShard(start={start}, size_total={size_total}) cannot hold this rank's "
                         f"{V_local} vocabulary entries (start + {V_local} > size_total)")


def check_mask(mask, lead_shape) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have the leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}")


def _readable(x: torch.Tensor) -> bool:
    """Values of ``x`` may be read on the host: a CPU tensor, in eager mode."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_values(name: str, x: torch.Tensor, bad: torch.Tensor, allowed) -> None:
    """No entry of ``x`` may be ``bad``: a ValueError naming the values seen (CPU, eager), else a
    device-side assert (no host sync on the hot path; traceable by torch.compile).
    ``allowed(readable)`` describes the valid values (with host-read numbers only if readable)."""
    if x.numel() == 0:
        return
    if _readable(x):
        if bool(bad.any()):
            raise ValueError(f"{name} must be {allowed(True)}, got values {x[bad].unique()[:8].tolist()}")
    else:
        torch._assert_async(~bad.any(), f"{name} must be {allowed(False)}")


def check_targets(targets, lead_shape, V, ignore_index, *, name: str = "targets") -> None:
    """Integer ids of the leading shape, each in [0, V) or equal to ``ignore_index`` (None: no
    id is ignored). ``V`` may be a 0-dim device tensor (a layout learned on device)."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the logits' leading dims), "
                         f"got {tuple(targets.shape)}")
    bad = (targets < 0) | (targets >= V)
    if ignore_index is not None:
        bad &= targets != ignore_index

    def allowed(readable):
        shown = V if isinstance(V, int) else int(V) if readable and _readable(V) else "V"
        return f"in [0, {shown})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")

    _check_values(name, targets, bad, allowed)


def check_topk(ids, logprobs, lead_shape) -> int:
    """Teacher top-k ``ids`` (integer) and ``logprobs`` (floating, each <= 0), both
    ``[*lead_shape, k]``; returns k. The ids' range is checked by ``check_targets``."""
    check_float_tensor("teacher_topk_logprobs", logprobs, ndim_min=1)
    if ids.shape != logprobs.shape or ids.shape[:-1] != tuple(lead_shape):
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs must both be [*{tuple(lead_shape)}, k], got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    _check_values("teacher_topk_logprobs", logprobs, logprobs > TOPK_LOGPROB_SLACK,
                  lambda _: f"log-probabilities <= 0 (up to {TOPK_LOGPROB_SLACK} rounding)")
    return ids.shape[-1]
