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

Multi-teacher (the paper's merging of domain experts): with ``--domain-teacher DOMAIN=DIR`` (one
per domain; the bundled task's domains are its operations ``+`` and ``-``) each sample's teacher
is the expert of its prompt's domain, and the loss is the token-weighted sum of one fused call per
domain (the teachers' lm_heads differ, so their rows cannot share a call).
"""
from __future__ import annotations

from pathlib import Path

import torch

import opd_kernels as ok

from .. import rollout as R
from ..inputs import InputError, load_model, view
from ..lm import gopd_loss
from ..argtypes import pos_float
from .base import Method
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
        path = self.ref_path()
        ref = load_model("--ref", path, tr.device).eval().requires_grad_(False)
        self.ref = view("--ref", path, ref, tr.vocab_size, tr.student.compute_dtype)
        v_ref, v_s = self.ref.rows, tr.student.rows
        if v_ref != v_s:
            raise InputError(f"--ref {self.args.ref}: its lm_head has {v_ref} rows, the student's {v_s}; "
                             "the reference needs the student's vocabulary (--vocab-size N uses the first N of each)")
        # domain -> teacher; one entry "" (every sample) without --domain-teacher
        self.teachers = tr.domain_teachers or {"": tr.teacher}
        self.check_domains(tr.task.domains() if tr.domain_teachers else ("",))

    def check_domains(self, domains) -> None:
        missing = sorted(set(domains) - set(self.teachers))
        if missing:
            raise InputError(f"--domain-teacher: no teacher for domain {missing[0]!r} (have {sorted(self.teachers)})")

    def ref_path(self) -> str:
        a, tr = self.args, self.tr
        if a.ref:
            return a.ref
        if a.gopd_ref == "student":
            return tr.student_path
        if tr.domain_teachers:
            raise InputError("--gopd-ref teacher-base: not with --domain-teacher (which base?); pass --ref DIR")
        base = Path(tr.teacher_path) / "base"
        if not (base / "config.json").exists():
            raise InputError(f"--gopd-ref teacher-base: the teacher {tr.teacher_path} has no pre-RL base model "
                             f"({base} does not exist); pass its base as --ref DIR")
        return str(base)

    def prepare(self, examples):
        tr = self.tr
        b = self.rollout(examples, self.samples_per_prompt, self.args.temperature)
        s = b.seqs
        if tr.teacher_server is not None:  # --gopd-loss sampled (cli): the sampled tokens' teacher logprobs
            b.teacher_logprobs = tr.teacher_server.score(s)["logprobs"]
            b.scored_tokens += int(s.attention_mask.sum())
            with torch.no_grad():
                b.ref_logprobs = R.token_logprobs(self.ref, self.frozen_hidden(self.ref, s, b), s)
            return b
        if tr.domain_teachers:  # (every domain has a teacher: checked in __init__)
            doms = [tr.task.domain(ex) for ex in b.examples]
            groups = {d: torch.tensor([i for i, x in enumerate(doms) if x == d], device=tr.device)
                      for d in sorted(set(doms))}
        else:
            groups = {"": slice(None)}  # every row, as views of the batch (no copies)
        # domain -> (its rows, the teacher's hidden states of those rows)
        b.groups = {d: (rows, self.frozen_hidden(self.teachers[d], R.select(s, rows), b))
                       for d, rows in groups.items()}
        b.ref_hidden = self.frozen_hidden(self.ref, s, b)
        if self.args.gopd_loss == "sampled":
            with torch.no_grad():
                lp_t = None
                for d, (rows, h_t) in b.groups.items():
                    lp = R.token_logprobs(self.teachers[d], h_t, R.select(s, rows))
                    lp_t = lp.new_zeros(s.mask.shape) if lp_t is None else lp_t
                    lp_t[rows] = lp
                b.teacher_logprobs = lp_t
                b.ref_logprobs = R.token_logprobs(self.ref, b.ref_hidden, s)
        return b

    def split(self, b, rows: slice):
        """As `Method.split`, with each domain's rows renumbered within the micro-batch."""
        out = super().split(b, rows)
        groups = {}
        for d, (idx, h_t) in b.groups.items():
            if isinstance(idx, slice):  # every row
                groups[d] = (idx, h_t[rows])
            else:
                keep = (idx >= rows.start) & (idx < rows.stop)
                groups[d] = (idx[keep] - rows.start, h_t[keep])
        out.groups = groups
        return out

    def loss(self, b):
        s, tr, a = b.seqs, self.tr, self.args
        h = self.student_hidden(s)
        if a.gopd_loss == "fullvocab":
            total = h.new_zeros(())
            for d, (rows, h_t) in b.groups.items():
                total = total + gopd_loss(
                    tr.student, h[rows], self.teachers[d], h_t, self.ref, b.ref_hidden[rows],
                    reward_scale=a.gopd_reward_scale, mask=s.mask[rows], reduction="sum")
            return total / self.norm(b), {}
        lp = R.token_logprobs(tr.student, h, s)
        old = self.old_logprobs(b, lp)
        adv = ok.gopd_advantages(b.teacher_logprobs, b.ref_logprobs, old, reward_scale=a.gopd_reward_scale)
        return self.mean(b, clipped_surrogate(lp, old, adv, a.ppo_clip), s.mask), {}
