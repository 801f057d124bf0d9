"""IW-OPD, importance-weighted on-policy distillation (arXiv 2606.22600, "On the Position Bias of
On-Policy Distillation"; TRL's ``IWOPDTrainer``, ``distillation_objective="iw_opd"``).

The sampled-token OPD signal ``A_t = log p_T(y_t) − log π_old(y_t)`` (as `opd`) is reweighted by
how far the student has already drifted from the teacher earlier in the same completion: with
``D_t = Σ_{s<t} |A_s|`` (the accumulated drift before token ``t``) and ``D = Σ_s |A_s|`` over the
completion,

    w_t = 1 + γ · (1 − D_t / max(D, ε)),     loss = −Σ_t (π/π_old) · w_t · A_t / tokens

so early tokens, whose supervision is still in distribution, weigh up to ``1 + γ`` and the last
ones, reached after the whole drift, 1 (``γ`` = ``--iwopd-gamma`` 0.5 and ``ε`` 1e-8: TRL's
``iw_opd_gamma`` and ``iw_opd_epsilon`` defaults; the weights and advantages carry no gradient).
The teacher's log-probs of the sampled tokens come from `opd_kernels.fused_linear_token_logprobs`.
"""
from __future__ import annotations

import torch

from .. import rollout as R
from ..argtypes import nonneg_float
from .base import Method

EPSILON = 1e-8  # TRL's iw_opd_epsilon


def drift_weights(adv: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``1 + γ (1 − D_t / D)`` per token of ``adv [B, C]`` (padding, ``mask`` False, counts as no drift)."""
    a = (adv * mask).abs()
    before = a.cumsum(1) - a
    return 1.0 + gamma * (1.0 - before / a.sum(1, keepdim=True).clamp(min=EPSILON))


class IWOPD(Method):
    name = "iwopd"
    summary = "importance-weighted OPD: sampled-token OPD, tokens weighted by the student-teacher drift before them"
    paper = "arXiv 2606.22600; TRL IWOPDTrainer"
    default_samples_per_prompt = 4
    teacher = "external"

    @staticmethod
    def add_options(g):
        g.add_argument("--iwopd-gamma", type=nonneg_float, default=0.5,
                       help="γ: weight amplification, w_t = 1 + γ (1 - drift before t / total drift) (TRL's default; "
                            "0 is plain sampled-token OPD)")

    def prepare(self, examples):
        tr = self.tr
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        with torch.no_grad():
            b.teacher_logprobs = R.token_logprobs(tr.teacher, self.frozen_hidden(tr.teacher, b.seqs, b), b.seqs)
        return b

    def loss(self, b):
        s, tr = b.seqs, self.tr
        lp = R.token_logprobs(tr.student, self.student_hidden(s), s)
        old = self.old_logprobs(b, lp)
        adv = (b.teacher_logprobs - old) * s.mask  # −(per-token reverse KL estimate), detached
        w = drift_weights(adv, s.mask, self.args.iwopd_gamma)
        loss = self.mean(b, -torch.exp(lp - old) * w * adv, s.mask)
        return loss, {"mean_weight": float((w * s.mask).sum() / s.mask.sum().clamp(min=1))}
