"""``python -m opd_train``: setup -> the training loop every method shares -> summary.

    for step in 1..steps:
        examples = task.sample(...)             # prompts (per process, own RNG stream)
        batch = method.prepare(examples)        # student samples, teacher passes (no grad)
        for micro in micro_batches(batch):      # --micro-batch-size: gradient accumulation (opd_train.step)
            method.loss(micro).backward()       # fused-op loss on the student's hidden states
        clip; optimizer.step(); method.after_step()
        log a metrics row; every eval_every steps: held-out greedy exact match; checkpoint

Setup is `opd_train.trainer.build` (task, models, tokenizer, checks); outputs in ``--out`` are
``metrics.jsonl`` (every row with the run's budgets so far: `opd_train.budget`) and ``curves.png`` (`opd_train.metrics`), ``args.json`` and ``ckpt/``
(`opd_train.checkpoint`: atomic; ``--resume`` restores everything, drops metric rows written
after the checkpoint and continues exactly). Under ``torchrun`` the student is wrapped in DDP
(gloo on CPU, nccl on GPU; `opd_train.distributed`); rank 0 writes metrics and checkpoints.
Bad inputs (`opd_train.inputs.InputError`) end the run before training with one
``python -m opd_train: error: ...`` line, exit status 2.

A non-finite loss or gradient stops the run (exit status 2) naming the step and method, leaving
the last good checkpoint in place. Test hooks (environment): ``OPD_TRAIN_TEST_NAN_STEP=k``
makes step k's loss NaN; ``OPD_TRAIN_TEST_CRASH_STEP=k`` hard-exits (like ``kill -9``) after
step k is logged.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from tqdm.auto import tqdm

from . import checkpoint, cli, distributed, trainer
from .budget import Budget
from .methods.base import n_params
from .step import NonFiniteLoss, accumulate, micro_batches, optimizer_step
from . import rollout as R
from .inputs import InputError
from .lm import autocast
from .methods import METHODS
from .metrics import Metrics, summarize


def run(args) -> dict:
    # -- setup: processes, task, models, method, optimizer, resumed state, metrics -----------------
    rank, world, device = distributed.init(args.device, always=args.fsdp)
    own_group = dist.is_initialized()  # ours to destroy at the end (a vLLM engine may start one of its own)
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()  # no "Loading weights" bars around ours
    log = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 else (lambda *a: None)
    out = Path(args.out)
    ckpt = checkpoint.to_resume(out, args.resume)
    task = trainer.make_task(args)
    tr = trainer.build(args, task, ckpt, rank, world, device, log)
    method = METHODS[args.method](tr)
    opt = torch.optim.AdamW(tr.student.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    progress = {"step": 0, "samples": 0, "train_seconds": 0.0}
    if ckpt:
        progress = checkpoint.restore(ckpt, tr, opt, method, log)
        if tr.rollout_engine is not None:  # DCP shards are restored after the engine started
            tr.rollout_engine.load_weights(tr.student.model)
    else:
        checkpoint.clear_old(out, rank, log)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), default=str, indent=1))
    metrics = Metrics(out / "metrics.jsonl", rank == 0, progress["step"] if ckpt else None)
    budget = Budget(progress, n_params(tr.student.model))

    prior_task = trainer.make_prior_task(args)

    def evaluate(step: int) -> float:
        acc, sharded = 0.0, tr.student.sharded
        if rank == 0 or sharded:  # a sharded student's forward is a collective: every process decodes
            exs = task.eval_examples()
            with autocast(device, tr.student.compute_dtype):  # greedy decoding in the training precision
                scores = R.evaluate_each(tr.student.model, tr.tok, task, exs, max_new_tokens=tr.max_new_tokens,
                                         vocab_size=tr.vocab_size, synced=sharded)
                prior = None if prior_task is None else R.evaluate(
                    tr.student.model, tr.tok, prior_task, prior_task.eval_examples(), vocab_size=tr.vocab_size,
                    synced=sharded)
        if rank == 0:
            acc = sum(scores) / max(1, len(scores))
            row = {"step": step, "eval_accuracy": acc, "eval_size": len(exs), "samples": progress["samples"],
                   "completion_tokens": progress.get("completion_tokens", 0), "time_s": progress["train_seconds"],
                   **budget.row()}
            domains = {}
            for ex, score in zip(exs, scores):
                domains.setdefault(task.domain(ex), []).append(score)
            if len(domains) > 1:  # e.g. "+" and "-": the multi-teacher claim compares per domain
                row["eval_accuracy_by_domain"] = {d: sum(v) / len(v) for d, v in sorted(domains.items())}
            if prior is not None:  # the prior skill (--prior-ops): forgetting
                row["prior_accuracy"] = prior
            row.update(method.eval_metrics())  # e.g. the self-teacher's accuracy with its context
            metrics.log(row)
        distributed.barrier(world)
        return acc

    # -- the loop: sample -> method batch -> loss -> update; log, evaluate, checkpoint -------------
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
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        micros = micro_batches(method, batch, args.micro_batch_size)
        for _ in range(args.epochs_per_batch):
            opt.zero_grad(set_to_none=True)
            loss, extra = accumulate(tr, method, micros, poison=step == nan_step)
            optimizer_step(tr, opt, loss, step, out)
            method.after_step()
        if tr.rollout_engine is not None:  # the next rollout samples from the updated student
            tr.rollout_engine.load_weights(tr.student.model)
        dt = time.perf_counter() - t0
        row = train_row(tr, step, loss, batch, dt, progress, budget, prompts_per_step, args.epochs_per_batch)
        row["lr"] = opt.param_groups[0]["lr"]
        row.update(extra)
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
            checkpoint.save(tr, out, opt, method, progress)
    bar.close()

    # -- summary: curves.png and the before -> after line (rank 0) -------------------------------
    summary = {}
    if rank == 0:
        summary = summarize(metrics, out, f"{args.method} ({args.preset} preset)", len(task.eval_examples()),
                            progress["train_seconds"], log)
    if tr.rollout_engine is not None:
        tr.rollout_engine.close()
    if own_group and dist.is_initialized():
        # DDP's reducer holds the process group: freed later, after a peer has exited, gloo's
        # destructor can wait on it forever. Every process releases it here, together, first.
        distributed.barrier(world)
        tr.student_fwd = None
        gc.collect()
        dist.destroy_process_group()
    return summary


def lr_at(args, step: int) -> float:
    """The learning rate of (1-based) ``step``: linear warmup over ``--warmup-steps``, then constant
    or cosine decay to 0 at the end of ``--steps`` (``--lr-schedule``). Computed from the step alone,
    so a resumed run continues the same schedule (given the same ``--steps``)."""
    warmup = args.warmup_steps
    factor = min(1.0, step / warmup) if warmup else 1.0
    if args.lr_schedule == "cosine" and step > warmup:
        done = (step - warmup) / max(1, args.steps - warmup + 1)  # < 1: the last step still moves
        factor = 0.5 * (1.0 + math.cos(math.pi * done))
    return args.lr * factor


def train_row(tr: trainer.Trainer, step: int, loss: torch.Tensor, batch, dt: float, progress: dict,
              budget: Budget, prompts: int, updates: int) -> dict:
    """The step's metrics row (loss and reward averaged over processes, tokens/s summed, the budgets
    so far); advances ``progress``."""
    seqs = batch.seqs
    stats = torch.tensor([loss.item(), batch.rewards.mean().item() if batch.rewards is not None else 0.0,
                          float(seqs.attention_mask.sum()), float(seqs.mask.sum()), *Budget.local(batch)],
                         device=tr.device, dtype=torch.float64)
    if tr.world > 1:
        dist.all_reduce(stats)
        stats[:2] /= tr.world
    budget.add(stats[4:].tolist(), prompts * tr.world, updates)
    progress["samples"] += seqs.completion.shape[0] * tr.world
    progress["completion_tokens"] = progress.get("completion_tokens", 0) + int(stats[3].item())
    progress["train_seconds"] += dt
    row = {"step": step, "loss": stats[0].item()}
    if batch.rewards is not None:
        row["reward"] = stats[1].item()
    row.update(tokens_per_s=stats[2].item() / dt, samples=progress["samples"],
               completion_tokens=progress["completion_tokens"], time_s=progress["train_seconds"], **budget.row())
    return row


def main(argv=None) -> int:
    args = cli.parse_args(argv)
    try:
        run(args)
    except (InputError, NonFiniteLoss) as e:
        print(f"{cli.PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0
