"""OPSD, on-policy self-distillation (Zhao et al., 2026).

The teacher is the student itself, frozen at the start of training, shown the prompt plus
the reference (worked) solution; the student sees the prompt only. On the student's own
samples, the loss is the full-vocabulary divergence between the two (``--opsd-divergence``:
``jsd`` with β=``--opsd-beta`` (0.5) or ``forward_kl``) per token, optionally clipped per token
at ``--opsd-clip`` so that a few "pivot" tokens cannot dominate the update. Evaluation rows log
``teacher_context_accuracy``: the frozen teacher's greedy held-out accuracy with the solution in
context (measured once; the teacher does not change), the ceiling of what it can teach.
"""
from __future__ import annotations

from .. import rollout as R
from ..lm import distill_loss
from ..models import load
from ..argtypes import pos_float, unit
from .base import Method


class OPSD(Method):
    name = "opsd"
    summary = "on-policy self-distillation: the initial student, shown the reference solution, as teacher"
    paper = "Zhao et al., 2026"
    teacher = "self"

    @staticmethod
    def add_options(g):
        g.add_argument("--opsd-divergence", choices=("jsd", "forward_kl"), default="jsd",
                       help="full-vocabulary divergence to the self-teacher")
        g.add_argument("--opsd-beta", type=unit, default=0.5, help="JSD β")
        g.add_argument("--opsd-clip", type=pos_float, default=None, help="clip each token's divergence at this value")

    def __init__(self, tr):
        super().__init__(tr)
        # frozen copy of the initial student (reloaded from its directory, so resume needs nothing extra)
        self.teacher = R.LM(load(tr.student_path, tr.device).eval().requires_grad_(False), tr.vocab_size,
                            tr.student.compute_dtype)

    def eval_metrics(self):
        if not hasattr(self, "_teacher_acc"):
            self._teacher_acc = self.context_accuracy(self.teacher.model, "solution")
        return {"teacher_context_accuracy": self._teacher_acc}

    def prepare(self, examples):
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        ctx = [self.tr.task.with_context(ex, "solution") for ex in b.examples]
        b.teacher_hidden = self.frozen_hidden(self.teacher, self.repack(b.seqs, ctx), b)
        return b

    def loss(self, b):
        s, tr, a = b.seqs, self.tr, self.args
        per = distill_loss(tr.student, self.student_hidden(s), self.teacher, b.teacher_hidden,
                           divergence=a.opsd_divergence, beta=a.opsd_beta, mask=s.mask, reduction="none")
        if a.opsd_clip is not None:
            per = per.clamp(max=a.opsd_clip)  # clipped tokens give no gradient
        return self.mean(b, per, s.mask), {}
