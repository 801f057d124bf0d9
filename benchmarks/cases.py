"""What is benchmarked: the ops, their inputs, and one callable per provider.

A *case* is ``(op, divergence, provider, N, V, d, dtype)``. ``make_inputs`` builds the tensors
of a case (the student side requires grad; teacher/reference are constants) and ``build``
returns ``fn(inputs) -> Tensor`` for a provider, or raises ``Unavailable(reason)``.

Providers:

* ``naive``: what common trainers write (TRL ``generalized_jsd_loss``, HF ``logits.float()``):
  full logits upcast to fp32, ``log_softmax`` over the vocabulary, then the loss. For the
  fused-linear ops the logits are ``(hidden @ weight.T).float()`` (the matmul in the input
  dtype, as an ``nn.Linear`` lm_head does, then the fp32 copy).
* ``naive_compile``: the same function under ``torch.compile`` (compile time is excluded by
  the warm-up; the batch dimension is marked dynamic so one compile serves every N).
* ``torch`` / ``triton`` / ``cuda``: ``opd_kernels`` with ``impl=`` that backend.
* peers (``peers.py``): ``liger_chunked`` (Liger-Kernel's ``chunked_loss``, torch.compile),
  ``liger_chunked_eager`` (the same, ``compiled=False``), ``liger`` (Liger-Kernel's Triton ops,
  CUDA only), ``cce`` (Cut-Cross-Entropy), ``trl`` (TRL's ``generalized_jsd_loss`` /
  ``selective_log_softmax`` on full logits), ``trl_chunked`` (TRL's fused-linear
  ``trl.kernels``: chunked divergence and chunked logprobs), when importable.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

import peers
from peers import PEERS, Unavailable  # noqa: F401 (Unavailable: cases.Unavailable for callers)

OPS = ("token_logprobs", "distill_loss", "gopd_loss",
       "fused_linear_token_logprobs", "fused_linear_distill_loss", "fused_linear_gopd_loss")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
KEPT = "torch_kept"  # ours with _decide rule 4 opted in (OPD_KEEP_BYTES): fused-linear token logprobs only
PROVIDERS = ("naive", "naive_compile", "torch", KEPT, "triton", "cuda") + PEERS
COMPILED = ("naive_compile",) + peers.COMPILED  # first call compiles: reported, never timed
PASSES = ("fwd", "bwd", "fwd+bwd")

BETA = 0.5           # jsd skew (symmetric, so every library's beta convention agrees)
TEMPERATURE = 1.0
REWARD_SCALE = 1.25  # G-OPD lambda (ExOPD default)


def divergences(op: str) -> tuple:
    """Divergences benchmarked for ``op`` (``None``: the op has no divergence argument)."""
    if op.endswith("distill_loss"):
        return DIVERGENCES
    if op.endswith("gopd_loss"):
        return ("gopd",)
    return (None,)


def is_fused(op: str) -> bool:
    return op.startswith("fused_linear_")


def gemm_passes(op: str, pass_: str) -> int:
    """``2*N*V*d`` GEMMs in the matmul floor of a fused-linear case.

    Forward: one logits GEMM per model (student, teacher, reference). Backward: ``dh = G @ W``
    and ``dW = G.T @ h`` for the student. No recomputation is counted (a design that recomputes
    the logits in backward pays 1-3 more passes than this floor).
    """
    fwd = {"fused_linear_token_logprobs": 1, "fused_linear_distill_loss": 2, "fused_linear_gopd_loss": 3}[op]
    return {"fwd": fwd, "bwd": 2, "fwd+bwd": fwd + 2}[pass_]


# ----------------------------------------------------------------------------- inputs

def make_inputs(op, N, V, d, dtype, device, seed=0):
    """Inputs of one case; logits (or hidden @ weight.T) have a standard normal spread."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        x = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    x = {"targets": torch.randint(0, V, (N,), generator=g).to(device)}
    models = ("student", "teacher", "ref")[: {"token": 1, "distill": 2, "gopd": 3}[_family(op)]]
    for m in models:
        if is_fused(op):
            x[f"{m}_hidden"] = randn(N, d, grad=m == "student")
            x[f"{m}_weight"] = randn(V, d, scale=d ** -0.5, grad=m == "student")
        else:
            x[f"{m}_logits"] = randn(N, V, scale=2.0, grad=m == "student")
    return x


def grad_leaves(inputs):
    return [t for t in inputs.values() if t.requires_grad]


def _family(op):
    return "token" if op.endswith("token_logprobs") else "gopd" if op.endswith("gopd_loss") else "distill"


# ----------------------------------------------------------------------------- naive losses

def _logits(x, m, fused):
    """fp32 logits of model ``m``: ``(h @ W.T).float()`` for fused ops, ``logits.float()`` else."""
    if fused:
        return (x[f"{m}_hidden"] @ x[f"{m}_weight"].T).float()
    return x[f"{m}_logits"].float()


def naive_divergence(ls, lt, divergence, beta=BETA):
    """Per-row divergence from fp32 log-probs ``ls`` (student) and ``lt`` (teacher), TRL style."""
    if divergence == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if divergence in ("reverse_kl", "gopd"):
        return (ls.exp() * (ls - lt)).sum(-1)
    # TRL generalized_jsd_loss: log M = logsumexp(log q + log(1-beta), log p + log beta)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def naive_fn(op, divergence):
    fused, fam = is_fused(op), _family(op)
    T = TEMPERATURE

    def fn(x):
        ls = torch.log_softmax(_logits(x, "student", fused) / T, dim=-1)
        if fam == "token":
            return ls.gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
        bt = _logits(x, "teacher", fused) / T
        if fam == "gopd":
            bt = REWARD_SCALE * bt + (1 - REWARD_SCALE) * (_logits(x, "ref", fused) / T)
        return naive_divergence(ls, torch.log_softmax(bt, dim=-1), divergence).mean()

    return fn


# ----------------------------------------------------------------------------- providers

def _ours(op, divergence, impl):
    import opd_kernels as ok

    f = getattr(ok, op)
    opts = dict(temperature=TEMPERATURE, impl=impl)
    if divergence in DIVERGENCES:
        opts.update(divergence=divergence, beta=BETA)
    if divergence == "gopd":
        opts.update(reward_scale=REWARD_SCALE)

    def fn(x):
        if op == "token_logprobs":
            return f(x["student_logits"], x["targets"], **opts)
        if op == "fused_linear_token_logprobs":
            return f(x["student_hidden"], x["student_weight"], x["targets"], **opts)
        keys = [k for k in x if k.endswith(("_logits", "_hidden", "_weight"))]
        return f(*[x[k] for k in keys], **opts)

    return fn


def kept_missing(op) -> str | None:
    """Why ``torch_kept`` has no ``op`` (None: it has it): rule 4 covers the per-token ops only."""
    if op != "fused_linear_token_logprobs":
        return "rule 4 keeps a gradient for the per-token ops only (fused-linear token logprobs)"
    return None


def _kept(op, divergence):
    """Ours with rule 4 of ``_decide`` opted in for the call (as ``OPD_KEEP_BYTES=1099511627776``
    would): forward keeps the ``[N, V]`` fp32 unit gradient of the per-token logprobs for backward
    (3 GEMM passes instead of 4; outside the design contract's memory rule, hence opt-in)."""
    from opd_kernels.ops import _decide

    if kept_missing(op):
        raise Unavailable(kept_missing(op))
    fn = _ours(op, divergence, "torch")

    def run(x):
        old, _decide.KEEP_BYTES = _decide.KEEP_BYTES, 1 << 40
        try:
            return fn(x)
        finally:
            _decide.KEEP_BYTES = old

    return run


def _compiled(op, divergence):
    fn = torch.compile(naive_fn(op, divergence))

    def run(x):
        for k, t in x.items():  # one compile for every N (dim 0 is the token dim everywhere)
            if t.dim() and not k.endswith("_weight"):
                torch._dynamo.mark_dynamic(t, 0)
        return fn(x)

    return run


def build(op, divergence, provider, device):
    """``fn(inputs) -> Tensor`` for ``provider``; raises ``Unavailable`` with the reason."""
    if provider == "naive":
        return naive_fn(op, divergence)
    if provider == "naive_compile":
        return _compiled(op, divergence)
    if provider == KEPT:
        return _kept(op, divergence)
    if provider in ("torch", "triton", "cuda"):
        fn = _ours(op, divergence, provider)
        if provider != "torch" and torch.device(device).type != "cuda":
            try:  # the library's own reason, e.g. "no CUDA device"
                backward(fn(make_inputs(op, 8, 96, 16, torch.float32, device)))
            except Exception as exc:  # noqa: BLE001
                raise Unavailable(describe(exc)) from None
            raise Unavailable(f"impl={provider!r} on CPU runs the Triton interpreter: a correctness "
                              "tool, never a speed number")
        return fn
    if provider in PEERS:
        return peers.build(op, divergence, provider, device, beta=BETA, temperature=TEMPERATURE)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def backward(out):
    """Backward of a case's output (a scalar loss, or per-token logprobs with upstream ones)."""
    out.backward(torch.ones_like(out) if out.dim() else None)


def describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:300] if msg else ''}"


def probe(op, divergence, provider, device, dtype, inputs=None, timing=None):
    """Build ``provider`` and, for library providers, run it forward+backward on a tiny case.

    Returns ``fn`` or raises ``Unavailable`` with the library's own error message as the reason.
    ``inputs``: the tiny case (default 8 rows, V=96, d=16); ``timing``: a dict that receives
    ``first_call_ms``, the wall time of this first forward+backward (a compiled provider's compile,
    a Triton kernel's JIT; the library import is not in it).
    (``naive_compile`` is not probed: a tiny compile costs as much as the real one; a compile
    failure surfaces in the warm-up and is reported the same way.)
    """
    fn = build(op, divergence, provider, device)
    if provider.startswith("naive"):
        return fn
    try:
        x = inputs if inputs is not None else make_inputs(op, 8, 96, 16, dtype, device)
        t0 = time.perf_counter()
        backward(fn(x))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if timing is not None:
            timing["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    except Exception as exc:  # noqa: BLE001 - whatever the library says is the reason
        raise Unavailable(f"{provider} failed on a tiny {op} case: {describe(exc)}") from None
    return fn
