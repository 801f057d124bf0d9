"""Per-token log-probabilities (and entropy) of the student, on logits or fused with the lm_head.

``log q(y) = a_y - logsumexp(a)`` and ``H(q) = logsumexp(a) - sum q a`` with ``a = s / T``,
from one streaming pass over the vocabulary; the backward recomputes ``q`` from the saved
``logsumexp`` (see ``opd_kernels.backends``). Positions whose target is ``ignore_index`` give 0.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from . import _engine
from ._common import backend_name, rows2d, shard_layout_or_local


def _finish(main, ent, valid, lead, return_entropy):
    zero = torch.zeros_like(main)
    logp = torch.where(valid, main, zero).view(lead)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, ent, zero).view(lead)


def _targets(targets, lead, vocab, ignore_index, group):
    """(targets as int64 with ignored -> -1, valid mask, this shard's vocab_start)."""
    start, total = shard_layout_or_local(vocab, group)
    V.check_targets(targets, lead, total, ignore_index)
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    return torch.where(valid, y, torch.full_like(y, -1)), valid, start  # -1: never on any shard


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   impl="auto", process_group=None):
    """``log softmax(logits / temperature)`` at ``targets`` -> fp32 shaped like ``targets``.

    With ``return_entropy=True`` returns ``(logprobs, entropy)``. Differentiable w.r.t. ``logits``.
    With ``process_group``, ``logits`` is this rank's vocabulary shard and ``targets`` are global
    ids (2 all-reduces of 2 and 6 floats per row).
    """
    V.check_logits("logits", logits)
    V.check_same_device(logits=logits, targets=targets)
    V.check_options(temperature=temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    y, valid, start = _targets(targets, lead, vocab, ignore_index, process_group)
    main, ent = _engine.rows(rows2d(logits, vocab), None, None, y, kind="logprob", inv_temp=1.0 / temperature,
                             vocab_start=start, entropy=return_entropy,
                             impl=backend_name(impl, logits.device), group=process_group)
    return _finish(main, ent, valid, lead, return_entropy)


def check_linear(hname, hidden, wname, weight, bname=None, bias=None):
    """hidden [..., d], weight [V, d], bias [V]; returns d."""
    V.check_logits(hname, hidden)
    V.check_logits(wname, weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wname} must be [V, d] with d = {hname}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        V.check_logits(bname, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bname} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return hidden.shape[-1]


def check_no_padding_with_group(vocab_size, group):
    if group is not None and vocab_size is not None:
        raise ValueError("vocab_size is not supported with process_group: pass the unpadded shard instead")


def linear_vocab(weight, vocab_size, group) -> int:
    """Rows of a single fused ``weight`` in use: all, or the first ``vocab_size`` (padded)."""
    check_no_padding_with_group(vocab_size, group)
    if vocab_size is None:
        return weight.shape[0]
    return V.check_vocab("weight", weight.shape[0], "weight", weight.shape[0], vocab_size)


def linear_args(hidden, weight, bias, vocab):
    """(h [N, d], W[:vocab], b[:vocab]) with h flattened over the leading dims."""
    h = hidden.reshape(-1, hidden.shape[-1])
    return h, weight[:vocab], None if bias is None else bias[:vocab]


def fused_linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                return_entropy=False, vocab_size=None, chunk_size=None, impl="auto",
                                process_group=None):
    """``token_logprobs(hidden @ weight.T + bias, targets)`` without materializing the logits.

    ``hidden [..., d]``, ``weight [V, d]`` (this rank's shard with ``process_group``);
    ``vocab_size`` uses only the first rows of a padded ``weight``; ``chunk_size`` overrides
    the rows per chunk of the torch backend. Differentiable w.r.t. hidden, weight and bias.
    """
    check_linear("hidden", hidden, "weight", weight, "bias", bias)
    V.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    V.check_options(temperature=temperature)
    lead = hidden.shape[:-1]
    vocab = linear_vocab(weight, vocab_size, process_group)
    y, valid, start = _targets(targets, lead, vocab, ignore_index, process_group)
    h, w, b = linear_args(hidden, weight, bias, vocab)
    main, ent = _engine.fl_rows((h, w, b) + (None,) * 6, y, kind="logprob", inv_temp=1.0 / temperature,
                                vocab_start=start, chunk=chunk_size or 0,
                                entropy=return_entropy, impl=backend_name(impl, hidden.device),
                                group=process_group)
    return _finish(main, ent, valid, lead, return_entropy)
