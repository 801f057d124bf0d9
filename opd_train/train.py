"""The training loop every method shares: rollout -> method loss -> update.

    for step in 1..steps:
        examples = task.sample(...)             # prompts (per process, own RNG stream)
        batch = method.prepare(examples)        # student samples, teacher passes (no grad)
        loss = method.loss(batch)               # fused-op loss on the student's hidden states
        loss.backward(); clip; optimizer.step(); method.after_step()
        log a metrics row; every eval_every steps: held-out greedy exact match; checkpoint

Outputs in ``--out``: ``metrics.jsonl`` (training rows ``step, loss, reward, tokens_per_s, ...``
and eval rows ``step, eval_accuracy``), ``curves.png``, ``args.json`` and ``ckpt/`` (HF
``save_pretrained`` model + tokenizer, ``state.pt`` with optimizer and method state such as EMA
teachers, one ``rng-RANK.pt`` per process), written to ``ckpt.tmp`` and swapped in atomically.
``--resume`` restores all of it, drops metric rows written after the checkpoint and continues
exactly. Under ``torchrun`` the student is wrapped in DDP (gloo on CPU, nccl on GPU); rank 0
writes metrics and checkpoints.

A non-finite loss or gradient stops the run (exit status 2) naming the step and method, leaving
the last good checkpoint in place. Test hooks (environment): ``OPD_TRAIN_TEST_NAN_STEP=k``
makes step k's loss NaN; ``OPD_TRAIN_TEST_CRASH_STEP=k`` hard-exits (like ``kill -9``) after
step k is logged.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
import transformers

from . import cli
from . import rollout as R
from .data import JsonlTask
from .methods import Method, get
from .models import get_pretrained, load
from .task import ArithmeticTask
from .tokenizer import load_tokenizer

PRETRAIN_SEED = 0  # the cached teacher/student do not depend on --seed
RESUME_MAY_DIFFER = {"resume", "steps", "threads", "out"}


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Trainer:
    """What methods see: models, tokenizer, task, options and the data RNG."""
    args: object
    task: object
    tok: object
    student: R.LM               # the trained model, seen as (hidden states, lm_head weight)
    student_fwd: torch.nn.Module  # student or its DDP wrapper: call it for hidden states with grad
    teacher: R.LM | None
    student_path: str           # the student's initial weights (OPSD teacher, G-OPD reference)
    device: torch.device
    rng: random.Random          # per-process data stream (checkpointed)
    max_new_tokens: int
    vocab_size: int | None
    rank: int = 0
    world: int = 1


# -- setup --------------------------------------------------------------------------------------
def init_distributed(args) -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    if args.device == "cuda":
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def make_task(args):
    if args.data:
        return JsonlTask(args.data, args.eval_data, args.eval_size)
    return ArithmeticTask(args.digits, args.ops, eval_size=args.eval_size)


def model_paths(args, task, method_cls, rank: int, world: int, log) -> tuple[str, str | None]:
    """Student and teacher dirs; the bundled ones are pre-trained once (by rank 0) and cached."""
    if args.data and not args.student:
        raise SystemExit("--data needs --student (and --teacher for gkd/opd/gopd): the bundled models "
                         "only know the bundled task")
    need_teacher = method_cls.external_teacher

    def resolve():
        preset = cli.PRESETS[args.preset]
        s = args.student or str(get_pretrained("student", preset["student"], task, PRETRAIN_SEED, log))
        t = None
        if need_teacher:
            t = args.teacher or str(get_pretrained("teacher", preset["teacher"], task, PRETRAIN_SEED, log))
        return s, t

    if rank == 0:
        paths = resolve()
    barrier(world)
    if rank != 0:
        paths = resolve()  # cached by now
    return paths


def check_compatible(tok_s, tok_t, student, teacher, vocab_size: int | None, s_path, t_path) -> int | None:
    """Refuse mismatched tokenizers; allow padded vocabularies only via --vocab-size."""
    if tok_s.get_vocab() != tok_t.get_vocab():
        raise SystemExit(f"tokenizer mismatch: the student ({s_path}, {len(tok_s)} tokens) and teacher "
                         f"({t_path}, {len(tok_t)} tokens) tokenizers differ; on-policy distillation "
                         "needs one shared tokenizer")
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if vocab_size is not None:
        if vocab_size > min(v_s, v_t) or vocab_size < len(tok_s):
            raise SystemExit(f"--vocab-size {vocab_size}: must be >= the tokenizer's {len(tok_s)} tokens and "
                             f"<= both lm_head sizes (student {v_s}, teacher {v_t})")
        return vocab_size
    if v_s != v_t:
        raise SystemExit(f"vocabulary size mismatch: student lm_head has {v_s} rows, teacher {v_t}; "
                         f"pass --vocab-size N (e.g. {len(tok_s)}) to use the first N entries of both")
    return None


# -- metrics, plots, checkpoints ----------------------------------------------------------------
class Metrics:
    """Append-only JSONL; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled, self.rows = path, enabled, []
        if enabled and keep_until is not None and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= keep_until]
        if enabled:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in evals], [100 * r["eval_accuracy"] for r in evals], "o-")
    a.set(xlabel="step", ylabel="held-out exact match (%)", title="accuracy", ylim=(-2, 102))
    b.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    b.set(xlabel="step", ylabel="loss", title="training loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rng_state(tr: Trainer) -> dict:
    st = {"torch": torch.get_rng_state(), "data": tr.rng.getstate()}
    if tr.device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(tr.device)
    return st


def check_in_sync(tr: Trainer) -> None:
    """Data-parallel sanity check: every process must hold the same student weights."""
    total = torch.stack([p.detach().double().sum() for p in tr.student.model.parameters()]).sum().view(1)
    everyone = [torch.zeros_like(total) for _ in range(tr.world)]
    dist.all_gather(everyone, total)
    if any(not torch.equal(everyone[0], x) for x in everyone):
        raise RuntimeError(f"data-parallel processes diverged: weight sums {[x.item() for x in everyone]}")


def save_checkpoint(tr: Trainer, out: Path, opt, method: Method, progress: dict) -> None:
    final, tmp, old = out / "ckpt", out / "ckpt.tmp", out / "ckpt.old"
    if tr.world > 1:
        check_in_sync(tr)
    if tr.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(tr.world)
    torch.save(_rng_state(tr), tmp / f"rng-{tr.rank}.pt")
    if tr.rank == 0:
        tr.student.model.save_pretrained(tmp / "model")
        tr.tok.save_pretrained(tmp / "model")
        torch.save({"progress": progress, "optimizer": opt.state_dict(), "method": method.state_dict(),
                    "world": tr.world, "args": vars(tr.args)}, tmp / "state.pt")
    barrier(tr.world)
    if tr.rank == 0:  # swap: ckpt -> ckpt.old, ckpt.tmp -> ckpt, drop ckpt.old
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(tr.world)


def find_checkpoint(out: Path) -> Path | None:
    for d in (out / "ckpt", out / "ckpt.old"):  # ckpt.old only survives a crash mid-swap
        if (d / "state.pt").exists():
            return d
    return None


def check_resume_args(saved: dict, args) -> None:
    diff = {k: (v, getattr(args, k, None)) for k, v in saved.items()
            if k not in RESUME_MAY_DIFFER and getattr(args, k, None) != v}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise SystemExit(f"--resume: options differ from the checkpointed run ({lines})")


# -- the loop -----------------------------------------------------------------------------------
def run(args) -> dict:
    rank, world, device = init_distributed(args)
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()  # no "Loading weights" bars around ours
    log = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 else (lambda *a: None)
    out = Path(args.out)
    ckpt = find_checkpoint(out) if args.resume else None
    if args.resume and ckpt is None:
        raise SystemExit(f"--resume: no checkpoint in {out}/ckpt")
    if not args.resume and rank == 0 and find_checkpoint(out):
        log(f"note: starting over in {out} (an older checkpoint there is replaced; use --resume to continue it)")
        for d in ("ckpt", "ckpt.old", "ckpt.tmp"):
            shutil.rmtree(out / d, ignore_errors=True)

    task = make_task(args)
    method_cls = get(args.method)
    student_path, teacher_path = model_paths(args, task, method_cls, rank, world, log)
    torch.manual_seed(args.seed + rank)
    tok = load_tokenizer(student_path)
    student = load(ckpt / "model" if ckpt else student_path, device)
    teacher, vocab_size = None, args.vocab_size
    if teacher_path:
        teacher = load(teacher_path, device).eval().requires_grad_(False)
        vocab_size = check_compatible(tok, load_tokenizer(teacher_path), student, teacher,
                                      args.vocab_size, student_path, teacher_path)
    lm = R.LM(student, vocab_size).train()
    fwd = lm
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[device.index] if device.type == "cuda" else None)
    tr = Trainer(args, task, tok, lm, fwd, R.LM(teacher, vocab_size) if teacher is not None else None,
                 str(student_path), device, random.Random(f"{args.seed}-{rank}"),
                 args.max_new_tokens or task.max_answer_chars + 2, vocab_size, rank, world)
    method = method_cls(tr)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    progress = {"step": 0, "samples": 0, "train_seconds": 0.0}
    if ckpt:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        check_resume_args(state["args"], args)
        if state["world"] != world:
            raise SystemExit(f"--resume: the checkpoint was written by {state['world']} processes, now {world}")
        opt.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        progress = state["progress"]
        rng = torch.load(ckpt / f"rng-{rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        tr.rng.setstate(rng["data"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        log(f"resumed from {ckpt} at step {progress['step']}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), default=str, indent=1))
    metrics = Metrics(out / "metrics.jsonl", rank == 0, progress["step"] if ckpt else None)

    def evaluate(step: int) -> float:
        acc = 0.0
        if rank == 0:
            acc = R.evaluate(student, tok, task, task.eval_examples(), max_new_tokens=tr.max_new_tokens)
            metrics.log({"step": step, "eval_accuracy": acc, "samples": progress["samples"]})
        barrier(world)
        return acc

    if progress["step"] == 0:
        evaluate(0)
    prompts_per_step = args.batch_size // method.samples_per_prompt
    nan_step = int(os.environ.get("OPD_TRAIN_TEST_NAN_STEP", "0"))
    crash_step = int(os.environ.get("OPD_TRAIN_TEST_CRASH_STEP", "0"))
    bar = tqdm(total=args.steps, initial=progress["step"], desc=args.method, disable=rank != 0,
               dynamic_ncols=True)
    for step in range(progress["step"] + 1, args.steps + 1):
        t0 = time.perf_counter()
        batch = method.prepare(task.sample(tr.rng, prompts_per_step))
        for _ in range(args.epochs_per_batch):
            loss, extra = method.loss(batch)
            if step == nan_step:
                loss = loss * float("nan")
            opt.zero_grad(set_to_none=True)
            finite = torch.isfinite(loss.detach()).float()
            if finite.item():
                loss.backward()
                finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                last = find_checkpoint(out)
                where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (method {args.method}, "
                                    f"loss {loss.item()}); stopping, {where}")
            opt.step()
            method.after_step()
        dt = time.perf_counter() - t0
        seqs = batch["seqs"]
        stats = torch.tensor([loss.item(), batch["rewards"].mean().item() if "rewards" in batch else 0.0,
                              float(seqs.attention_mask.sum())], device=device)
        if world > 1:
            dist.all_reduce(stats)
            stats[:2] /= world
        progress["samples"] += seqs.completion.shape[0] * world
        progress["train_seconds"] += dt
        row = {"step": step, "loss": stats[0].item()}
        if "rewards" in batch:
            row["reward"] = stats[1].item()
        row.update(tokens_per_s=stats[2].item() / dt, samples=progress["samples"],
                   time_s=progress["train_seconds"], **extra)
        metrics.log(row)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("loss", "reward")}, refresh=False)
        if step == crash_step:
            os._exit(3)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            bar.set_postfix_str(f"loss={row['loss']:.3f} eval={100 * acc:.1f}%", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            progress["step"] = step
            save_checkpoint(tr, out, opt, method, progress)
    bar.close()

    summary = {}
    if rank == 0:
        evals = [r for r in metrics.rows if "eval_accuracy" in r]
        before, after = evals[0], evals[-1]
        plot_curves(metrics.rows, out / "curves.png", f"{args.method} ({args.preset} preset)")
        gain = 100 * (after["eval_accuracy"] - before["eval_accuracy"])
        log(f"held-out exact match ({len(task.eval_examples())} prompts, greedy): "
            f"before {100 * before['eval_accuracy']:.1f}% -> after {100 * after['eval_accuracy']:.1f}% "
            f"({gain:+.1f} points) after {after['step']} steps, {progress['train_seconds']:.0f}s of training; "
            f"outputs in {out}")
        summary = {"before": before["eval_accuracy"], "after": after["eval_accuracy"],
                   "train_seconds": progress["train_seconds"], "out": str(out)}
    if world > 1:
        dist.destroy_process_group()
    return summary


def main(argv=None) -> int:
    args = cli.parse_args(argv)
    try:
        run(args)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
