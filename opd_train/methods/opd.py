"""On-policy distillation, Thinking Machines recipe (Lu & Thinking Machines Lab, 2025).

The student samples ``G`` completions per prompt (default 4) at T=1; the external teacher
scores the sampled tokens. Each token's advantage is the negative per-token reverse KL
estimate ``A_t = log p_T(y_t) − log π_sampler(y_t)`` (no discounting), and the loss is the
importance-weighted policy gradient ``−Σ_t (π/π_sampler) A_t`` over sampled tokens — teacher
logprobs come from `opd_kernels.fused_linear_token_logprobs`.

``--opd-loss fullvocab`` instead minimises the exact full-vocabulary reverse KL
``KL(π ‖ p_T)`` at every sampled position (`fused_linear_distill_loss`), on the same samples.
"""
from __future__ import annotations

import torch

from .. import rollout as R
from ..lm import distill_loss
from .base import Method


class OPD(Method):
    name = "opd"
    summary = "on-policy distillation, the Thinking Machines recipe: teacher-scored student samples"
    paper = "Thinking Machines, 2025"
    default_samples_per_prompt = 4
    teacher = "external"

    @staticmethod
    def add_options(g):
        g.add_argument("--opd-loss", choices=("sampled", "fullvocab"), default="sampled",
                       help="sampled (the TM recipe): per-token advantage A_t = log p_T - log pi_sampler of the "
                            "sampled token, importance-weighted PG; fullvocab: exact reverse KL over the "
                            "vocabulary at each sampled position (lower variance)")

    def prepare(self, examples):
        tr = self.tr
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        if tr.teacher_server is not None:  # top-k for fullvocab, only the sampled tokens' logprobs else
            b.served = tr.teacher_server.score(b.seqs)
            b.scored_tokens += int(b.seqs.attention_mask.sum())
            b.teacher_logprobs = b.served["logprobs"]
            return b
        b.teacher_hidden = self.frozen_hidden(tr.teacher, b.seqs, b)
        if self.args.opd_loss == "sampled":
            with torch.no_grad():
                b.teacher_logprobs = R.token_logprobs(tr.teacher, b.teacher_hidden, b.seqs)
        return b

    def loss(self, b):
        s, tr = b.seqs, self.tr
        h = self.student_hidden(s)
        if self.args.opd_loss == "fullvocab" and b.served is not None:
            return self.served_loss(h, b, "reverse_kl"), {}
        if self.args.opd_loss == "fullvocab":
            loss = distill_loss(tr.student, h, tr.teacher, b.teacher_hidden, divergence="reverse_kl",
                                mask=s.mask, reduction="sum")
            return loss / self.norm(b), {}
        lp = R.token_logprobs(tr.student, h, s)
        old = self.old_logprobs(b, lp)
        adv = b.teacher_logprobs - old  # −(per-token reverse KL estimate), detached
        loss = self.mean(b, -torch.exp(lp - old) * adv, s.mask)
        return loss, {"reverse_kl": ((-adv * s.mask).sum() / s.mask.sum().clamp(min=1)).item()}
