"""Sequence-level KD (Kim & Rush, 2016): SFT on the teacher's sampled answers.

The off-policy distillation baseline that on-policy distillation is measured against (the
Thinking Machines OPD post compares OPD with SFT on teacher-generated data): each step the
external teacher samples one answer per prompt at ``--temperature`` and the student is trained
by cross-entropy on it. Unlike `sft`, which trains on the dataset's reference answers, this
student can only learn what the teacher gets right.
"""
from __future__ import annotations

from .base import Method
from .sft import sft_loss


class SeqKD(Method):
    name = "seqkd"
    summary = "off-policy distillation: SFT on the teacher's sampled answers (sequence-level KD)"
    paper = "Kim & Rush, 2016"
    teacher = "external"
    samples_student = False  # the teacher samples

    def prepare(self, examples):  # rewards: how often the teacher's samples are right
        return self.rollout(examples, 1, self.args.temperature, model=self.tr.teacher.model)

    def loss(self, b):
        return sft_loss(self.tr.student, b.seqs, self.tr.student_fwd, self.norm(b)), {}
