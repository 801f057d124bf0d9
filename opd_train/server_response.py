"""Validation of a teacher server's scores, before any number reaches a loss.

The server is asked for ``prompt_logprobs=k`` on ``prompt + completion`` token ids (vLLM's
OpenAI-compatible ``/v1/completions``): per position, a map ``{token id: {"logprob": x, ...}}``
of the top ``k`` tokens plus the actual token there (k + 1 entries when that token is not in the
top k). `completion_scores` checks each choice against what was sent and returns, per
completion position, the actual (sampled) token's logprob and the top-k ids and logprobs:

* one row per position (``len(prompt_logprobs) == len(ids)``), a map at every completion position;
* ids are integers inside the vocabulary ``[0, vocab)``; the sampled token is present;
* logprobs are finite numbers ``<= 0``;
* the row holds the top k (k entries, or k + 1 with the sampled token outside the top k, whose
  logprob is then no larger than the top k's smallest);
* the top-k mass ``sum exp(logprob)`` is at most 1 (plus 1e-4 for rounding).

Anything else raises `BadResponse` naming the sequence, the position and what was wrong.
"""
from __future__ import annotations

import math

from .server_client import ServerError

MASS_SLACK = 1e-4  # float32 logprobs of a near-certain top-k can sum a little over 1


class BadResponse(ServerError):
    """A malformed or inconsistent score: an error, never a number in the loss."""


def choices_in_order(body, n: int, where: str) -> list:
    """The ``n`` choices of a completions answer, ordered by their ``index``."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise BadResponse(f"{where}: {got} choices for {n} prompts")
    out = [None] * n
    for c in choices:
        i = c.get("index") if isinstance(c, dict) else None
        if not isinstance(i, int) or not 0 <= i < n or out[i] is not None:
            raise BadResponse(f"{where}: choice index {i!r} is not one of 0..{n - 1} (once each)")
        out[i] = c
    return out


def _logprob(entry, where: str) -> float:
    x = entry.get("logprob") if isinstance(entry, dict) else entry
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise BadResponse(f"{where}: no numeric logprob ({_short(entry)})")
    x = float(x)
    if not (math.isfinite(x) and x <= 0.0):
        raise BadResponse(f"{where}: logprob {x!r} is not finite and <= 0")
    return x


def _token_id(key, vocab: int, where: str) -> int:
    """A map key as a token id: an int, or a JSON object key spelling one ("17")."""
    if isinstance(key, int) and not isinstance(key, bool):
        t = key
    elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
        t = int(key)
    else:
        raise BadResponse(f"{where}: token id {_short(key)} is not an integer")
    if not 0 <= t < vocab:
        raise BadResponse(f"{where}: token id {t} is outside the vocabulary [0, {vocab})")
    return t


def _short(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def position_scores(row, sampled: int, k: int, vocab: int, where: str):
    """``(sampled logprob, top-k ids, top-k logprobs)`` of one position's map (top k by logprob)."""
    if not isinstance(row, dict) or not row:
        raise BadResponse(f"{where}: no logprobs ({_short(row)})")
    scores = {}
    for key, entry in row.items():
        t = _token_id(key, vocab, where)
        if t in scores:
            raise BadResponse(f"{where}: token id {t} appears twice")
        scores[t] = _logprob(entry, f"{where}, token {t}")
    if sampled not in scores:
        raise BadResponse(f"{where}: the sampled token {sampled} is missing (the server must return the actual "
                          "token's logprob with the top k: vLLM's prompt_logprobs)")
    top = scores
    if len(scores) == k + 1:
        top = {t: x for t, x in scores.items() if t != sampled}
        if top and scores[sampled] > min(top.values()):
            raise BadResponse(f"{where}: {k + 1} entries, but the sampled token {sampled} (logprob "
                              f"{scores[sampled]!r}) ranks inside the top {k}: not a top-{k} answer")
    elif len(scores) != k:
        raise BadResponse(f"{where}: {len(scores)} entries, expected the top {k} plus the sampled token "
                          f"({k} or {k + 1})")
    mass = sum(math.exp(x) for x in top.values())
    if mass > 1.0 + MASS_SLACK:
        raise BadResponse(f"{where}: top-{k} probability mass {mass:.6f} > 1")
    ranked = sorted(top.items(), key=lambda tx: -tx[1])
    return scores[sampled], [t for t, _ in ranked], [x for _, x in ranked]


def completion_scores(choice, ids: list[int], start: int, k: int, vocab: int, where: str):
    """Per completion position ``start..len(ids)-1`` of one sequence: lists of the sampled
    logprobs ``[C]``, top-k ids ``[C][k]`` and top-k logprobs ``[C][k]``."""
    rows = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    if not isinstance(rows, list):
        raise BadResponse(f"{where}: no prompt_logprobs in the answer (does the server support the "
                          "'prompt_logprobs' parameter? vLLM's OpenAI server does)")
    if len(rows) != len(ids):
        raise BadResponse(f"{where}: {len(rows)} prompt_logprobs rows for {len(ids)} tokens "
                          "(one row per position expected)")
    sampled, top_ids, top_lps = [], [], []
    for p in range(start, len(ids)):
        s, ti, tl = position_scores(rows[p], ids[p], k, vocab, f"{where}, position {p}")
        sampled.append(s)
        top_ids.append(ti)
        top_lps.append(tl)
    return sampled, top_ids, top_lps
