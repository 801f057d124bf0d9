"""Hugging Face causal LMs as they are: the final hidden states (no logits) and the real head.

The fused-linear ops take ``hidden [..., d]`` and ``weight [V, d]``; this module gets both from
an HF model without computing ``[N, V]`` logits and without changing the model::

    head = ok.hf.head(model, tokenizer)            # weight, bias, softcap, logit_scale, vocab_size
    h = ok.hf.hidden_states(model, input_ids, attention_mask)   # what model.lm_head sees
    logp = ok.fused_linear_token_logprobs(h, head.weight, targets, **head.kwargs())

The model's logits are ``c * tanh(((h @ W.T + b) * logit_scale) / c)`` (``c`` = softcap) over the
first ``vocab_size`` rows. ``head`` reads the head module and the config; anything it cannot see
through (a wrapped or custom ``lm_head``, a config option that changes the logits in a way this
module does not model, an architecture it has not been verified on) raises a ``ValueError`` naming
the class. ``verify`` checks one model numerically against its own ``forward``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

# model_type -> how the forward turns the backbone's last hidden state into logits, as read from
# the transformers 5.x sources; each is checked against the model's own forward in tests/test_hf.py.
VERIFIED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "gpt2", "cohere", "cohere2", "phi", "phi3",
})

# config attributes that change the logits in ways not modelled here (they differ across families:
# Granite divides by ``logits_scaling``, HyperCLOVAX multiplies by it), so they are refused.
_UNHANDLED_CONFIG = ("logits_scaling", "output_multiplier", "lm_head_multiplier", "logit_multiplier",
                     "mup_width_multiplier", "scale_emb", "dim_model_base", "output_scale")


@dataclasses.dataclass(frozen=True)
class Head:
    """The output projection of a causal LM as the fused ops need it.

    ``logits = c * tanh(((hidden @ weight[:vocab_size].T + bias) * logit_scale) / c)``; ``None``
    means "absent" (no bias, no softcap, scale 1, all rows of ``weight``).
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    logit_scale: Optional[float] = None
    vocab_size: Optional[int] = None

    def kwargs(self, side: Optional[str] = None) -> dict:
        """Keyword arguments of the fused ops for this head; entries that are absent are left out.

        ``side=None``: a single-model op (``bias``, ``softcap``, ``logit_scale``, ``vocab_size``).
        ``side="student" | "teacher" | "ref"``: the per-side options of a two/three-model op
        (``student_bias``, ``student_softcap``, ``student_logit_scale``); ``vocab_size`` is shared
        between the sides there, so pass it once yourself (``vocab_size=head.vocab_size``).
        """
        out = {"bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}
        if side is None:
            out["vocab_size"] = self.vocab_size
        elif side in ("student", "teacher", "ref"):
            out = {f"{side}_{k}": v for k, v in out.items()}
        else:
            raise ValueError(f"side must be None, 'student', 'teacher' or 'ref', got {side!r}")
        return {k: v for k, v in out.items() if v is not None}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits ``[..., vocab_size]`` (materialized; a reference, not for training losses)."""
        rows = self.weight.shape[0] if self.vocab_size is None else self.vocab_size
        s = torch.nn.functional.linear(hidden, self.weight[:rows], None if self.bias is None else self.bias[:rows])
        if self.logit_scale is not None:
            s = s * self.logit_scale
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        return s


def unwrap(model):
    """The HF model inside DDP / DataParallel / ``torch.compile`` / PEFT wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def _name(model) -> str:
    return type(model).__name__


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{_name(model)} has no .config: opd_kernels.hf supports Hugging Face causal LMs "
                         "(PreTrainedModel subclasses with an lm_head)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def backbone(model):
    """The decoder stack whose ``last_hidden_state`` (after the final norm) feeds ``lm_head``."""
    model = unwrap(model)
    _text_config(model)
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    for attr in ("model", "transformer"):
        sub = getattr(model, attr, None)
        if isinstance(sub, torch.nn.Module):
            return sub
    raise ValueError(f"{_name(model)}: cannot find the backbone (no base_model, .model or .transformer); "
                     "opd_kernels.hf supports *ForCausalLM / *LMHeadModel classes")


def _lm_head(model):
    get = getattr(model, "get_output_embeddings", None)
    lm = get() if callable(get) else getattr(model, "lm_head", None)
    if lm is None:
        raise ValueError(f"{_name(model)} has no output embeddings (lm_head): it is not a causal LM head model")
    if type(lm) is not torch.nn.Linear:
        raise ValueError(f"{_name(model)}.lm_head is a {type(lm).__module__}.{type(lm).__name__}, not a plain "
                         "torch.nn.Linear: opd_kernels.hf cannot see through a wrapped or custom head "
                         "(e.g. a LoRA adapter on lm_head or a quantized layer); merge or unwrap it first")
    return lm


def _number(model, config, attr):
    v = getattr(config, attr, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{_name(model)}: config.{attr} must be a number or None, got {v!r}")
    return float(v)


def head(model, tokenizer=None, *, strict: bool = True) -> Head:
    """The output projection of ``model`` as it really is (shared tensors, not copies).

    ``weight``/``bias`` are ``lm_head``'s parameters (the embedding matrix when tied), so gradients
    of the fused ops reach the model. ``softcap`` is ``config.final_logit_softcapping`` (Gemma 2/3),
    ``logit_scale`` is ``config.logit_scale`` (Cohere). With ``tokenizer`` (anything with ``len``),
    ``vocab_size = len(tokenizer)`` when the head has more (padded) rows; more tokens than rows is
    an error. ``strict=False`` accepts an architecture outside :data:`VERIFIED_MODEL_TYPES`
    (check it with :func:`verify` first).
    """
    model = unwrap(model)
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    for attr in _UNHANDLED_CONFIG:
        if getattr(config, attr, None) not in (None, False):
            raise ValueError(f"{_name(model)}: config.{attr}={getattr(config, attr)!r} changes the logits in a way "
                             "opd_kernels.hf does not model; this model is not supported")
    if strict and model_type not in VERIFIED_MODEL_TYPES:
        raise ValueError(f"{_name(model)} (model_type={model_type!r}) is not an architecture opd_kernels.hf has been "
                         f"verified on ({', '.join(sorted(VERIFIED_MODEL_TYPES))}); check it with "
                         "opd_kernels.hf.verify(model, strict=False) and then pass strict=False")
    lm = _lm_head(model)
    backbone(model)
    softcap = _number(model, config, "final_logit_softcapping")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{_name(model)}: config.final_logit_softcapping must be > 0, got {softcap}")
    logit_scale = _number(model, config, "logit_scale")
    rows = lm.weight.shape[0]
    vocab_size = None
    if tokenizer is not None:
        n = len(tokenizer)
        if n > rows:
            raise ValueError(f"{_name(model)}: the tokenizer has {n} tokens but lm_head.weight has only {rows} rows")
        vocab_size = n if n < rows else None
    return Head(weight=lm.weight, bias=lm.bias, softcap=softcap, logit_scale=logit_scale, vocab_size=vocab_size)


def hidden_states(model, input_ids=None, attention_mask=None, *, through_forward=None, **kw) -> torch.Tensor:
    """``[B, L, d]``: the backbone's last hidden state after its final norm, i.e. what ``lm_head``
    receives in ``model(input_ids, attention_mask)`` -- without computing the logits.

    Extra keywords go to the backbone (``position_ids``, ``inputs_embeds``, ...); ``use_cache``
    defaults to False. ``through_forward=False`` calls the backbone module directly. ``True`` runs
    the model's own forward (with whatever wraps it) with ``logits_to_keep`` = no position (a
    ``[B, 0, V]`` logits tensor) and takes the backbone's output with a temporary forward hook.
    ``None`` (default) picks ``True`` when the forward is wrapped: under ``DistributedDataParallel``
    (it all-reduces gradients only for a forward that went through it) or when the model's
    ``forward`` was replaced on the instance (accelerate's mixed-precision autocast wrapper, as
    the HF/TRL Trainer installs it with ``bf16=True``), so the hidden state is the one the model's
    forward computes. FSDP2 (``fully_shard`` with the model as the root): pass ``through_forward=True``,
    so the root's forward gathers the parameters (as ``opd_train`` does with ``--fsdp``); calling the
    backbone directly would meet sharded embeddings. DeepSpeed ZeRO-3 is not supported.
    """
    outer = model
    model = unwrap(model)
    body = backbone(model)
    kw.setdefault("use_cache", False)
    if through_forward is None:
        through_forward = (isinstance(outer, torch.nn.parallel.DistributedDataParallel)
                           or "forward" in vars(model) or "forward" in vars(outer))
    if through_forward:
        return _through_forward(outer, model, body, input_ids, attention_mask, kw)
    return _last(body(input_ids=input_ids, attention_mask=attention_mask, **kw))


def _last(out):
    h = getattr(out, "last_hidden_state", None)
    return out[0] if h is None else h


def _through_forward(outer, model, body, input_ids, attention_mask, kw):
    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        raise ValueError(f"{_name(model)}.forward takes no logits_to_keep: opd_kernels.hf.hidden_states needs it to "
                         "run the model's (wrapped) forward without computing logits; pass through_forward=False "
                         "to call the backbone directly")
    seen = []
    hook = body.register_forward_hook(lambda module, args, out: seen.append(out))
    device = (input_ids if input_ids is not None else kw["inputs_embeds"]).device
    try:
        outer(input_ids=input_ids, attention_mask=attention_mask,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=device), **kw)
    finally:
        hook.remove()
    return _last(seen[-1])


def verify(model, input_ids=None, *, tokenizer=None, strict: bool = True, atol: float = 1e-4) -> Head:
    """Check that ``head(model).logits(hidden_states(model, ids))`` equals ``model(ids).logits``
    on a short sequence (default: 2 x 7 token ids); returns the head, or raises ``ValueError``
    with the largest difference seen. Runs one full forward (materializes the logits once).
    """
    h = head(model, tokenizer, strict=strict)
    model = unwrap(model)
    if input_ids is None:
        rows = h.vocab_size or h.weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, rows, (2, 7), generator=gen).to(h.weight.device)
    with torch.no_grad():
        want = model(input_ids=input_ids, use_cache=False).logits
        got = h.logits(hidden_states(model, input_ids))
    want = want[..., : got.shape[-1]]
    diff = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    if not diff <= atol * max(1.0, scale):
        raise ValueError(f"{_name(model)}: logits from opd_kernels.hf.head/hidden_states differ from the model's own "
                         f"forward by {diff:.3g} (max |logit| {scale:.3g}): its head is not seen through")
    return h
