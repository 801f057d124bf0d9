"""`Method`, the base every training method extends, and the pieces methods share."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

import opd_kernels as ok

from .. import rollout as R
from ..argtypes import rate
from ..lm import autocast, full


@dataclass
class Batch:
    """What ``Method.prepare`` hands to ``Method.loss``: the completions and, per method, the
    teacher-side tensors (no gradient). Per-row fields have one entry per completion
    (``seqs.completion.shape[0]``); `Method.split` cuts them for micro-batches."""
    examples: list                                  # the task example of each completion
    seqs: R.Seqs                                    # prompt + completion, packed
    texts: list[str] | None = None                  # decoded completions (sampled batches)
    rewards: torch.Tensor | None = None             # [B] verifier rewards (sampled batches)
    advantages: torch.Tensor | None = None          # [B] per-sample advantages (grpo, sdpo)
    teacher_hidden: torch.Tensor | None = None      # [B, C, d] the teacher's hidden states at the completion
    teacher_logprobs: torch.Tensor | None = None    # [B, C] the teacher's log-probs of the sampled tokens
    teacher_entropy: torch.Tensor | None = None     # [B, C] the teacher's entropy per position (eopd)
    served: dict | None = None                      # a --teacher-server teacher's scores (`ServerTeacher.score`)
    ref_hidden: torch.Tensor | None = None          # [B, C, d] the G-OPD reference's hidden states
    ref_logprobs: torch.Tensor | None = None        # [B, C] the reference's log-probs of the sampled tokens
    groups: dict | None = None                      # G-OPD: domain -> (rows, that teacher's hidden states)
    topk_ids: torch.Tensor | None = None            # [B, C, k] distilled ids (sdpo, topk-rkl)
    topk_logprobs: torch.Tensor | None = None       # [B, C, k] the teacher's log-probs at topk_ids
    sd_mask: torch.Tensor | None = None             # [B, C] SDPO's distilled tokens
    on_policy: float | None = None                  # GKD: 1 if this step sampled from the student
    context_fraction: float | None = None           # SDPO: share of samples with a teacher context
    sibling_fraction: float | None = None           # SDPO: share whose context is a successful sibling
    old_logprobs: torch.Tensor | None = None        # [B, C] log π_old, set by the first update (`old_logprobs`)
    norm: dict | None = None                        # whole-batch counts (`normalizers`), set per update
    # budgets of this batch (`opd_train.budget`): tokens sampled and scored, and the scorers' FLOPs
    generated_tokens: int = 0                       # completion tokens sampled by the student
    teacher_generated_tokens: int = 0               # completion tokens sampled by a teacher (seqkd)
    teacher_sample_flops: float = 0.0               # 2·N_teacher per teacher-sampled token
    scored_tokens: int = 0                          # tokens run through a frozen model (teachers, references)
    score_flops: float = 0.0                        # 2·N per token of each such forward

    @property
    def rows(self) -> int:
        return self.seqs.completion.shape[0]


def n_params(model: torch.nn.Module) -> int:
    """Parameter count N of a model (every parameter, embeddings included; an FSDP2 DTensor counts its
    whole, unsharded shape)."""
    return sum(p.numel() for p in model.parameters())


# where the defaults' short bench-preset runs are recorded (cited in --help)
MEASURED = "measured: docs/measurements/bench_defaults.json"


class Method:
    """What the registry (`opd_train.methods.METHODS`) and the CLI read from each method class."""
    name: str                       # --method NAME; the registry key
    summary: str                    # one line for --help
    paper: str | None = None        # where the method and its option defaults come from
    default_samples_per_prompt = 1
    teacher: str | None = None      # "external" (needs --teacher), "self" (the student with context) or None
    samples_student = True          # draws completions from the student (what --rollout-engine samples)

    @staticmethod
    def add_options(group) -> None:
        """Add this method's ``--NAME-*`` options (defaults: the paper's values) to its help group."""

    def __init__(self, tr):
        self.tr, self.args = tr, tr.args

    # -- the two steps every method defines --------------------------------------------
    def prepare(self, examples) -> Batch:
        raise NotImplementedError

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -- optional hooks -------------------------------------------------------------------
    def after_step(self) -> None:
        """Called after each optimizer step (EMA teachers update here)."""

    def eval_metrics(self) -> dict:
        """Extra numbers for each evaluation row (rank 0), e.g. a self-teacher's accuracy with its context."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared building blocks -----------------------------------------------------------
    @property
    def samples_per_prompt(self) -> int:
        return self.args.samples_per_prompt or self.default_samples_per_prompt

    @torch.no_grad()
    def rollout(self, examples, n: int, temperature: float, model: torch.nn.Module | None = None) -> Batch:
        """``n`` samples per prompt from ``model`` (default: the student), packed, decoded and scored
        by the verifier; the sampled tokens are counted as the student's or (``model``) a teacher's."""
        tr = self.tr
        exs = [ex for ex in examples for _ in range(n)]
        prompts = R.encode_prompts(tr.tok, [ex.prompt for ex in exs])
        if model is None and tr.rollout_engine is not None:  # --rollout-engine vllm
            comp, mask, _ = tr.rollout_engine.generate(prompts, max_new_tokens=tr.max_new_tokens, temperature=temperature)
        else:
            with autocast(tr.device, tr.student.compute_dtype):
                comp, mask = R.generate(model or tr.student.model, tr.tok, prompts, max_new_tokens=tr.max_new_tokens,
                                        temperature=temperature, vocab_size=tr.vocab_size,
                                        synced=model is None and tr.student.sharded)
        texts = R.decode(tr.tok, comp, mask)
        rewards = torch.tensor([tr.task.reward(ex, t) for ex, t in zip(exs, texts)], device=tr.device)
        b = Batch(exs, R.pack(prompts, comp, mask, tr.tok.pad_token_id), texts=texts, rewards=rewards)
        tokens = int(mask.sum())
        if model is None:
            b.generated_tokens = tokens
        else:
            b.teacher_generated_tokens, b.teacher_sample_flops = tokens, 2.0 * n_params(model) * tokens
        return b

    def reference(self, examples) -> Batch:
        """The dataset's reference answers under the plain prompts (teacher forcing)."""
        tok = self.tr.tok
        comp, mask = R.pad_completions(R.encode_answers(tok, [ex.answer for ex in examples]), tok.pad_token_id)
        prompts = R.encode_prompts(tok, [ex.prompt for ex in examples])
        seqs = R.pack(prompts, comp.to(self.tr.device), mask.to(self.tr.device), tok.pad_token_id)
        return Batch(list(examples), seqs)

    def repack(self, seqs: R.Seqs, user_contents: list[str]) -> R.Seqs:
        """The same completions under other prompts (a teacher's view with privileged context)."""
        prompts = R.encode_prompts(self.tr.tok, user_contents)
        return R.pack(prompts, seqs.completion, seqs.mask, self.tr.tok.pad_token_id)

    def context_accuracy(self, model: torch.nn.Module, kind: str) -> float:
        """Greedy held-out accuracy of ``model`` shown privileged context ``kind`` (a self-teacher's view)."""
        tr = self.tr
        return R.evaluate(model, tr.tok, tr.task, tr.task.eval_examples(), max_new_tokens=tr.max_new_tokens,
                          vocab_size=tr.vocab_size, prompt=lambda ex: tr.task.with_context(ex, kind))

    def student_hidden(self, seqs: R.Seqs) -> torch.Tensor:
        """Student hidden states with gradient (through DDP when data-parallel)."""
        return R.completion_hidden(self.tr.student_fwd, seqs)

    @staticmethod
    @torch.no_grad()
    def frozen_hidden(lm: R.LM, seqs: R.Seqs, batch: Batch | None = None) -> torch.Tensor:
        """A frozen model's hidden states at the completion; its forward's tokens and FLOPs
        (2·N per token) are added to ``batch``'s scoring budget."""
        if batch is not None:
            tokens = int(seqs.attention_mask.sum())
            batch.scored_tokens += tokens
            batch.score_flops += 2.0 * n_params(lm.model) * tokens
        return R.completion_hidden(lm, seqs)

    # -- normalisers and micro-batches ----------------------------------------------------------
    def normalizers(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The counts this method's loss divides by, over the whole batch. Micro-batches of it share
        them (``batch.norm``, set by `opd_train.step.micro_batches`), so their losses add up to
        the whole batch's loss and their gradients to its gradient."""
        return {"tokens": batch.seqs.mask.sum()}

    def norm(self, batch: Batch, name: str = "tokens") -> torch.Tensor:
        """The whole batch's count ``name`` (at least 1)."""
        n = batch.norm[name] if batch.norm is not None else self.normalizers(batch)[name]
        return n.clamp(min=1)

    def mean(self, batch: Batch, x: torch.Tensor, mask: torch.Tensor, name: str = "tokens") -> torch.Tensor:
        """``Σ x`` over ``mask`` / the whole batch's count ``name`` (the masked mean on a whole batch)."""
        return (x * mask).sum() / self.norm(batch, name)

    def split(self, batch: Batch, rows: slice) -> Batch:
        """Rows ``rows`` of a prepared batch (views): per-row fields (the packed sequences, tensors
        and lists with one entry per completion, a served teacher's per-row scores) are cut,
        per-batch ones (fractions, ``norm``, budgets, ``groups``: see `GOPD.split`) kept."""
        n = batch.rows

        def cut(v):
            if isinstance(v, R.Seqs):
                return R.select(v, rows)
            if (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n) or (isinstance(v, list) and len(v) == n):
                return v[rows]
            return v
        per_row = {f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)
                   if f.name not in ("norm", "groups", "served")}
        served = None if batch.served is None else {k: cut(x) for k, x in batch.served.items()}
        return dataclasses.replace(batch, **per_row, served=served)

    def served_loss(self, h: torch.Tensor, b: Batch, divergence: str, beta: float = 0.5) -> torch.Tensor:
        """The divergence to a ``--teacher-server`` teacher over its top-k + tail buckets
        (``b.served``: `opd_train.server_teacher.ServerTeacher.score`), fused with the student's
        head (bias, softcap, logit_scale); summed and divided by the whole batch's token count, like
        every other loss here, so micro-batches add up."""
        t, head = b.served, self.tr.student.head
        loss = ok.fused_linear_sparse_distill_loss(h, head.weight, t["topk_ids"], t["topk_logprobs"], **head.kwargs(),
                                                   divergence=divergence, beta=beta, mask=b.seqs.mask,
                                                   reduction="sum")
        return loss / self.norm(b)

    def old_logprobs(self, batch: Batch, logprobs: torch.Tensor) -> torch.Tensor:
        """``log π_old`` of the sampled tokens: the policy that sampled them.

        The first update's forward runs at the weights that sampled (HF ``generate`` on the
        student, or a ``--rollout-engine vllm`` engine synced to it after every step), so its
        (detached) logprobs are the sampler's, recomputed; the vLLM engine's own logprobs are not
        used. Later epochs over the same batch (``--epochs-per-batch``) reuse them, making
        importance ratios meaningful.
        """
        if batch.old_logprobs is None:
            batch.old_logprobs = logprobs.detach()
        return batch.old_logprobs


class SelfTeacherMethod(Method):
    """A method whose teacher is the student shown privileged context (SDFT, SDPO): the student frozen
    at initialisation (``--NAME-teacher frozen``, the default) or, as the papers run it, an EMA of the
    student (``--NAME-teacher ema``, rate ``--NAME-ema``). Each evaluation row logs the teacher's
    greedy accuracy with the demonstration in context (``teacher_context_accuracy``)."""
    teacher = "self"
    ema_rate: float       # the paper's EMA rate per step (the --NAME-ema default)
    ema_measured: str     # what the EMA teacher did on the bench preset (its --help)

    @classmethod
    def add_teacher_options(cls, g) -> None:
        g.add_argument(f"--{cls.name}-teacher", choices=("ema", "frozen"), default="frozen",
                       help=f"frozen: the initial student (default: it learns on the bench preset, {MEASURED}); "
                            f"ema: tracks the student at --{cls.name}-ema (the paper's recipe; {cls.ema_measured})")
        g.add_argument(f"--{cls.name}-ema", type=rate, default=cls.ema_rate, help="EMA rate of the self-teacher per step")

    def __init__(self, tr):
        super().__init__(tr)
        opts = vars(self.args)
        self.ema = EMATeacher(tr.student.model, opts[f"{self.name}_ema"], tr.vocab_size,
                              frozen=opts[f"{self.name}_teacher"] == "frozen", compute_dtype=tr.student.compute_dtype)

    def after_step(self):
        self.ema.update(self.tr.student.model)

    def eval_metrics(self):
        return {"teacher_context_accuracy": self.context_accuracy(self.ema.model, "demo")}

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.ema.load_state_dict(state["ema"])


class EMATeacher:
    """A frozen copy of the student that tracks it, ``θ_T ← (1 − rate) θ_T + rate θ``, or, with
    ``frozen``, stays the student at initialisation (SDFT/SDPO ``--*-teacher frozen``)."""

    def __init__(self, student: torch.nn.Module, rate: float, vocab_size: int | None = None, frozen: bool = False,
                 compute_dtype: torch.dtype | None = None):
        self.rate, self.frozen = rate, frozen
        self.model = student_copy(student).eval().requires_grad_(False)
        self.lm = R.LM(self.model, vocab_size, compute_dtype)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        if self.frozen:
            return
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.lerp_(full(s.detach()).to(t.dtype), self.rate)  # an FSDP shard is gathered whole

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def student_copy(student: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy of the student: ``deepcopy``, or under FSDP the same architecture with
    every parameter gathered whole (a collective: every process calls it)."""
    if not any(hasattr(p, "full_tensor") for p in student.parameters()):
        return copy.deepcopy(student)
    copied = AutoModelForCausalLM.from_config(student.config)
    state = {k: full(v.detach()) for k, v in student.state_dict().items()}
    copied.load_state_dict(state)
    return copied.to(next(iter(state.values())).device)
