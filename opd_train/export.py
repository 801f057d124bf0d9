"""``python -m opd_train.export CKPT DIR``: a checkpoint's student as a plain Hugging Face directory.

``CKPT`` is a run's ``OUT/ckpt`` (or ``OUT``). A ``--fsdp`` checkpoint keeps the student as DCP
shards (``CKPT/dcp``) next to its config and tokenizer (``CKPT/model``): they are loaded into one
process, without a process group, and saved with ``save_pretrained``. Any other checkpoint already
holds an HF directory (``CKPT/model``), which is copied. ``DIR`` then loads with
``AutoModelForCausalLM.from_pretrained`` and works as ``--student`` / ``--teacher``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM

from .inputs import InputError, has_weights
from .tokenizer import load_tokenizer


def export(ckpt: Path, out: Path) -> Path:
    ckpt = Path(ckpt)
    if not (ckpt / "model").is_dir() and (ckpt / "ckpt" / "model").is_dir():
        ckpt = ckpt / "ckpt"  # a run's OUT
    if not (ckpt / "model" / "config.json").is_file():
        raise InputError(f"{ckpt}: not a checkpoint (no model/config.json); expected a run's OUT/ckpt")
    if has_weights(ckpt / "model"):
        shutil.copytree(ckpt / "model", out, dirs_exist_ok=True)
        return out
    if not (ckpt / "dcp" / ".metadata").is_file():
        raise InputError(f"{ckpt}: no weights (neither model/ weights nor a DCP checkpoint in dcp/)")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "model"), dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))  # one process reads every shard
    model.load_state_dict(state["model"])
    model.save_pretrained(out)
    load_tokenizer(ckpt / "model").save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_train.export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a run's OUT/ckpt (or OUT)")
    p.add_argument("dir", help="the HF directory to write")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export(Path(args.ckpt), Path(args.dir))}")
    except InputError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
