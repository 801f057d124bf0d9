"""opd-kernels: fused, memory-lean loss ops for on-policy distillation.

Every op works on logits ``[..., V]`` or fused with the lm_head (``hidden [..., d]`` and
``weight [V, d]``, never materializing ``[N, V]``), on the ``torch``, ``triton`` or ``cuda``
backend (``impl=``), and vocab-parallel with ``process_group=`` (a ``ProcessGroup`` or a
``VocabShard``). ``explain(...)`` says what a call would run (backend, path, compiled; the
environment overrides are listed in ``opd_kernels/ops/_decide.py``). See docs/design.md for the math.
"""
from .ops._decide import Decision, explain
from .ops.distill import DistillLoss, FusedLinearDistillLoss, distill_loss, fused_linear_distill_loss
from .ops.gopd import fused_linear_gopd_loss, gopd_advantages, gopd_loss
from .ops.logprobs import fused_linear_token_logprobs, token_logprobs
from .ops.sparse import fused_linear_sparse_distill_loss, sparse_distill_loss
from .parallel import VocabShard
from . import hf

__version__ = "0.1.0"
__all__ = [
    "token_logprobs", "distill_loss", "sparse_distill_loss", "gopd_loss", "gopd_advantages",
    "fused_linear_token_logprobs", "fused_linear_distill_loss", "fused_linear_gopd_loss",
    "fused_linear_sparse_distill_loss",
    "DistillLoss", "FusedLinearDistillLoss", "VocabShard", "explain", "Decision",
]
