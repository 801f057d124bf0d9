"""G-OPD / ExOPD: generalized on-policy distillation with reward extrapolation (Yang et al., 2026).

Target ``p* ∝ p_T^λ · p_ref^(1−λ)`` with ``λ`` = ``--gopd-reward-scale`` (1.25 = ExOPD; λ=1 is
plain OPD; the paper's sweep: 1, 1.25, 2). ``p_ref`` is ``--gopd-ref student`` (default: the
student's initial policy), ``teacher-base`` (the teacher's pre-RL base model, the paper's "reward
correction": the teacher's implicit reward ``log p_T − log p_base`` then excludes what the base
already knew; looked up as ``TEACHER_DIR/base``, where a teacher trained by SFT then RL keeps its
base), or any model given as ``--ref DIR``. On the student's samples:

* ``--gopd-loss fullvocab`` (default): exact ``KL(π ‖ p*)`` per token via
  `opd_kernels.fused_linear_gopd_loss`;
* ``--gopd-loss sampled``: per-token advantage
  ``A_t = λ (log p_T − log p_ref) − (log π_old − log p_ref)`` from `opd_kernels.gopd_advantages`
  with the PPO clipped surrogate (``--ppo-clip`` 0.2).
"""
from __future__ import annotations

from pathlib import Path

import torch

import opd_kernels as ok

from .. import rollout as R
from ..inputs import InputError, load_model
from ..argtypes import pos_float
from .base import Method, masked_mean
from .grpo import clipped_surrogate


class GOPD(Method):
    name = "gopd"
    summary = "G-OPD / ExOPD: distillation towards an extrapolated teacher/reference target"
    paper = "Yang et al., 2026"
    default_samples_per_prompt = 4
    teacher = "external"

    @staticmethod
    def add_options(g):
        g.add_argument("--gopd-reward-scale", type=pos_float, default=1.25,
                       help="λ: 1 = OPD, >1 = ExOPD reward extrapolation (useful range 1-3)")
        g.add_argument("--gopd-ref", choices=("student", "teacher-base"), default="student",
                       help="reference p_ref: the student at initialisation, or the teacher's pre-RL base "
                            "(TEACHER_DIR/base; reward correction); --ref DIR overrides both")
        g.add_argument("--gopd-loss", choices=("fullvocab", "sampled"), default="fullvocab",
                       help="fullvocab: exact KL to the extrapolated target; sampled: gopd_advantages + "
                            "the PPO clip --ppo-clip")

    def __init__(self, tr):
        super().__init__(tr)
        ref = load_model("--ref", self.ref_path(), tr.device).eval().requires_grad_(False)
        self.ref = R.LM(ref, tr.vocab_size)
        v_ref, v_s = self.ref.weight.shape[0], tr.student.weight.shape[0]
        if v_ref != v_s:
            raise InputError(f"--ref {self.args.ref}: its lm_head has {v_ref} rows, the student's {v_s}; "
                             "the reference needs the student's vocabulary (--vocab-size N uses the first N of each)")

    def ref_path(self) -> str:
        a, tr = self.args, self.tr
        if a.ref:
            return a.ref
        if a.gopd_ref == "student":
            return tr.student_path
        base = Path(tr.teacher_path) / "base"
        if not (base / "config.json").exists():
            raise InputError(f"--gopd-ref teacher-base: the teacher {tr.teacher_path} has no pre-RL base model "
                             f"({base} does not exist); pass its base as --ref DIR")
        return str(base)

    def prepare(self, examples):
        tr = self.tr
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        b["teacher_hidden"] = self.frozen_hidden(tr.teacher, b["seqs"])
        b["ref_hidden"] = self.frozen_hidden(self.ref, b["seqs"])
        if self.args.gopd_loss == "sampled":
            with torch.no_grad():
                b["teacher_logprobs"] = R.token_logprobs(tr.teacher, b["teacher_hidden"], b["seqs"])
                b["ref_logprobs"] = R.token_logprobs(self.ref, b["ref_hidden"], b["seqs"])
        return b

    def loss(self, b):
        s, tr, a = b["seqs"], self.tr, self.args
        h = self.student_hidden(s)
        if a.gopd_loss == "fullvocab":
            loss = ok.fused_linear_gopd_loss(h, tr.student.weight, b["teacher_hidden"], tr.teacher.weight,
                                             b["ref_hidden"], self.ref.weight, student_bias=tr.student.bias,
                                             teacher_bias=tr.teacher.bias, ref_bias=self.ref.bias,
                                             reward_scale=a.gopd_reward_scale, mask=s.mask)
            return loss, {}
        lp = R.token_logprobs(tr.student, h, s)
        old = self.old_logprobs(b, lp)
        adv = ok.gopd_advantages(b["teacher_logprobs"], b["ref_logprobs"], old, reward_scale=a.gopd_reward_scale)
        return masked_mean(clipped_surrogate(lp, old, adv, a.ppo_clip), s.mask), {}
