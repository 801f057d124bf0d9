"""GRPO baseline: group-normalised outcome reward, PPO-clipped policy gradient, no KL term.

Per prompt, ``G`` samples (default 8) get the verifier's 0/1 reward ``r``; every token of
sample ``i`` gets the advantage ``(r_i − mean_G r) / (std_G r + ε)``. Loss: the clipped surrogate
``−min(ρ A, clip(ρ, 1 ± ε_clip) A)`` averaged over all sampled tokens, ``ρ = π / π_old``.
"""
from __future__ import annotations

import torch

from .. import rollout as R
from ..argtypes import pos_float
from .base import Method, masked_mean


def clipped_surrogate(logprobs, old_logprobs, adv, clip: float):
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


class GRPO(Method):
    name = "grpo"
    summary = "baseline: group-normalised verifier reward, PPO-clipped policy gradient"
    paper = "Shao et al., 2024"
    default_samples_per_prompt = 8

    @staticmethod
    def add_options(g):
        g.add_argument("--ppo-clip", type=pos_float, default=0.2,
                       help="ratio clip ε of the surrogate (also gopd --gopd-loss sampled)")

    def prepare(self, examples):
        g = self.samples_per_prompt
        b = self.rollout(examples, g, self.args.temperature)
        r = b["rewards"].view(-1, g)
        b["advantages"] = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        return b

    def loss(self, b):
        s = b["seqs"]
        lp = R.token_logprobs(self.tr.student, self.student_hidden(s), s)
        old = self.old_logprobs(b, lp)
        per = clipped_surrogate(lp, old, b["advantages"][:, None], self.args.ppo_clip)
        return masked_mean(per, s.mask), {}
