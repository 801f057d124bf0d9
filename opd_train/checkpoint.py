"""Atomic, resumable checkpoints in ``OUT/ckpt``.

A checkpoint holds the student (HF ``save_pretrained`` model + tokenizer in ``model/``; with
``--fsdp`` only its config + tokenizer there and the model and optimizer shards as DCP in ``dcp/``,
see `opd_train.fsdp`),
``state.pt`` (progress, optimizer, method state such as EMA teachers, world size, options) and
one ``rng-RANK.pt`` per process (torch, CUDA and data RNG states). It is written to
``ckpt.tmp`` and swapped in (``ckpt`` -> ``ckpt.old``, ``ckpt.tmp`` -> ``ckpt``), so a crash at
any moment leaves a complete checkpoint. `restore` puts all of it back, so a resumed run
continues exactly.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import distributed, fsdp
from .inputs import InputError

RESUME_MAY_DIFFER = {"resume", "steps", "threads", "out", "micro_batch_size"}  # (the same updates)


def find(out: Path) -> Path | None:
    for d in (out / "ckpt", out / "ckpt.old"):  # ckpt.old only survives a crash mid-swap
        if (d / "state.pt").exists():
            return d
    return None


def to_resume(out: Path, resume: bool) -> Path | None:
    """The checkpoint ``--resume`` continues from (None without ``--resume``)."""
    if not resume:
        return None
    ckpt = find(out)
    if ckpt is None:
        raise InputError(f"--resume: no checkpoint in {out}/ckpt")
    return ckpt


def clear_old(out: Path, rank: int, log) -> None:
    """A fresh run replaces an older run's checkpoint (called once setup has succeeded)."""
    if rank == 0 and find(out):
        log(f"note: starting over in {out} (an older checkpoint there is replaced; use --resume to continue it)")
        for d in ("ckpt", "ckpt.old", "ckpt.tmp"):
            shutil.rmtree(out / d, ignore_errors=True)


def _rng_state(tr) -> dict:
    st = {"torch": torch.get_rng_state(), "data": tr.rng.getstate()}
    if tr.device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(tr.device)
    return st


def save(tr, out: Path, opt, method, progress: dict) -> None:
    final, tmp, old = out / "ckpt", out / "ckpt.tmp", out / "ckpt.old"
    sharded = tr.student.sharded
    if tr.world > 1 and not sharded:  # (FSDP shards differ by design)
        distributed.check_in_sync(tr.student.model, tr.world)
    if tr.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(tr.world)
    torch.save(_rng_state(tr), tmp / f"rng-{tr.rank}.pt")
    if sharded:  # every process writes its shards of the student and of the optimizer state
        fsdp.save(tr.student.model, opt, tmp / "dcp")
    if tr.rank == 0:
        if sharded:  # config and tokenizer; the weights are in dcp/ (python -m opd_train.export)
            tr.student.model.config.save_pretrained(tmp / "model")
        else:
            tr.student.model.save_pretrained(tmp / "model")
        tr.tok.save_pretrained(tmp / "model")
        torch.save({"progress": progress, "optimizer": None if sharded else opt.state_dict(),
                    "method": method.state_dict(), "world": tr.world, "args": vars(tr.args)}, tmp / "state.pt")
    distributed.barrier(tr.world)
    if tr.rank == 0:  # swap: ckpt -> ckpt.old, ckpt.tmp -> ckpt, drop ckpt.old
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(tr.world)


def check_resume_args(saved: dict, args) -> None:
    diff = {k: (v, getattr(args, k, None)) for k, v in saved.items()
            if k not in RESUME_MAY_DIFFER and getattr(args, k, None) != v}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise InputError(f"--resume: options differ from the checkpointed run ({lines})")


def restore(ckpt: Path, tr, opt, method, log) -> dict:
    """Load optimizer, method and RNG states (the student weights were loaded from ``ckpt/model``);
    returns the saved progress."""
    state = torch.load(ckpt / "state.pt", weights_only=False)
    check_resume_args(state["args"], tr.args)
    if state["world"] != tr.world:
        raise InputError(f"--resume: the checkpoint was written by {state['world']} processes, now {tr.world}")
    if tr.student.sharded:
        fsdp.load(tr.student.model, opt, ckpt / "dcp")
    else:
        opt.load_state_dict(state["optimizer"])
    method.load_state_dict(state["method"])
    rng = torch.load(ckpt / f"rng-{tr.rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    tr.rng.setstate(rng["data"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], tr.device)
    log(f"resumed from {ckpt} at step {state['progress']['step']}")
    return state["progress"]
