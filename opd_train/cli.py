"""Command line: argument groups, presets and validation for ``python -m opd_train``.

Presets fill in every option left unset on the command line: ``default`` is the bundled
3-digit addition task with a 3-layer Llama teacher (~0.4M parameters, 100% held-out after 1000
SFT steps) and a 2-layer Qwen2 student (~60K parameters, ~14% after 400 SFT steps whose plain
rows are mostly carry-free: see `opd_train.models`); ``smoke`` is a 2-digit version with
smaller models for quick end-to-end checks; ``selfdistill`` is the default task, teacher and
budget with a student that can use privileged context (for OPSD/SDFT/SDPO; see its comment in PRESETS);
``bench`` is the bundled benchmark of every method that ``python -m opd_train.compare --claims``
runs: a student weak without context (16.8%) but 97-100% with it and 100% on a prior skill
(subtraction), an imperfect teacher (74.2%: SFT without carry chains, then GRPO, base kept) and
domain experts (measured at its introduction; see docs/design.md).

The default budget (1000 steps of 64 completions at lr 1e-3) was measured with the default
method, TM-style sampled-token OPD (16 prompts x 4 samples): held-out accuracy 14% -> 40-60%
(seeds 1, 2; greedy accuracy swings by +-15 points between evaluations), ~2 min of training on
2 idle cores. Batch 32 needed ~1200 steps for the same gain and was noisier; lr 2e-3 gained
more on average (57-92%) but first dropped to ~0% for ~100 steps, and lr 3e-3 collapsed to 0%.
Method options default to the values of the papers that introduced them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap

import torch

from . import inputs, server_teacher, verifiers, vllm_engine
from .argtypes import domain_dir, nonneg_int, pos_float, pos_int
from .data import EXAMPLE_ROW
from .methods import METHODS, Method
from .bench_assets import RLSpec
from .models import ModelSpec
from .task import ALL_CONTEXT_KINDS

PROG = "python -m opd_train"

_SMOKE_TEACHER = dict(arch="llama", d_model=48, layers=2, heads=4, kv_heads=4, mlp=128, steps=300, batch_size=64,
                      lr=1e-2, context_fraction=0.0)
PRESETS = {
    "smoke": dict(
        digits=2, ops="+", steps=12, batch_size=16, lr=3e-3, eval_every=6, eval_size=64, save_every=6,
        prior_ops="-", experts={"+": "teacher", "-": ModelSpec(**_SMOKE_TEACHER, ops="-")}, strong_teacher="teacher",
        teacher=ModelSpec(**_SMOKE_TEACHER),
        student=ModelSpec("qwen2", d_model=32, layers=2, heads=4, kv_heads=2, mlp=96, steps=60,
                          batch_size=64, lr=1e-2, plain_carry_share=0.2),
    ),
    "default": dict(
        digits=3, ops="+", steps=1000, batch_size=64, lr=1e-3, eval_every=50, eval_size=256, save_every=100,
        teacher=ModelSpec("llama", d_model=96, layers=3, heads=4, kv_heads=4, mlp=288, steps=1000,
                          batch_size=64, lr=3e-3, context_fraction=0.0),
        student=ModelSpec("qwen2", d_model=48, layers=2, heads=4, kv_heads=2, mlp=144, steps=400,
                          batch_size=64, lr=1e-2, plain_carry_share=0.2),
    ),
}
# The default task, teacher and budget; the student is pre-trained 1000 steps with 3 of 4 rows
# carrying privileged context. Measured: greedy 2.3% plain but 100% with the worked solution,
# the answer or right-answer feedback in context, the in-context ability the self-teacher
# methods need (the default student gets 3.9% / 22% / 13% there, below its 14% plain).
PRESETS["selfdistill"] = dict(PRESETS["default"], student=dataclasses.replace(
    PRESETS["default"]["student"], steps=1000, context_fraction=0.75))
# The default task, teacher and budget with a student that vLLM's CPU attention runs (head_dim 32:
# d_model 64 in two heads; the default student's is 12): HF vs vLLM rollouts (--rollout-engine).
PRESETS["vllm"] = dict(PRESETS["default"], student=dataclasses.replace(
    PRESETS["default"]["student"], d_model=64, heads=2, kv_heads=1, mlp=192))
# The bundled benchmark of every method (`opd_train.compare --claims`; assets: `opd_train.bench_assets`).
# New skill: 3-digit addition. Prior skill: 3-digit subtraction, which the student learns as a plain
# skill in pre-training (prior_accuracy measures forgetting). The student sees additions mostly with
# privileged context (solution, demonstration, feedback, hint), so it is weak on plain additions but
# can use context. The external teacher is imperfect by construction (pre-trained on additions
# without carry chains, then a short GRPO run that keeps its base for reward correction); the
# domain experts for multi-teacher distillation are that teacher (+) and a subtraction teacher (-).
# Measured when chosen (AMD EPYC, 2 cores; seed 0): student 16.8% plain, 97-100% with each context kind, 100% on
# subtraction (with 5% carry rows among its plain additions instead of none it reached 97.7% plain:
# not weak; the 2-layer d 48/64 students learned neither subtraction nor context use in 1500-2000
# steps); teacher 64.1% after SFT, 74.2% after RL; subtraction expert 9.8% after 1000 steps, 100%
# after 2000.
_BENCH_TEACHER = dict(arch="llama", d_model=96, layers=3, heads=4, kv_heads=4, mlp=288, steps=1000, batch_size=64,
                      lr=3e-3, context_fraction=0.0)
PRESETS["bench"] = dict(
    digits=3, ops="+", prior_ops="-", steps=300, batch_size=64, lr=1e-3, eval_every=50, eval_size=256,
    save_every=100,
    teacher=ModelSpec(**_BENCH_TEACHER, ops="+", chain_free=True),
    teacher_rl=RLSpec(steps=100, lr=3e-4),
    experts={"+": "teacher", "-": ModelSpec(**dict(_BENCH_TEACHER, steps=2000), ops="-")},
    # a teacher stronger than GRPO's result on the student (the OPD-vs-RL claim's regime): the bench
    # teacher's architecture pre-trained 2000 steps on every addition, carry chains included (1000 steps
    # gave 68.0% here: docs/measurements/bench_strong_teacher.json)
    strong_teacher=ModelSpec(**dict(_BENCH_TEACHER, steps=2000), ops="+"),
    student=ModelSpec("qwen2", d_model=64, layers=3, heads=4, kv_heads=2, mlp=256, steps=2000, batch_size=64,
                      lr=5e-3, context_fraction=0.7, plain_carry_share=0.0, ops="+-", prior_ops="-",
                      context_kinds=ALL_CONTEXT_KINDS),
)
PRESET_KEYS = ("digits", "ops", "steps", "batch_size", "lr", "eval_every", "eval_size", "save_every")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" only where there is a fixed default (not for preset-filled options);
    the epilog keeps its line breaks."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.help is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Errors are one line, ``python -m opd_train: error: ...``, exit status 2 (as argparse's, no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _preset(key: str) -> str:
    return "preset: " + ", ".join(f"{name} {p[key]}" for name, p in sorted(PRESETS.items()))


def _methods_where(pred) -> str:
    return ", ".join(name for name, cls in METHODS.items() if pred(cls))


def _epilog() -> str:
    fill = lambda text: textwrap.fill(text, width=96)  # noqa: E731
    methods = "\n".join(f"  {name:8s} {cls.summary}" + (f" ({cls.paper})" if cls.paper else "")
                        for name, cls in METHODS.items())
    return "\n\n".join([
        "methods:\n" + methods,
        fill('bring your own data (--data, --eval-data): a JSONL file, one JSON object per line with string '
             'fields "prompt" and "answer" (--verifier: exact match by default) and '
             'optional "solution" (privileged context for opsd) and "feedback" (for sdpo), e.g.')
        + "\n  " + json.dumps(EXAMPLE_ROW),
        fill("bring your own models (--student, --teacher, --ref): a local Hugging Face causal LM directory "
             f"as save_pretrained() writes it: {inputs.MODEL_DIR_FILES}. The tokenizer needs a chat template "
             "(prompts are rendered as one user turn) and an EOS token; student and teacher must share one "
             "tokenizer."),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a student with one of the surveyed on-policy distillation methods. With no\n"
                    "arguments: OPD on the bundled arithmetic task (teacher and student are pre-trained\n"
                    "once and cached under $OPD_TRAIN_CACHE, default ~/.cache/opd_train). Method options\n"
                    "default to the values of the papers cited in their group titles.",
        epilog=_epilog(), formatter_class=_Formatter)
    g = p.add_argument_group("run")
    g.add_argument("--method", choices=METHODS, default="opd", help="training method (see 'methods:' below)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="fills options left unset: task, model sizes and budget (smoke: a quick end-to-end check)")
    g.add_argument("--out", default=None, help="output dir for metrics.jsonl, curves.png, ckpt/ (default runs/METHOD)")
    g.add_argument("--steps", type=pos_int, help=f"training steps ({_preset('steps')})")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train")
    g.add_argument("--seed", type=int, default=0, help="sampling/data seed (the cached models do not depend on it)")
    g.add_argument("--resume", action="store_true", help="continue exactly from OUT/ckpt")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student with FSDP2 (each decoder layer, then the model), DCP "
                        "checkpoints (export: python -m opd_train.export CKPT DIR); teachers are replicated")
    g.add_argument("--threads", type=pos_int, default=1,
                   help="torch CPU threads per process (tiny models gain little from more; 1 avoids oversubscription)")

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=pos_float, help=f"AdamW peak learning rate ({_preset('lr')})")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine decay to 0 at --steps (the SDFT/SDPO/OPSD "
                        "papers' recipes use warmup + cosine)")
    g.add_argument("--warmup-steps", type=nonneg_int, default=0, help="linear learning-rate warmup steps")
    g.add_argument("--batch-size", type=pos_int,
                   help=f"completions per step and process = prompts x samples-per-prompt ({_preset('batch_size')})")
    spp = ", ".join(f"{name} {cls.default_samples_per_prompt}" for name, cls in METHODS.items())
    g.add_argument("--samples-per-prompt", type=pos_int, help=f"samples per prompt (method default: {spp})")
    g.add_argument("--epochs-per-batch", type=pos_int, default=1,
                   help="optimizer updates per sampled batch (>1 makes importance ratios/clipping active)")
    g.add_argument("--temperature", type=pos_float, default=1.0, help="sampling temperature (gkd has its own)")
    g.add_argument("--grad-clip", type=pos_float, default=1.0, help="max gradient norm")
    g.add_argument("--micro-batch-size", type=pos_int,
                   help="completions per forward/backward; gradients accumulate to exactly the whole --batch-size "
                        "update (default: the whole batch at once)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward passes and sampling under bf16 autocast, fp32 master weights and optimizer "
                        "state; the fused losses accumulate in fp32")
    g.add_argument("--max-new-tokens", type=pos_int, help="generation length cap (bundled task: answer length + 2)")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=pos_int, help=f"steps between held-out evaluations ({_preset('eval_every')})")
    g.add_argument("--eval-size", type=pos_int, help=f"held-out prompts, greedy exact match ({_preset('eval_size')})")
    g.add_argument("--eval-split", choices=("test", "validation"), default="test",
                   help="bundled task: the held-out test set, or a disjoint validation set (lr selection)")
    g.add_argument("--save-every", type=pos_int, help=f"steps between checkpoints ({_preset('save_every')})")

    g = p.add_argument_group("bundled task (ignored with --data)")
    g.add_argument("--digits", type=pos_int, help=f"operand digits ({_preset('digits')})")
    g.add_argument("--ops", choices=("+", "-", "+-"), help=f"operations ({_preset('ops')})")
    g.add_argument("--prior-ops", choices=("+", "-"),
                   help="also evaluate held-out problems of this operation as prior_accuracy, a skill the "
                        "student had before training (forgetting; preset: bench -)")

    g = p.add_argument_group("bring your own models and data (formats: see the end of this help)")
    g.add_argument("--student", help="HF causal LM dir to train (default: the cached bundled student)")
    external = _methods_where(lambda c: c.teacher == "external")
    g.add_argument("--teacher", help=f"HF causal LM dir of the teacher ({external}; default: bundled teacher)")
    g.add_argument("--ref", help="gopd reference model dir (default: the student at initialisation)")
    g.add_argument("--domain-teacher", action="append", type=domain_dir, metavar="DOMAIN=DIR",
                   help="gopd multi-teacher: the teacher of one domain (repeat per domain; the bundled "
                        "task's domains are its operations, e.g. --domain-teacher +=DIR --domain-teacher -=DIR)")
    g.add_argument("--data", help="JSONL with fields prompt, answer and optional solution, feedback")
    g.add_argument("--eval-data", help="held-out JSONL (default: the last eval-size rows of --data)")
    g.add_argument("--verifier", default="exact", metavar="exact|number|MODULE:FUNCTION",
                   help="--data rewards: exact match; number: the completion's last number equals the answer's "
                        "(after '####' in GSM8K answers); or your fn(prompt, completion, answer) -> reward in "
                        "[0, 1] or (reward, feedback text)")
    g.add_argument("--vocab-size", type=pos_int,
                   help="use the first N vocabulary entries of student and teacher (padded vocabularies)")

    server_teacher.add_options(p)
    vllm_engine.add_options(p)
    for name, cls in METHODS.items():
        if cls.add_options is not Method.add_options:
            cls.add_options(p.add_argument_group(f"{name} ({cls.paper})" if cls.paper else name))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse, fill in the preset, and check every option and input path before anything runs."""
    p = build_parser()
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in PRESET_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.prior_ops is None:
        args.prior_ops = preset.get("prior_ops")
    args.teacher_spec, args.student_spec = preset["teacher"], preset["student"]
    if args.domain_teacher:
        if args.method != "gopd":
            p.error(f"--domain-teacher is only used by --method gopd, not {args.method}")
        if args.teacher:
            p.error("--domain-teacher replaces --teacher; give one or the other")
        domains = [d for d, _ in args.domain_teacher]
        if len(set(domains)) != len(domains):
            p.error(f"--domain-teacher: domain {next(d for d in domains if domains.count(d) > 1)!r} given twice")
        try:
            for _, path in args.domain_teacher:
                inputs.check_model_dir("--domain-teacher", path, needs_tokenizer=True)
        except inputs.InputError as e:
            p.error(str(e))
        args.domain_teacher = dict(args.domain_teacher)
    if args.out is None:
        args.out = os.path.join("runs", args.method)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    method = METHODS[args.method]
    spp = args.samples_per_prompt or method.default_samples_per_prompt
    if args.batch_size % spp:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the samples per prompt ({spp} for "
                f"{args.method}); set --samples-per-prompt or --batch-size")
    if args.teacher and method.teacher == "self":
        p.error(f"--teacher: {args.method} uses the student itself as teacher")
    if args.teacher and method.teacher is None:
        p.error(f"--teacher: {args.method} uses no teacher")
    server_teacher.check_args(args, p.error)
    vllm_engine.check_args(args, method, p.error)
    if args.ref and args.method != "gopd":
        p.error("--ref is only used by --method gopd")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        p.error("--fsdp runs under torchrun (e.g. torchrun --nproc_per_node 2 -m opd_train --fsdp ...)")
    if args.eval_data and not args.data:
        p.error("--eval-data needs --data")
    if args.verifier != "exact" and not args.data:
        p.error(f"--verifier {args.verifier} needs --data (the bundled task checks its answers exactly)")
    try:
        verifiers.resolve(args.verifier)
    except inputs.InputError as e:
        p.error(str(e))
    try:
        for flag in ("--data", "--eval-data"):
            inputs.check_file(flag, getattr(args, flag[2:].replace("-", "_")))
        for flag, needs_tokenizer in (("--student", True), ("--teacher", True), ("--ref", False)):
            inputs.check_model_dir(flag, getattr(args, flag[2:]), needs_tokenizer=needs_tokenizer)
    except inputs.InputError as e:
        p.error(str(e))
    if args.data and not args.student:
        p.error("--data needs --student DIR: the bundled models only know the bundled task")
    if args.data and method.teacher == "external" and not (args.teacher or args.domain_teacher or args.teacher_server):
        p.error(f"--data with --method {args.method} needs --teacher DIR: the bundled teacher only knows the "
                "bundled task")
    return args
