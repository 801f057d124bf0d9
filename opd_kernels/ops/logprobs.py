"""Per-token log-probabilities (and entropy) of the student, on logits or fused with the lm_head.

``log q(y) = a_y - logsumexp(a)`` and ``H(q) = logsumexp(a) - sum q a`` with ``a = T(s) / temperature``
(``T`` the model's logit transform: ``x * logit_scale``, then ``softcap * tanh(x / softcap)``),
from one streaming pass over the vocabulary; the backward recomputes ``q`` from the saved
``logsumexp`` (see ``opd_kernels.backends``). Positions whose target is ``ignore_index`` give 0.
"""
from __future__ import annotations

import torch

from .. import parallel
from .._validate import (check_hidden_weight, check_logit_transform, check_logits, check_options, check_same_device,
                         check_targets)
from . import _fused, _rows
from ._decide import backend_name
from ._common import linear_args, linear_vocab, rows2d
from ._spec import RowSpec, transform_fields


def _finish(main, ent, valid, lead, return_entropy):
    zero = torch.zeros_like(main)
    logp = torch.where(valid, main, zero).view(lead)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, ent, zero).view(lead)


def _targets(targets, lead, vocab, ignore_index, process_group, device):
    """(this shard's local ids as int64, ignored -> -1 (on no shard), valid mask, group)."""
    shard = parallel.shard_of(process_group, vocab, device)
    check_targets(targets, lead, shard.total, ignore_index)
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    return shard.local(torch.where(valid, y, torch.full_like(y, -1))), valid, shard.group


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   softcap=None, logit_scale=None, impl="auto", process_group=None):
    """``log softmax(logits / temperature)`` at ``targets`` -> fp32 shaped like ``targets``.

    ``logit_scale`` (Cohere) multiplies the logits, then ``softcap`` (Gemma 2/3's
    ``final_logit_softcapping``) maps them to ``softcap * tanh(x / softcap)``, then the temperature
    divides them (None: absent); ``-inf`` logits stay banned, gradients are w.r.t. the raw logits.

    With ``return_entropy=True`` returns ``(logprobs, entropy)``. Differentiable w.r.t. ``logits``.
    With ``process_group`` (a ``ProcessGroup`` or an ``opd_kernels.VocabShard``), ``logits`` is
    this rank's vocabulary shard and ``targets`` are global ids (see ``opd_kernels.parallel``).
    """
    check_logits("logits", logits)
    check_same_device(logits=logits, targets=targets)
    check_options(temperature=temperature)
    tf = check_logit_transform(softcap, logit_scale)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    y, valid, group = _targets(targets, lead, vocab, ignore_index, process_group, logits.device)
    spec = RowSpec("logprob", 1.0 / temperature, entropy=return_entropy, impl=backend_name(impl, logits.device, logits),
                   **transform_fields(tf))
    main, ent = _rows.rows(rows2d(logits, vocab), None, None, y, spec, group)
    return _finish(main, ent, valid, lead, return_entropy)


def fused_linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                return_entropy=False, softcap=None, logit_scale=None, vocab_size=None,
                                chunk_size=None, impl="auto", process_group=None):
    """``token_logprobs(hidden @ weight.T + bias, targets)`` without materializing the logits.

    ``hidden [..., d]``, ``weight [V, d]`` (this rank's shard with ``process_group``);
    ``vocab_size`` uses only the first rows of a padded ``weight``; ``chunk_size`` overrides
    the rows per chunk of the chunked path. ``softcap`` / ``logit_scale`` as in
    :func:`token_logprobs` (``opd_kernels.hf.head(model).kwargs()`` gives a model's). Differentiable
    w.r.t. hidden, weight and bias.
    """
    check_hidden_weight("hidden", hidden, "weight", weight, "bias", bias)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_options(temperature=temperature)
    tf = check_logit_transform(softcap, logit_scale)
    lead = hidden.shape[:-1]
    vocab = linear_vocab(weight, vocab_size, process_group)
    y, valid, group = _targets(targets, lead, vocab, ignore_index, process_group, hidden.device)
    spec = RowSpec("logprob", 1.0 / temperature, entropy=return_entropy, chunk=chunk_size or 0,
                   impl=backend_name(impl, hidden.device, weight), **transform_fields(tf))
    models = linear_args(hidden, weight, bias, vocab) + (None,) * (_fused.N_MODEL - 3)
    main, ent = _fused.fl_rows(models, y, spec, group)
    return _finish(main, ent, valid, lead, return_entropy)
