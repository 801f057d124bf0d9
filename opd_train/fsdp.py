"""``--fsdp`` under torchrun: FSDP2 sharding of the student, and its DCP checkpoints.

The student is sharded with PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``): each
decoder layer (the model's ``_no_split_modules`` classes), then the whole model as the root. Its
parameters, gradients and AdamW state are split across the processes; a layer's parameters are
all-gathered for its forward and backward only. The root (embeddings, final norm, lm_head) is
gathered once by the student's forward and stays whole until its backward, so the fused ops read
the full lm_head once per step (`opd_train.lm.LM` runs the model's own forward under FSDP).

Teachers, references and self-teachers are **replicated**: each process holds a whole frozen copy
(they have no gradients or optimizer state, so sharding them would save only their weights), which
limits a teacher to what fits in one device's memory next to the student's shard.

With ``--dtype bf16`` the shards stay fp32 (master weights; AdamW state fp32) and
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` gathers them in bf16.

Checkpoints are DCP (``torch.distributed.checkpoint``): model and optimizer state dicts from
``get_state_dict``, written by every process into ``ckpt/dcp``; ``--resume`` loads them at the same
world size. ``python -m opd_train.export CKPT DIR`` turns one into a plain HF directory.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .inputs import InputError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules of the classes in ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise InputError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules "
                         f"{sorted(names)} matched no module); cannot shard it per layer")
    return layers


def shard(model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """``fully_shard`` each decoder layer, then the model (the root), in place."""
    policy = MixedPrecisionPolicy() if compute_dtype is None else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def save(model: nn.Module, opt, path: Path) -> None:
    """Every process writes its shards of the model and optimizer state to the DCP directory ``path``."""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load(model: nn.Module, opt, path: Path) -> None:
    """Model and optimizer state from the DCP directory ``path`` (same world size as it was written)."""
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
