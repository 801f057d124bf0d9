"""SDPO, self-distillation policy optimization (Hübotter et al., 2026).

The student samples ``G`` completions per prompt (default 8). The teacher is an EMA of the
student (rate ``--sdpo-ema`` 0.05) shown, for each sample, the prompt plus either a
*successful sibling* (another sample of the same prompt that the verifier accepted) or, when
there is none, the environment's textual *feedback* on this sample. The teacher is served as
top-k logprobs (``--sdpo-topk``, 100 in the paper; at most the vocabulary) and the loss is the
β-skewed JSD (``--sdpo-alpha`` 0.5) over the k+1 buckets {top-k ids, tail} via
`opd_kernels.sparse_distill_loss`, each token weighted by the truncated importance ratio
``min(π/π_old, --sdpo-ratio-clip)`` (2; it is 1 unless ``--epochs-per-batch`` > 1).

Student side without logits: `opd_kernels.fused_linear_sparse_distill_loss` takes the
student's hidden states and lm_head weight, reads the full vocabulary once for the
log-normalizer and gathers only the k teacher ids' weight rows (2·k·d flops per token).
"""
from __future__ import annotations

import torch

import opd_kernels as ok

from .. import rollout as R
from ..argtypes import pos_float, pos_int, rate, unit
from .base import EMATeacher, Method, masked_mean


class SDPO(Method):
    name = "sdpo"
    summary = "self-distillation policy optimization: an EMA self-teacher shown feedback or a successful sibling"
    paper = "Hübotter et al., 2026"
    default_samples_per_prompt = 8
    teacher = "self"

    @staticmethod
    def add_options(g):
        g.add_argument("--sdpo-ema", type=rate, default=0.05, help="EMA rate of the self-teacher per step")
        g.add_argument("--sdpo-topk", type=pos_int, default=100, help="teacher top-k (capped at the vocabulary)")
        g.add_argument("--sdpo-alpha", type=unit, default=0.5, help="JSD skew α over the top-k + tail buckets")
        g.add_argument("--sdpo-ratio-clip", type=pos_float, default=2.0, help="truncated importance ratio cap")

    def __init__(self, tr):
        super().__init__(tr)
        self.ema = EMATeacher(tr.student.model, self.args.sdpo_ema, tr.vocab_size)

    def prepare(self, examples):
        g, task = self.samples_per_prompt, self.tr.task
        b = self.rollout(examples, g, self.args.temperature)
        exs, texts, ok_ = b["examples"], b["texts"], b["rewards"].tolist()
        ctx, n_sibling = [], 0
        for i, (ex, text) in enumerate(zip(exs, texts)):
            group = range(i - i % g, i - i % g + g)
            sibling = next((j for j in group if j != i and ok_[j] > 0), None)
            if sibling is not None:
                ctx.append(task.with_context(ex, "demo", demo=texts[sibling]))
                n_sibling += 1
            else:
                ctx.append(task.with_context(ex, "feedback", attempt=text))
        h_t = self.frozen_hidden(self.ema.lm, self.repack(b["seqs"], ctx))
        k = min(self.args.sdpo_topk, self.ema.lm.weight.shape[0])
        b["topk_ids"], b["topk_logprobs"] = R.teacher_topk(self.ema.lm, h_t, k)
        b["sibling_fraction"] = n_sibling / len(exs)
        return b

    def loss(self, b):
        s, tr = b["seqs"], self.tr
        h = self.student_hidden(s)
        per = ok.fused_linear_sparse_distill_loss(h, tr.student.weight, b["topk_ids"], b["topk_logprobs"],
                                                  bias=tr.student.bias, divergence="jsd", beta=self.args.sdpo_alpha,
                                                  mask=s.mask, reduction="none")
        lp = R.token_logprobs(tr.student, h, s)
        weight = torch.exp(lp - self.old_logprobs(b, lp)).clamp(max=self.args.sdpo_ratio_clip).detach()
        return masked_mean(weight * per, s.mask), {"sibling_fraction": b["sibling_fraction"]}

    def after_step(self):
        self.ema.update(self.tr.student.model)

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.ema.load_state_dict(state["ema"])
