"""Setup of a run: the task, the models and tokenizer, checked, wrapped into a `Trainer`.

`Trainer` is what methods see. `build` resolves the student and teacher directories (the
bundled ones are pre-trained once, by rank 0, and cached: `opd_train.models`), loads them with
the student's tokenizer, checks that student and teacher share one tokenizer and vocabulary, and
wraps the student for data parallel. User inputs that turn out unusable while loading raise
`opd_train.inputs.InputError`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cli, distributed, fsdp, inputs, verifiers
from . import rollout as R
from .data import JsonlTask
from .inputs import InputError
from .methods import METHODS
from .bench_assets import bundled_teacher
from .models import PRETRAIN_SEED, get_pretrained
from .server_teacher import ServerTeacher
from .vllm_engine import VLLMEngine
from .task import ArithmeticTask


COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # --dtype -> autocast dtype (None: off)


@dataclass
class Trainer:
    """What methods see: models, tokenizer, task, options and the data RNG."""
    args: object
    task: object
    tok: object
    student: R.LM               # the trained model, seen as (hidden states, real head: `opd_train.lm`)
    student_fwd: torch.nn.Module  # student or its DDP wrapper: call it for hidden states with grad
    teacher: R.LM | None
    student_path: str           # the student's initial weights (OPSD teacher, G-OPD reference)
    device: torch.device
    rng: random.Random          # per-process data stream (checkpointed)
    max_new_tokens: int
    vocab_size: int | None
    rank: int = 0
    world: int = 1
    teacher_path: str | None = None  # the external teacher's directory (G-OPD finds its base there)
    domain_teachers: dict | None = None  # domain -> R.LM (--domain-teacher), else None
    teacher_server: ServerTeacher | None = None  # --teacher-server (then teacher is None)
    rollout_engine: VLLMEngine | None = None  # --rollout-engine vllm (else HF generate samples)


def make_task(args):
    if args.data:
        if getattr(args, "eval_split", "test") != "test":
            raise InputError("--eval-split validation: only the bundled task has a validation split")
        return JsonlTask(args.data, args.eval_data, args.eval_size, verifiers.resolve(args.verifier))
    return ArithmeticTask(args.digits, args.ops, eval_size=args.eval_size, split=getattr(args, "eval_split", "test"))


def make_prior_task(args):
    """The prior-skill evaluation (``--prior-ops``): held-out problems of those operations, or None."""
    if args.data or not getattr(args, "prior_ops", None):
        return None
    return ArithmeticTask(args.digits, args.prior_ops, eval_size=args.eval_size,
                          split=getattr(args, "eval_split", "test"))


def model_paths(args, task, rank: int, world: int, log) -> tuple[str, str | None]:
    """Student and teacher dirs; the bundled ones are pre-trained once (by rank 0) and cached.

    (`cli.parse_args` has made sure that ``--data`` comes with ``--student`` and, for methods
    with an external teacher, ``--teacher``: the bundled models only know the bundled task.)
    """
    need_teacher = (METHODS[args.method].teacher == "external" and not args.domain_teacher
                    and not getattr(args, "teacher_server", None))

    def resolve():
        preset = cli.PRESETS[args.preset]
        s = args.student or str(get_pretrained("student", preset["student"], task, PRETRAIN_SEED, log))
        t = None
        if need_teacher:
            t = args.teacher or str(bundled_teacher(preset, task, log))
        return s, t

    if rank == 0:
        paths = resolve()
    distributed.barrier(world)
    if rank != 0:
        paths = resolve()  # cached by now
    return paths


def check_compatible(tok_s, tok_t, student, teacher, vocab_size: int | None, s_path, t_path) -> int | None:
    """Refuse mismatched tokenizers; allow padded vocabularies only via --vocab-size (``teacher`` may be None)."""
    if teacher is not None and tok_s.get_vocab() != tok_t.get_vocab():
        raise InputError(f"tokenizer mismatch: the student ({s_path}, {len(tok_s)} tokens) and teacher "
                         f"({t_path}, {len(tok_t)} tokens) tokenizers differ; on-policy distillation "
                         "needs one shared tokenizer")
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = v_s if teacher is None else teacher.get_output_embeddings().weight.shape[0]
    if vocab_size is not None:
        if vocab_size > min(v_s, v_t) or vocab_size < len(tok_s):
            sizes = f"student {v_s}" + ("" if teacher is None else f", teacher {v_t}")
            raise InputError(f"--vocab-size {vocab_size}: must be >= the tokenizer's {len(tok_s)} tokens and "
                             f"<= the lm_head sizes ({sizes})")
        return vocab_size
    if v_s != v_t:
        raise InputError(f"vocabulary size mismatch: student lm_head has {v_s} rows, teacher {v_t}; "
                         f"pass --vocab-size N (e.g. {len(tok_s)}) to use the first N entries of both")
    return None


def build(args, task, ckpt: Path | None, rank: int, world: int, device: torch.device, log) -> Trainer:
    """Load (or pre-train) the models and wrap them; the student comes from ``ckpt`` when resuming."""
    student_path, teacher_path = model_paths(args, task, rank, world, log)
    torch.manual_seed(args.seed + rank)
    tok = inputs.load_tokenizer("--student", student_path, log)
    # a resumed student's weights: ckpt/model, or (--fsdp) the DCP shards that `checkpoint.restore` loads
    weights = ckpt / "model" if ckpt and inputs.has_weights(ckpt / "model") else student_path
    student = inputs.load_model("--student", weights, device)
    teacher = tok_t = None
    if teacher_path:
        teacher = inputs.load_model("--teacher", teacher_path, device).eval().requires_grad_(False)
        tok_t = inputs.load_tokenizer("--teacher", teacher_path, log)
    vocab_size = check_compatible(tok, tok_t, student, teacher, args.vocab_size, student_path, teacher_path)
    dtype = COMPUTE_DTYPES[getattr(args, "dtype", "fp32")]  # the parameters stay fp32 (master weights)
    domain_teachers = None
    if args.domain_teacher:
        domain_teachers = {}
        for domain, path in args.domain_teacher.items():
            model = inputs.load_model("--domain-teacher", path, device).eval().requires_grad_(False)
            check_compatible(tok, inputs.load_tokenizer("--domain-teacher", path, log), student, model,
                             vocab_size, student_path, path)
            domain_teachers[domain] = inputs.view("--domain-teacher", path, model, vocab_size, dtype)
    server = None
    if getattr(args, "teacher_server", None):
        rows = vocab_size or student.get_output_embeddings().weight.shape[0]
        server = ServerTeacher.connect(args, tok, rows, log)
    lm = inputs.view("--student", student_path, student, vocab_size, dtype).train()
    teacher_lm = None if teacher is None else inputs.view("--teacher", teacher_path, teacher, vocab_size, dtype)
    fwd = lm
    if getattr(args, "fsdp", False):  # FSDP2: the student's parameters sharded in place (opd_train.fsdp)
        fsdp.shard(student, dtype)
        lm.sharded = True
    elif world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[device.index] if device.type == "cuda" else None)
    engine = None
    if getattr(args, "rollout_engine", "hf") == "vllm":  # after sharding: it is loaded from the (gathered) student
        engine = VLLMEngine.start(student_path, student, tok, vocab_size=vocab_size, device=device, seed=args.seed + rank,
                                  dtype="float32" if dtype is None else "bfloat16",
                                  gpu_memory_utilization=args.vllm_gpu_memory_utilization, log=log)
    return Trainer(args, task, tok, lm, fwd, teacher_lm,
                   str(student_path), device, random.Random(f"{args.seed}-{rank}"),
                   args.max_new_tokens or task.max_answer_chars + 2, vocab_size, rank, world,
                   str(teacher_path) if teacher_path else None, domain_teachers, server, engine)
