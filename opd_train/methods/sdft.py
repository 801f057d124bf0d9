"""SDFT, self-distillation fine-tuning (Shenfeld et al., 2026).

The teacher is the student shown the prompt plus a demonstration (the dataset answer): by
default the student frozen at initialisation (``--sdft-teacher frozen``; Tinker's SDFT recipe
ablation found it as good as the EMA one), or, as the paper runs it, an EMA of the student
(``--sdft-teacher ema``, rate ``--sdft-ema`` 0.01 per step). No row with the demonstration in
context is ever trained, so an EMA teacher that follows the student can lose the in-context
ability it started with: on the bench preset, with the student pre-trained on this machine, its
accuracy with context fell from 99.6% to 80.9% and the student ended at 81.6-87.1%
(docs/compare/claims_runs.md, 5 seeds; with an earlier pre-trained student, near 11%:
claims_runs.md at 0ec8b3d), while the frozen teacher taught it to 100%; hence the default.
Each evaluation row logs ``teacher_context_accuracy``, the teacher's greedy held-out accuracy
with the demonstration in context. The student learns on its own samples with the full-vocabulary ``forward_kl`` to the
teacher. The first ``--sdft-skip-tokens`` completion tokens are left out of the loss (the
reference skips 3, where an LLM teacher tends to talk about the demonstration; the bundled answers
are 3-5 tokens with no such preamble, hence 0 by default). The paper trains at lr 2e-5 with
warmup and cosine decay (``--lr-schedule cosine --warmup-steps N``).
"""
from __future__ import annotations

from ..argtypes import nonneg_int
from ..lm import distill_loss
from .base import SelfTeacherMethod


class SDFT(SelfTeacherMethod):
    name = "sdft"
    summary = "self-distillation fine-tuning: the student (frozen, or the paper's EMA), shown a demonstration, as teacher"
    paper = "Shenfeld et al., 2026"
    ema_rate = 0.01
    ema_measured = ("on the bench preset, 300 steps, 5 seeds, it ended at 81.6-87.1%% against frozen's 100%%, "
                    "docs/compare/claims_runs.md; with an earlier pre-trained student it lost its in-context "
                    "ability and ended near 11%%, claims_runs.md at 0ec8b3d")

    @classmethod
    def add_options(cls, g):
        cls.add_teacher_options(g)
        g.add_argument("--sdft-skip-tokens", type=nonneg_int, default=0,
                       help="leading completion tokens left out (the reference skips 3; bundled answers have "
                            "no preamble)")

    def prepare(self, examples):
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        ctx = [self.tr.task.with_context(ex, "demo") for ex in b.examples]
        b.teacher_hidden = self.frozen_hidden(self.ema.lm, self.repack(b.seqs, ctx), b)
        return b

    def loss(self, b):
        s, tr = b.seqs, self.tr
        loss = distill_loss(tr.student, self.student_hidden(s), self.ema.lm, b.teacher_hidden,
                            divergence="forward_kl", mask=self.distilled(s), reduction="sum")
        return loss / self.norm(b), {}

    def distilled(self, s):
        """The completion tokens in the loss: all but the first ``--sdft-skip-tokens``."""
        mask = s.mask.clone()
        mask[:, : self.args.sdft_skip_tokens] = False
        return mask

    def normalizers(self, b):
        return {"tokens": self.distilled(b.seqs).sum()}
