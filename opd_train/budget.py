"""What a run has spent so far, logged in every metrics row (training and evaluation rows alike).

Cumulative counts, summed over processes:

* ``optimizer_steps``; ``prompts`` (distinct prompts drawn); ``samples`` (completions trained on);
* ``generated_tokens``: completion tokens the student sampled; ``teacher_generated_tokens``:
  completion tokens a teacher sampled (seqkd's off-policy data);
* ``scored_tokens``: tokens (prompt + completion) run through a frozen model: an external or
  self-teacher, a G-OPD reference, SDPO's top-k pass (a served teacher's tokens are counted, its
  FLOPs are not: its size is unknown here);
* ``trained_tokens``: tokens (prompt + completion) through the student's forward and backward,
  once per update (``--epochs-per-batch``);
* ``time_s``: seconds in training steps (sampling, teacher passes, updates; no evaluation);
  ``wall_s``: seconds since the run started (setup and evaluations included; a resumed run
  continues from its checkpoint's value);
* estimated FLOPs, with N a model's parameter count (every parameter): ``flops_train`` 6·N_student
  per trained token, ``flops_sample`` 2·N_student per student-generated token,
  ``flops_teacher_sample`` 2·N_teacher per teacher-generated token, ``flops_score`` 2·N per scored
  token of each frozen model; ``flops`` is their sum.

`opd_train.compare` plots accuracy against these (``--x``) and the claims compare the budget each
run needs to reach a target accuracy (`opd_train.claims.verdict`).
"""
from __future__ import annotations

import time

COUNTS = ("optimizer_steps", "prompts", "generated_tokens", "teacher_generated_tokens", "scored_tokens",
          "trained_tokens")
FLOPS = ("flops_train", "flops_sample", "flops_teacher_sample", "flops_score")
KEYS = (*COUNTS, *FLOPS, "flops", "wall_s")


class Budget:
    """Adds each step's spending to ``progress`` (the checkpointed dict) and reports the totals."""

    def __init__(self, progress: dict, n_student: int):
        self.progress, self.n_student = progress, n_student
        for key in (*COUNTS, *FLOPS, "wall_s"):
            progress.setdefault(key, 0)
        self.start = time.perf_counter() - progress["wall_s"]

    def add(self, totals: list[float], prompts: int, updates: int) -> None:
        """One step: ``totals``, the batch's counts (`local`) summed over processes; ``prompts`` drawn
        over all processes; ``updates`` optimizer steps on the batch."""
        gen, tgen, scored, trained, tflops, sflops = totals
        p = self.progress
        p["optimizer_steps"] += updates
        p["prompts"] += prompts
        p["generated_tokens"] += int(gen)
        p["teacher_generated_tokens"] += int(tgen)
        p["scored_tokens"] += int(scored)
        p["trained_tokens"] += int(trained) * updates
        p["flops_train"] += 6.0 * self.n_student * trained * updates
        p["flops_sample"] += 2.0 * self.n_student * gen
        p["flops_teacher_sample"] += tflops
        p["flops_score"] += sflops

    def row(self) -> dict:
        """The totals so far, for a metrics row."""
        p = self.progress
        p["wall_s"] = time.perf_counter() - self.start
        out = {key: p[key] for key in (*COUNTS, *FLOPS)}
        out["flops"] = sum(p[key] for key in FLOPS)
        out["wall_s"] = p["wall_s"]
        return out

    @staticmethod
    def local(batch) -> list[float]:
        """This process's counts of ``batch`` (`opd_train.methods.base.Batch`): generated, teacher-generated,
        scored and trained tokens, teacher sampling and scoring FLOPs (summed over processes, `add`'s ``totals``)."""
        return [float(batch.generated_tokens), float(batch.teacher_generated_tokens), float(batch.scored_tokens),
                float(batch.seqs.attention_mask.sum()), batch.teacher_sample_flops, batch.score_flops]
