"""Sequence-level KD (Kim & Rush, 2016): SFT on the teacher's sampled answers.

The off-policy distillation baseline that on-policy distillation is measured against (the
Thinking Machines OPD post compares OPD with SFT on teacher-generated data): each step the
external teacher samples one answer per prompt at ``--temperature`` and the student is trained
by cross-entropy on it. Unlike `sft`, which trains on the dataset's reference answers, this
student can only learn what the teacher gets right.
"""
from __future__ import annotations

import torch

from .. import rollout as R
from .base import Method
from .sft import sft_loss


class SeqKD(Method):
    name = "seqkd"
    summary = "off-policy distillation: SFT on the teacher's sampled answers (sequence-level KD)"
    paper = "Kim & Rush, 2016"
    teacher = "external"

    @torch.no_grad()
    def prepare(self, examples):
        tr = self.tr
        prompts = R.encode_prompts(tr.tok, [ex.prompt for ex in examples])
        comp, mask = R.generate(tr.teacher.model, tr.tok, prompts, max_new_tokens=tr.max_new_tokens,
                                temperature=self.args.temperature, vocab_size=tr.vocab_size)
        texts = R.decode(tr.tok, comp, mask)
        rewards = torch.tensor([tr.task.reward(ex, t) for ex, t in zip(examples, texts)], device=tr.device)
        return {"examples": list(examples), "rewards": rewards,  # reward: the teacher's samples' accuracy
                "seqs": R.pack(prompts, comp, mask, tr.tok.pad_token_id)}

    def loss(self, b):
        return sft_loss(self.tr.student, b["seqs"], self.tr.student_fwd), {}
