"""Peer libraries a user would pick instead of opd_kernels, as benchmark providers.

``build(op, divergence, provider, device)`` returns ``fn(inputs) -> Tensor`` computing the same
quantity as ``opd_kernels`` (mean per-row divergence, or per-token logprobs), or raises
``Unavailable`` with the reason (library not importable, op not offered, needs CUDA).

* ``liger_chunked``: Liger-Kernel's ``chunked_loss.LigerFusedLinearJSDLoss`` (pure PyTorch,
  ``torch.compile``'d per chunk of 1024 rows, gradients computed during forward), with
  ``weight_hard_loss=0, weight_soft_loss=1``. Its ``beta`` follows the TRL endpoint convention,
  as ours does: ``beta=0`` is ``KL(teacher || student)`` = our ``forward_kl``, ``beta=1`` is
  ``KL(student || teacher)`` = our ``reverse_kl``, otherwise ``M = beta*teacher + (1-beta)*student``
  and ``beta*KL(teacher||M) + (1-beta)*KL(student||M)`` = our ``jsd`` with the same beta
  (checked numerically in ``test_peers.py``). Fused-linear distillation only.
* ``liger_chunked_eager``: the same ``LigerFusedLinearJSDLoss`` with ``compiled=False`` (its chunks
  run eagerly: no compile on the first call, no inductor kernels after it).
* ``liger``: Liger-Kernel's Triton ops (CUDA only): ``LigerFusedLinearJSD`` (same beta
  convention), ``LigerKLDIVLoss`` (forward KL on log-probs), ``LigerJSD`` (reverse KL as beta=1,
  JSD) on ``log_softmax`` of the logits, ``Liger(FusedLinear)CrossEntropyLoss`` for token logprobs.
* ``cce``: Cut-Cross-Entropy's ``linear_cross_entropy`` (``reduction="none"``, negated) for
  fused-linear token logprobs: ``impl="torch_compile"`` on CPU, its Triton kernel ``"cce"`` on
  CUDA (library defaults otherwise, including its gradient filter ``filter_eps="high"``).
* ``trl``: TRL as its trainers compute on full logits: ``GKDTrainer.generalized_jsd_loss``
  (``beta`` = 0 / 1 / BETA for forward KL / reverse KL / JSD; ``batchmean`` over rows) for the
  distillation ops, ``trl.trainer.utils.selective_log_softmax`` (GRPO's) for token logprobs;
  the fused-linear forms first build the logits ``hidden @ weight.T`` in the input dtype, as a
  model's ``lm_head`` does.
* ``trl_chunked``: TRL's own fused-linear kernels (``trl.kernels``, TRL >= 1.16), which never build
  the ``[N, V]`` logits: ``ChunkedDivergenceFunction`` (the loss of the stable
  ``DistillationTrainer``; per-row divergence, averaged here; same ``beta`` convention, 0 / 1 / BETA)
  and ``ChunkedLogProbFunction`` (per-token logprobs, vocabulary tiles of TRL's trainer width,
  32768). Triton on CUDA, torch tiles elsewhere; both compute in float32 whatever the input dtype
  (float32 tiles and statistics). Fused-linear ops only.

No peer has a G-OPD loss.
"""
from __future__ import annotations

import os

import torch

PEERS = ("liger_chunked", "liger_chunked_eager", "liger", "cce", "trl", "trl_chunked")
COMPILED = ("liger_chunked", "cce")  # compile (or JIT) on first call: their first-call time is reported


class Unavailable(Exception):
    """A provider cannot run this case here; the message is the reason written to the results."""


def liger_beta(divergence: str, beta: float) -> float:
    """Liger's / TRL's ``beta`` for our ``divergence`` (the endpoint convention, see module doc)."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)


def _import(what: str, package: str):
    try:
        if what == "trl_gkd":
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            try:  # TRL >= 0.2x keeps GKD in trl.experimental
                from trl.experimental.gkd import GKDTrainer
            except ImportError:
                from trl import GKDTrainer
            return GKDTrainer
        if what == "trl_utils":
            from trl.trainer.utils import selective_log_softmax
            return selective_log_softmax
        if what == "trl_kernels":
            import trl
            from packaging.version import Version
            if Version(trl.__version__) < Version("1.16"):
                raise ImportError(f"trl {trl.__version__} has no trl.kernels chunked divergence (needs trl>=1.16)")
            from trl.kernels import ChunkedLogProbFunction
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
            return ChunkedDivergenceFunction, ChunkedLogProbFunction
        if what == "liger_chunked":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
            return LigerFusedLinearJSDLoss
        if what == "liger":
            import liger_kernel.transformers as lk
            return lk
        if what == "cce":
            from cut_cross_entropy import linear_cross_entropy
            return linear_cross_entropy
    except Exception as exc:  # noqa: BLE001 - whatever stops the import is the reason
        raise Unavailable(f"{package} not importable ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise ValueError(what)


def _logits(x, m, fused):
    """Logits of model ``m`` as the peer's user has them: ``hidden @ weight.T`` (input dtype)."""
    return x[f"{m}_hidden"] @ x[f"{m}_weight"].T if fused else x[f"{m}_logits"]


def missing(op: str, provider: str, device) -> str | None:
    """Why ``provider`` cannot run ``op`` on ``device``, known without importing it (else None)."""
    if op.endswith("gopd_loss"):
        return f"{provider} has no G-OPD loss"
    if provider in ("liger_chunked", "liger_chunked_eager") and op != "fused_linear_distill_loss":
        return f"Liger chunked_loss has no {op} (fused-linear distillation only)"
    if provider == "trl_chunked" and not op.startswith("fused_linear_"):
        return f"trl.kernels has no {op} (fused-linear divergence and token logprobs only)"
    if provider == "cce" and op != "fused_linear_token_logprobs":
        return f"cut-cross-entropy has no {op} (linear_cross_entropy: fused-linear token logprobs only)"
    if provider == "liger" and torch.device(device).type != "cuda":
        return "Liger-Kernel's Triton ops need a CUDA device"
    return None


def build(op: str, divergence, provider: str, device, *, beta: float, temperature: float):
    fused = op.startswith("fused_linear_")
    cuda = torch.device(device).type == "cuda"
    if provider not in PEERS:
        raise ValueError(f"unknown peer {provider!r}; choose from {PEERS}")
    if missing(op, provider, device):
        raise Unavailable(missing(op, provider, device))

    if provider == "trl":
        if op.endswith("distill_loss"):
            gkd = _import("trl_gkd", "trl")
            b = liger_beta(divergence, beta)
            return lambda x: gkd.generalized_jsd_loss(_logits(x, "student", fused), _logits(x, "teacher", fused),
                                                      beta=b, temperature=temperature)
        sls = _import("trl_utils", "trl")
        return lambda x: sls(_logits(x, "student", fused) / temperature, x["targets"])

    if provider == "trl_chunked":
        return _trl_chunked(op, divergence, beta, temperature)

    if provider in ("liger_chunked", "liger_chunked_eager"):
        cls = _import("liger_chunked", "liger-kernel")
        mod = cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta(divergence, beta),
                  temperature=temperature, compiled=provider == "liger_chunked")
        return lambda x: mod(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                             x["targets"])

    if provider == "cce":
        lce = _import("cce", "cut-cross-entropy")
        impl = "cce" if cuda else "torch_compile"
        if temperature != 1.0:
            raise Unavailable("cut-cross-entropy has no temperature argument")
        return lambda x: -lce(x["student_hidden"], x["student_weight"], x["targets"], reduction="none", impl=impl)

    lk = _import("liger", "liger-kernel")  # provider == "liger", on CUDA
    return _liger_triton(lk, op, divergence, beta, temperature)


def _liger_triton(lk, op, divergence, beta, temperature):
    b = liger_beta(divergence, beta)
    if op == "fused_linear_distill_loss":
        mod = lk.LigerFusedLinearJSD(jsd_beta=b, temperature=temperature)
        return lambda x: mod(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], None)
    if op == "distill_loss":
        def logp(x, m):
            return torch.log_softmax(x[f"{m}_logits"].float() / temperature, -1)
        if divergence == "forward_kl":  # KLDivLoss(input=log q, target=log p) = KL(p || q)
            kl = lk.LigerKLDIVLoss(reduction="batchmean", log_target=True)
            return lambda x: kl(logp(x, "student"), logp(x, "teacher"))
        jsd = lk.LigerJSD(beta=b)  # LigerJSD(input=log q student, target=log p teacher)
        return lambda x: jsd(logp(x, "student"), logp(x, "teacher"))
    if temperature != 1.0:
        raise Unavailable("Liger's cross entropy has no temperature argument")
    if op == "fused_linear_token_logprobs":
        ce = lk.LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda x: -ce(x["student_weight"], x["student_hidden"], x["targets"])
    if op == "token_logprobs":
        ce = lk.LigerCrossEntropyLoss(reduction="none")
        return lambda x: -ce(x["student_logits"], x["targets"])
    raise Unavailable(f"liger-kernel has no {op}")


TRL_LOGPROB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16: its trainers' vocabulary tile


def _trl_chunked(op, divergence, beta, temperature):
    divergence_fn, logprob_fn = _import("trl_kernels", "trl")
    if op == "fused_linear_distill_loss":
        b = liger_beta(divergence, beta)
        return lambda x: divergence_fn.apply(x["student_hidden"], x["student_weight"], None, x["teacher_hidden"],
                                             x["teacher_weight"], None, b, temperature, 1.0, None, 1.0,
                                             None)[0].mean()
    # fused_linear_token_logprobs; outputs=(): no entropy or other extras
    return lambda x: logprob_fn.apply(x["student_hidden"], x["student_weight"], None, x["targets"], temperature,
                                      TRL_LOGPROB_CHUNK, None, 1.0, ())[0]
