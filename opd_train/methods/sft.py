"""SFT baseline: token cross-entropy on the dataset's reference answers (teacher forcing)."""
from __future__ import annotations

from .. import rollout as R
from .base import Method


def sft_loss(lm: R.LM, s: R.Seqs, fwd=None, norm=None):
    """Mean negative log-likelihood of the completion tokens (fused: no logits built).

    ``fwd`` computes the hidden states (the DDP wrapper of ``lm`` when data-parallel); ``norm``
    is the token count to divide by (default: this batch's).
    """
    lp = R.token_logprobs(lm, R.completion_hidden(fwd or lm, s), s)
    return -lp.sum() / (s.mask.sum().clamp(min=1) if norm is None else norm)


class SFT(Method):
    name = "sft"
    samples_student = False
    summary = "baseline: cross-entropy on the dataset's reference answers"

    def prepare(self, examples):
        return self.reference(examples)

    def loss(self, b):
        return sft_loss(self.tr.student, b.seqs, self.tr.student_fwd, self.norm(b)), {}
