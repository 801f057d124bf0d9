"""Training methods, one file each, and `METHODS`: the one registry of them.

A method turns a list of prompts (task examples) into a batch (``prepare``: sampling, teacher
forward passes, rewards — no gradient) and a batch into a loss (``loss``: one student forward
with gradient through the fused ops). The loop in `opd_train.train` does the rest: optimizer
step, `after_step` (EMA teachers), metrics, evaluation and checkpoints.

`METHODS` maps ``--method`` names to classes, in help order. The CLI's choices, the help text
(per-method option groups with their defaults, samples per prompt, which methods need
``--teacher``) and `opd_train.compare` are all built from it.
"""
from __future__ import annotations

from .base import Batch, EMATeacher, Method
from .eopd import EOPD
from .gkd import GKD
from .gopd import GOPD
from .grpo import GRPO
from .iwopd import IWOPD
from .opd import OPD
from .opsd import OPSD
from .sdft import SDFT
from .sdpo import SDPO
from .seqkd import SeqKD
from .sft import SFT
from .topk_rkl import TopKRKL

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SFT, SeqKD, GRPO, GKD, OPD, EOPD, IWOPD, TopKRKL, OPSD, SDFT,
                                                           SDPO, GOPD)}

__all__ = ["METHODS", "Batch", "EMATeacher", "Method"]
