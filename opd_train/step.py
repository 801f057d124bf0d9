"""One optimizer update on a prepared batch: micro-batches, gradient accumulation, clip, step.

A method's loss is a sum over the batch divided by a whole-batch count (mostly its completion
tokens; `opd_train.methods.Method.normalizers`). With ``--micro-batch-size m`` the prepared batch
is cut into micro-batches of ``m`` completions that keep the whole batch's counts, so their losses
add up to the whole batch's loss and their accumulated gradients to its gradient: the update is
the one a single big batch gives, with only ``m`` completions' activations alive at a time.
Sampling and the teachers' passes (``Method.prepare``, no gradient) still see the whole batch.
Under DDP (FSDP) the gradients are all-reduced (reduce-scattered) once, after the last micro-batch.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint


class NonFiniteLoss(RuntimeError):
    pass


def micro_batches(method, batch, size: int | None) -> list:
    """``batch`` (with its whole-batch counts as ``batch.norm``) cut into pieces of ``size`` rows."""
    batch.norm = method.normalizers(batch)
    n = batch.seqs.completion.shape[0]
    if size is None or size >= n:
        return [batch]
    return [method.split(batch, slice(i, min(i + size, n))) for i in range(0, n, size)]


def accumulate(tr, method, micros: list, poison: bool = False) -> tuple[torch.Tensor, dict]:
    """Forward and backward of every micro-batch into the (zeroed) gradients; returns the whole batch's
    loss (detached) and the methods' extra numbers, averaged over micro-batches by their tokens.

    A non-finite micro-batch loss is not back-propagated (`optimizer_step` then stops the run).
    ``poison`` makes the loss NaN (the ``OPD_TRAIN_TEST_NAN_STEP`` test hook).
    """
    total, extras = None, {}
    tokens = sum(float(mb.seqs.mask.sum()) for mb in micros)
    for i, mb in enumerate(micros):
        last = i == len(micros) - 1
        sync = tr.student_fwd.no_sync() if not last and hasattr(tr.student_fwd, "no_sync") else nullcontext()
        if tr.student.sharded:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
            tr.student.model.set_requires_gradient_sync(last)
        with sync:
            loss, extra = method.loss(mb)
            if poison:
                loss = loss * float("nan")
            if torch.isfinite(loss.detach()).item():
                loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
        share = float(mb.seqs.mask.sum()) / tokens if tokens else 1.0 / len(micros)
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + share * v
    return total, extras


def optimizer_step(tr, opt, loss: torch.Tensor, step: int, out: Path) -> None:
    """Clip and step on the accumulated gradients; a non-finite loss or gradient on any process stops
    the run (`NonFiniteLoss`), leaving the last good checkpoint in place."""
    finite = torch.isfinite(loss).float()
    if finite.item():
        norm = torch.nn.utils.clip_grad_norm_(tr.student.model.parameters(), tr.args.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        finite = torch.isfinite(norm).float()
    if tr.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        last = checkpoint.find(out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (method {tr.args.method}, "
                            f"loss {loss.item()}); stopping, {where}")
    opt.step()
