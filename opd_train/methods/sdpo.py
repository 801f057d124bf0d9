"""SDPO, self-distillation policy optimization (Hübotter et al., 2026).

The student samples ``G`` completions per prompt (default 8). The teacher is an EMA of the
student (rate ``--sdpo-ema`` 0.05) shown, for each sample, the prompt plus either a
*successful sibling* (another sample of the same prompt that the verifier accepted) or, when
there is none, the environment's textual *feedback* on this sample. The teacher is served as
top-k logprobs (``--sdpo-topk``, 100 in the paper; at most the vocabulary) and the loss is the
β-skewed JSD (``--sdpo-alpha`` 0.5) over the k+1 buckets {top-k ids, tail} via
`opd_kernels.sparse_distill_loss`, each token weighted by the truncated importance ratio
``min(π/π_old, --sdpo-ratio-clip)`` (2; it is 1 unless ``--epochs-per-batch`` > 1).

Student side without logits: the student's log-probs of the k teacher ids come from the fused
logprob op, and its tail bucket is ``1 − Σ q_K``. Passing ``[log q_K, log q_tail]`` as
(already normalised) logits with ids ``0..k-1`` gives the op exactly the k+1 buckets it would
build from full student logits.
"""
from __future__ import annotations

import torch

import opd_kernels as ok

from .. import rollout as R
from . import EMATeacher, Method, masked_mean


def bucket_logits(lm: R.LM, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[..., k+1]``: student log-probs of ``ids [..., k]`` then of the tail (all other tokens)."""
    hk = hidden.unsqueeze(-2).expand(*ids.shape, hidden.shape[-1])
    lq = ok.fused_linear_token_logprobs(hk, lm.weight, ids, bias=lm.bias)
    tail = 1 - lq.exp().sum(-1)
    pos = tail > 1e-6  # the double `where` keeps the gradient finite where the tail is empty
    log_tail = torch.where(pos, torch.where(pos, tail, torch.ones_like(tail)).log(),
                           torch.full_like(tail, float("-inf")))
    return torch.cat([lq, log_tail.unsqueeze(-1)], dim=-1)


class SDPO(Method):
    name = "sdpo"
    default_samples_per_prompt = 8

    def __init__(self, tr):
        super().__init__(tr)
        self.ema = EMATeacher(tr.student.model, self.args.sdpo_ema)

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
        student = bucket_logits(tr.student, h, b["topk_ids"])
        bucket_ids = torch.arange(b["topk_ids"].shape[-1], device=h.device).expand_as(b["topk_ids"])
        per = ok.sparse_distill_loss(student, bucket_ids, b["topk_logprobs"], divergence="jsd",
                                     beta=self.args.sdpo_alpha, mask=s.mask, reduction="none")
        lp = R.token_logprobs(tr.student, h, s)
        weight = torch.exp(lp - self.old_logprobs(b, lp)).clamp(max=self.args.sdpo_ratio_clip).detach()
        return masked_mean(weight * per, s.mask), {"sibling_fraction": b["sibling_fraction"]}

    def after_step(self):
        self.ema.update(self.tr.student.model)

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.ema.load_state_dict(state["ema"])
