"""GKD (Agarwal et al., 2024): generalized knowledge distillation with on-policy data.

Each step, with probability λ (``--gkd-lambda``, student-data fraction) the completions are
sampled from the student at temperature ``--gkd-temperature`` (0.9); otherwise they are the
dataset's reference answers. The loss is the full-vocabulary β-skewed JSD between the student
and the external teacher on every completion token (``--gkd-beta``, 0.5; β=0 is forward KL and
β=1 reverse KL), through `opd_kernels.fused_linear_distill_loss`.
"""
from __future__ import annotations

from ..argtypes import pos_float, unit
from ..lm import distill_loss
from .base import Method


class GKD(Method):
    name = "gkd"
    summary = "generalized KD: a λ-mix of student samples and dataset answers, full-vocabulary JSD to the teacher"
    paper = "Agarwal et al., 2024"
    teacher = "external"

    @staticmethod
    def add_options(g):
        g.add_argument("--gkd-lambda", type=unit, default=0.5, help="fraction of steps on student samples (λ)")
        g.add_argument("--gkd-beta", type=unit, default=0.5, help="JSD skew β (0 forward KL, 1 reverse KL)")
        g.add_argument("--gkd-temperature", type=pos_float, default=0.9, help="student sampling temperature")

    def prepare(self, examples):
        on_policy = self.tr.rng.random() < self.args.gkd_lambda
        b = (self.rollout(examples, self.samples_per_prompt, self.args.gkd_temperature) if on_policy
             else self.reference(examples))
        if self.tr.teacher_server is not None:
            b.served = self.tr.teacher_server.score(b.seqs)
            b.scored_tokens += int(b.seqs.attention_mask.sum())
        else:
            b.teacher_hidden = self.frozen_hidden(self.tr.teacher, b.seqs, b)
        b.on_policy = float(on_policy)
        return b

    def loss(self, b):
        s, tr = b.seqs, self.tr
        if b.served is not None:
            return self.served_loss(self.student_hidden(s), b, "jsd", self.args.gkd_beta), {"on_policy": b.on_policy}
        loss = distill_loss(tr.student, self.student_hidden(s), tr.teacher, b.teacher_hidden,
                            divergence="jsd", beta=self.args.gkd_beta, mask=s.mask, reduction="sum")
        return loss / self.norm(b), {"on_policy": b.on_policy}
