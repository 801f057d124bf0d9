"""TRL's trainers with their losses through :func:`opd_kernels.fused_linear_distill_loss`
(``pip install 'opd-kernels[trl]'``; the TRL range is checked at import):

* ``FusedGKDTrainer`` (``gkd.py``): ``trl.experimental.gkd.GKDTrainer``, with ``gkd_loss``.
* ``FusedDistillationTrainer`` (``distillation.py``): TRL's stable ``trl.DistillationTrainer``,
  with ``distillation_loss``.

Both are drop-in subclasses: same arguments, same config, same sampling and data handling, same
loss value; only the loss runs fused with the heads, never materializing ``[N, V]`` logits.
"""
from __future__ import annotations

import os

from ._version import TESTED_TRL, check_version

check_version()
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .distillation import DistillationConfig, FusedDistillationTrainer, distillation_loss  # noqa: E402
from .gkd import FusedGKDTrainer, GKDConfig, gkd_loss  # noqa: E402

__all__ = ["FusedGKDTrainer", "GKDConfig", "gkd_loss", "FusedDistillationTrainer", "DistillationConfig",
           "distillation_loss", "TESTED_TRL"]
