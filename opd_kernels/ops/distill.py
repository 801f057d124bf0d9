"""Full-vocabulary distillation losses: forward KL, reverse KL and beta-skewed JSD.

Per row, with ``a = s/T``, ``b = t/T``, ``q = softmax(a)``, ``p = softmax(b)``:
``forward_kl = KL(p||q)``, ``reverse_kl = KL(q||p)``, ``jsd = beta KL(p||M) + (1-beta) KL(q||M)``
with ``M = beta p + (1-beta) q`` (beta=0 / 1 are forward / reverse KL, TRL's convention).
The teacher is a constant. G-OPD (``gopd.py``) reuses this path with a reference model.

Each model may carry its own logit transform (``student_softcap`` / ``student_logit_scale``,
``teacher_...``): its raw logits ``x`` become ``x * logit_scale``, then ``softcap * tanh(x / softcap)``
(Gemma 2/3's ``final_logit_softcapping``), then are divided by the temperature; the backends apply
it tile by tile (gradients by the chain rule in the same tiles), ``-inf`` logits stay banned.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import parallel
from .._validate import (check_hidden_weight, check_logit_transform, check_logits, check_no_padding_with_group,
                         check_options, check_pair, check_same_device, check_vocab)
from . import _fused, _rows
from ._decide import backend_name
from ._common import acc_dtype, flat_mask, jsd_kind, linear_args, reduce_rows, row_weights, rows2d
from ._spec import RowSpec, transform_fields


def model_transforms(**sides) -> tuple:
    """Checked ``(scale, cap)`` per model from ``student=(softcap, logit_scale), teacher=..., ref=...``
    (the public ``{side}_softcap`` / ``{side}_logit_scale``), in that order."""
    return tuple(check_logit_transform(*v, prefix=f"{side}_") for side, v in sides.items())


def logits_loss(s, t, r, spec: RowSpec, *, mask, reduction, vocab_size, impl, group):
    """Shared body of ``distill_loss`` and ``gopd_loss`` (``r``: reference logits or None;
    ``spec``: the call's options, its backend filled in here from ``impl`` and the tensors)."""
    vocab = check_pair("student_logits", s, "teacher_logits", t, vocab_size)
    if r is not None:
        vocab = check_pair("student_logits", s, "ref_logits", r, vocab_size)
    check_no_padding_with_group(vocab_size, group)
    lead = s.shape[:-1]
    m = flat_mask(mask, lead, s.device)
    rows = [None if x is None else rows2d(x.detach() if x is not s else x, vocab) for x in (s, t, r)]
    spec = replace(spec, impl=backend_name(impl, s.device, s, t, r))
    main, _ = _rows.rows(*rows, None, spec, parallel.group_of(group))
    return reduce_rows(main, m, reduction, lead)


def distill_loss(student_logits, teacher_logits, *, divergence="reverse_kl", beta=0.5, temperature=1.0, mask=None,
                 reduction="mean", vocab_size=None, student_softcap=None, teacher_softcap=None,
                 student_logit_scale=None, teacher_logit_scale=None, impl="auto", process_group=None):
    """Divergence between student and teacher token distributions, over the full vocabulary.

    ``student_logits, teacher_logits [..., V]``; ``mask`` bool over the leading dims;
    ``reduction`` mean (over unmasked tokens) | sum | none. Differentiable w.r.t. the student.
    ``{student,teacher}_logit_scale`` multiplies that model's logits, then ``{student,teacher}_softcap``
    maps them to ``softcap * tanh(x / softcap)``, then the temperature divides them (None: absent).
    With ``process_group`` the inputs are this rank's vocabulary shard: 2 all-reduces (2 + 6
    floats per row), plus one of 2 floats per row for ``jsd``.
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_logits(name, x)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    tfs = model_transforms(student=(student_softcap, student_logit_scale), teacher=(teacher_softcap,
                                                                                     teacher_logit_scale))
    spec = RowSpec(jsd_kind(divergence, beta), 1.0 / temperature, beta=beta, **transform_fields(*tfs))
    return logits_loss(student_logits, teacher_logits, None, spec, mask=mask, reduction=reduction,
                       vocab_size=vocab_size, impl=impl, group=process_group)


def linear_loss(models, spec: RowSpec, *, mask, reduction, vocab_size, impl, group):
    """Shared body of the fused-linear distillation and G-OPD losses.

    ``models``: [(name, hidden, weight, bias) for student, teacher (, reference)]; ``spec``: the
    call's options, its backend filled in here from ``impl`` and the tensors.
    """
    (sn, hs, ws, bs) = models[0]
    lead = hs.shape[:-1]
    vocab = ws.shape[0]
    for name, h, w, b in models:
        check_hidden_weight(f"{name}_hidden", h, f"{name}_weight", w, f"{name}_bias", b)
        if h.shape[:-1] != lead:
            raise ValueError(f"{name}_hidden must have the leading dims of student_hidden {tuple(lead)}, "
                             f"got {tuple(h.shape[:-1])}")
        if name != sn:
            vocab = check_vocab("student_weight", ws.shape[0], f"{name}_weight", w.shape[0], vocab_size)
    check_no_padding_with_group(vocab_size, group)
    check_same_device(mask=mask, **{f"{n}_{k}": x for n, h, w, b in models
                                    for k, x in (("hidden", h), ("weight", w), ("bias", b))})
    m = flat_mask(mask, lead, hs.device)
    args = list(linear_args(hs, ws, bs, vocab))
    for _, h, w, b in models[1:]:
        args += [None if x is None else x.detach() for x in linear_args(h, w, b, vocab)]
    args += [None] * (_fused.N_MODEL - len(args))
    spec = replace(spec, impl=backend_name(impl, hs.device, *args[1::3]))
    if reduction != "none" and group is None:
        loss, _ = _fused.fl_loss(tuple(args), None, row_weights(m, reduction, acc_dtype(ws)), spec)
        return loss
    main, _ = _fused.fl_rows(tuple(args), None, spec, parallel.group_of(group))
    return reduce_rows(main, m, reduction, lead)


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, divergence="reverse_kl", beta=0.5, temperature=1.0, mask=None,
                              reduction="mean", vocab_size=None, chunk_size=None, student_softcap=None,
                              teacher_softcap=None, student_logit_scale=None, teacher_logit_scale=None, impl="auto",
                              process_group=None):
    """``distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)`` fused:
    the ``[N, V]`` logits are never materialized (row chunks or fused kernels).

    Teacher hidden size may differ from the student's. Differentiable w.r.t. the student's
    hidden, weight and bias; the teacher gets no gradient. For scalar reductions without a
    process group the gradients are computed during forward, on every backend (see
    ``opd_kernels.ops._fused``; 4 GEMM passes in all on the chunked path). The logit transforms
    (``{student,teacher}_softcap`` / ``_logit_scale``) are those of :func:`distill_loss`;
    ``opd_kernels.hf.head(model).kwargs("student")`` gives a model's.
    """
    check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
    tfs = model_transforms(student=(student_softcap, student_logit_scale), teacher=(teacher_softcap,
                                                                                     teacher_logit_scale))
    spec = RowSpec(jsd_kind(divergence, beta), 1.0 / temperature, beta=beta, chunk=chunk_size or 0,
                   **transform_fields(*tfs))
    return linear_loss([("student", student_hidden, student_weight, student_bias),
                        ("teacher", teacher_hidden, teacher_weight, teacher_bias)], spec,
                       mask=mask, reduction=reduction, vocab_size=vocab_size, impl=impl, group=process_group)


class DistillLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`distill_loss` (options fixed at construction)."""

    def __init__(self, divergence="reverse_kl", beta=0.5, temperature=1.0, reduction="mean", vocab_size=None,
                 impl="auto", process_group=None, *, student_softcap=None, teacher_softcap=None,
                 student_logit_scale=None, teacher_logit_scale=None):
        super().__init__()
        check_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction)
        model_transforms(student=(student_softcap, student_logit_scale), teacher=(teacher_softcap, teacher_logit_scale))
        self.kw = dict(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                       vocab_size=vocab_size, impl=impl, process_group=process_group, student_softcap=student_softcap,
                       teacher_softcap=teacher_softcap, student_logit_scale=student_logit_scale,
                       teacher_logit_scale=teacher_logit_scale)

    def forward(self, student_logits, teacher_logits, mask=None):
        return distill_loss(student_logits, teacher_logits, mask=mask, **self.kw)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items()
                         if k != "process_group" and not (v is None and k.endswith(("_softcap", "_logit_scale"))))


class FusedLinearDistillLoss(DistillLoss):
    """``nn.Module`` form of :func:`fused_linear_distill_loss`."""

    def __init__(self, *args, chunk_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kw["chunk_size"] = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, student_bias=None,
                teacher_bias=None):
        return fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask,
                                         student_bias=student_bias, teacher_bias=teacher_bias, **self.kw)
