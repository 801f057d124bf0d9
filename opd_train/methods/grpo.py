"""GRPO baseline: group-normalised outcome reward, PPO-clipped policy gradient, no KL term.

Per prompt, ``G`` samples (default 8) get the verifier's reward ``r`` (0/1 exact match, or with
``--grpo-reward digits`` the share of right answer characters: partial credit, so a group of
wrong answers still has signal); every token of sample ``i`` gets the advantage
``(r_i − mean_G r) / (std_G r + ε)`` (Shao et al., 2024), or ``r_i − mean_G r`` with
``--no-grpo-std-norm`` (Dr.GRPO, Liu et al., 2025: the std division up-weights prompts that
are nearly always solved or failed; SDPO's GRPO baseline also turns it off). Loss: the clipped
surrogate ``−min(ρ A, clip(ρ, 1 ± ε_clip) A)``, ``ρ = π / π_old``, averaged over all sampled
tokens of the batch (``--grpo-loss-norm tokens``) or summed and divided by the constant
``batch × max_new_tokens`` (``max-tokens``: Dr.GRPO's length-unbiased normaliser).
"""
from __future__ import annotations

import argparse

import torch

from .. import rollout as R
from ..argtypes import pos_float
from .base import Method


def clipped_surrogate(logprobs, old_logprobs, adv, clip: float):
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def group_advantages(rewards: torch.Tensor, group: int, std_norm: bool = True) -> torch.Tensor:
    """Per-sample advantages, ``rewards`` laid out as consecutive groups of ``group`` samples."""
    r = rewards.view(-1, group)
    adv = r - r.mean(1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.view(-1)


class GRPO(Method):
    name = "grpo"
    summary = "baseline: group-normalised verifier reward, PPO-clipped policy gradient"
    paper = "Shao et al., 2024; Dr.GRPO: Liu et al., 2025"
    default_samples_per_prompt = 8

    @staticmethod
    def add_options(g):
        g.add_argument("--ppo-clip", type=pos_float, default=0.2,
                       help="ratio clip ε of the surrogate (also gopd --gopd-loss sampled, sdpo's policy term)")
        g.add_argument("--grpo-std-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="divide advantages by the group's reward std (GRPO; default on); "
                            "--no-grpo-std-norm: Dr.GRPO")
        g.add_argument("--grpo-loss-norm", choices=("tokens", "max-tokens"), default="tokens",
                       help="tokens: mean over the batch's sampled tokens; max-tokens: sum / (batch x "
                            "max_new_tokens), Dr.GRPO's constant normaliser")
        g.add_argument("--grpo-reward", choices=("exact", "digits"), default="exact",
                       help="exact: the 0/1 verifier; digits: share of right answer characters (partial credit)")

    def prepare(self, examples):
        g, a = self.samples_per_prompt, self.args
        b = self.rollout(examples, g, a.temperature)
        r = b.rewards
        if a.grpo_reward == "digits":
            r = torch.tensor([self.tr.task.partial_reward(ex, t) for ex, t in zip(b.examples, b.texts)],
                             device=r.device)
        b.advantages = group_advantages(r, g, a.grpo_std_norm)
        return b

    def loss(self, b):
        s = b.seqs
        lp = R.token_logprobs(self.tr.student, self.student_hidden(s), s)
        old = self.old_logprobs(b, lp)
        per = clipped_surrogate(lp, old, b.advantages[:, None], self.args.ppo_clip)
        return self.mean(b, per, s.mask, "max_tokens" if self.args.grpo_loss_norm == "max-tokens" else "tokens"), {}

    def normalizers(self, b):
        s = b.seqs
        return {"tokens": s.mask.sum(),
                "max_tokens": torch.tensor(float(s.mask.shape[0] * self.tr.max_new_tokens), device=s.mask.device)}
