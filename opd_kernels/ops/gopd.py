"""G-OPD: on-policy distillation with reward extrapolation (ExOPD for reward_scale > 1).

Objective ``E_q[lam log(p_T / p_ref)] - KL(q || p_ref) = -KL(q || p*) + const`` with
``p* = softmax(lam b_T + (1 - lam) b_ref)``; so the full-vocabulary loss is reverse KL to that
combined target, computed by the same kernels (the backends combine teacher and reference
logits tile by tile). ``lam = 1`` is plain OPD. The sampled-token form is
:func:`gopd_advantages`.
"""
from __future__ import annotations

import torch

from .._validate import (check_float_tensor, check_hidden_weight, check_logits, check_options, check_pair,
                         check_same_device, check_vocab)
from ._spec import RowSpec, transform_fields
from .distill import linear_loss, logits_loss, model_transforms


def _transforms(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale, ref_softcap,
                ref_logit_scale):
    return model_transforms(student=(student_softcap, student_logit_scale),
                            teacher=(teacher_softcap, teacher_logit_scale), ref=(ref_softcap, ref_logit_scale))


def gopd_loss(student_logits, teacher_logits, ref_logits, *, reward_scale=1.0, temperature=1.0, mask=None,
              reduction="mean", vocab_size=None, student_softcap=None, teacher_softcap=None, ref_softcap=None,
              student_logit_scale=None, teacher_logit_scale=None, ref_logit_scale=None, impl="auto",
              process_group=None):
    """``KL(q || softmax(reward_scale * b_T + (1 - reward_scale) * b_ref))`` per token, reduced.

    Teacher and reference get no gradient. Same options as :func:`opd_kernels.distill_loss`, and
    the reference model's logit transform ``ref_softcap`` / ``ref_logit_scale`` (each model's
    logits are transformed, then divided by the temperature, before they are combined).
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                    ("ref_logits", ref_logits)):
        check_logits(name, x)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, ref_logits=ref_logits,
                        mask=mask)
    check_options(temperature=temperature, reduction=reduction, reward_scale=reward_scale)
    tfs = _transforms(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale, ref_softcap,
                      ref_logit_scale)
    check_pair("student_logits", student_logits, "ref_logits", ref_logits, vocab_size)
    ref_logits = None if reward_scale == 1.0 else ref_logits  # lam = 1: OPD, the reference drops out
    spec = RowSpec("reverse_kl", 1.0 / temperature, reward_scale=float(reward_scale), **transform_fields(*tfs))
    return logits_loss(student_logits, teacher_logits, ref_logits, spec, mask=mask, reduction=reduction,
                       vocab_size=vocab_size, impl=impl, group=process_group)


def fused_linear_gopd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ref_hidden, ref_weight, *,
                           student_bias=None, teacher_bias=None, ref_bias=None, reward_scale=1.0, temperature=1.0,
                           mask=None, reduction="mean", vocab_size=None, chunk_size=None, student_softcap=None,
                           teacher_softcap=None, ref_softcap=None, student_logit_scale=None, teacher_logit_scale=None,
                           ref_logit_scale=None, impl="auto", process_group=None):
    """:func:`gopd_loss` on ``hidden @ weight.T + bias`` of the three models, without their logits
    (``opd_kernels.hf.head(model).kwargs("ref")`` gives the reference model's bias and transform)."""
    check_options(temperature=temperature, reduction=reduction, reward_scale=reward_scale)
    tfs = _transforms(student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale, ref_softcap,
                      ref_logit_scale)
    models = [("student", student_hidden, student_weight, student_bias),
              ("teacher", teacher_hidden, teacher_weight, teacher_bias)]
    if reward_scale != 1.0:  # lam = 1: OPD, the reference drops out (after validation)
        models.append(("ref", ref_hidden, ref_weight, ref_bias))
    else:
        check_hidden_weight("ref_hidden", ref_hidden, "ref_weight", ref_weight, "ref_bias", ref_bias)
        if ref_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"ref_hidden must have the leading dims of student_hidden "
                             f"{tuple(student_hidden.shape[:-1])}, got {tuple(ref_hidden.shape[:-1])}")
        check_vocab("student_weight", student_weight.shape[0], "ref_weight", ref_weight.shape[0], vocab_size)
    spec = RowSpec("reverse_kl", 1.0 / temperature, reward_scale=float(reward_scale), chunk=chunk_size or 0,
                   **transform_fields(*tfs))
    return linear_loss(models, spec, mask=mask, reduction=reduction, vocab_size=vocab_size, impl=impl,
                       group=process_group)


def gopd_advantages(teacher_logprobs, ref_logprobs, old_logprobs, *, reward_scale=1.0):
    """Sampled-token G-OPD advantage ``lam (log p_T - log p_ref) - (log pi_old - log p_ref)``.

    All inputs are per-token logprobs of the sampled tokens, same shape; no gradient flows.
    With ``reward_scale=1`` this is OPD's ``log p_T - log pi_old``.
    """
    names = ("teacher_logprobs", "ref_logprobs", "old_logprobs")
    xs = (teacher_logprobs, ref_logprobs, old_logprobs)
    for name, x in zip(names, xs):
        check_float_tensor(name, x)
        if x.shape != teacher_logprobs.shape:
            raise ValueError(f"{name} must have the shape of teacher_logprobs {tuple(teacher_logprobs.shape)}, "
                             f"got {tuple(x.shape)}")
    check_same_device(**dict(zip(names, xs)))
    check_options(reward_scale=reward_scale)
    acc = torch.promote_types(torch.promote_types(teacher_logprobs.dtype, ref_logprobs.dtype),
                              torch.promote_types(old_logprobs.dtype, torch.float32))  # fp32 at least
    t, r, o = (x.detach().to(acc) for x in xs)
    with torch.no_grad():
        return reward_scale * (t - r) - (o - r)
