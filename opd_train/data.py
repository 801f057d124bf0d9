"""Bring your own data: a JSONL file of prompts with verifiable answers.

Each non-empty line is a JSON object with string fields ``prompt`` and ``answer`` and optional
``solution`` (a worked solution, used as privileged context by OPSD) and ``feedback`` (fixed
feedback text for SDPO; without it feedback is generated from the verifier). The verifier is
exact match after stripping whitespace. A malformed line raises ``ValueError("FILE:LINE: ...")``.
"""
from __future__ import annotations

import json
import random

from .task import Example, Task

FIELDS = {"prompt": True, "answer": True, "solution": False, "feedback": False}


def load_jsonl(path: str) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key, required in FIELDS.items():
                if required and key not in row:
                    raise ValueError(f"{path}:{n}: missing required field {key!r}")
                if key in row and not isinstance(row[key], str):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a string, got {type(row[key]).__name__}")
            unknown = set(row) - set(FIELDS)
            if unknown:
                raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}; expected {sorted(FIELDS)}")
            out.append(Example(row["prompt"], row["answer"], row.get("solution"), row.get("feedback")))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


class JsonlTask(Task):
    """Training rows sampled uniformly (with replacement); held-out rows from --eval-data or the tail."""

    def __init__(self, path: str, eval_path: str | None = None, eval_size: int = 256):
        rows = load_jsonl(path)
        if eval_path:
            self.train, self.eval = rows, load_jsonl(eval_path)
        else:
            if len(rows) < 2:
                raise ValueError(f"{path}: need at least 2 rows to hold some out (or pass --eval-data)")
            k = min(eval_size, len(rows) // 2)
            self.train, self.eval = rows[:-k], rows[-k:]
        self.max_answer_chars = max(len(ex.answer) for ex in rows)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [rng.choice(self.train) for _ in range(n)]

    def eval_examples(self) -> list[Example]:
        return self.eval

    def feedback(self, ex: Example, completion: str) -> str:
        if ex.feedback is not None:
            return ex.feedback
        if self.reward(ex, completion):
            return "The previous attempt was correct."
        return "The previous attempt was incorrect."

    def with_context(self, ex: Example, kind: str, *, attempt: str | None = None,
                     demo: str | None = None) -> str:
        if kind == "solution":
            ref = ex.solution if ex.solution is not None else ex.answer
            return f"{ex.prompt}\n\nReference solution:\n{ref}\n\nNow answer the question above yourself."
        if kind == "demo":
            return (f"{ex.prompt}\n\nHere is an example of a correct response:\n"
                    f"{ex.answer if demo is None else demo}\n\nNow answer with a response of your own.")
        if kind == "feedback":
            return (f"{ex.prompt}\n\nA previous attempt:\n{attempt or ''}\n\nFeedback on it:\n"
                    f"{self.feedback(ex, attempt or '')}\n\nNow answer the question above correctly.")
        raise ValueError(f"unknown context kind {kind!r}")
