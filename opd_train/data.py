"""Bring your own data: a JSONL file of prompts with verifiable answers.

Each non-empty line is a JSON object with string fields ``prompt`` and ``answer`` and optional
``solution`` (a worked solution, used as privileged context by OPSD) and ``feedback`` (fixed
feedback text for SDPO; without it feedback is generated from the verifier), e.g. `EXAMPLE_ROW`.
GSM8K's own rows load as they are: ``question`` stands for ``prompt``, and the answer is its worked
solution ending in ``#### 42`` (check it with ``--verifier number``; `opd_train.verifiers`).
The verifier (``--verifier``) defaults to exact match after stripping whitespace. A file that
cannot be read or a malformed line raises `opd_train.inputs.InputError` (a ``ValueError``):
``"FLAG FILE:LINE: ..."``.
"""
from __future__ import annotations

import json
import random

from .inputs import InputError
from .task import Example, Task
from .verifiers import exact

FIELDS = {"prompt": True, "answer": True, "solution": False, "feedback": False}
EXAMPLE_ROW = {"prompt": "What is 17 + 25?", "answer": "42", "solution": "7 + 5 = 12, write 2 carry 1; 1 + 2 + 1 = 4"}


def _parse_line(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        at = "the end of the line" if e.pos >= len(line) else f"column {e.colno}"
        raise InputError(f"{where}: not valid JSON ({e.msg} at {at}); expected one object per line, "
                         f"e.g. {json.dumps(EXAMPLE_ROW)}") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "question" in row:  # GSM8K's name for the prompt
        if "prompt" in row:
            raise InputError(f"{where}: both 'prompt' and 'question' (GSM8K's name for it); give one")
        row = {("prompt" if k == "question" else k): v for k, v in row.items()}
    for key, required in FIELDS.items():
        if required and key not in row:
            raise InputError(f"{where}: missing required field {key!r}")
        if key in row and not isinstance(row[key], str):
            raise InputError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    unknown = set(row) - set(FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(FIELDS)} "
                         "('question' for 'prompt' in GSM8K rows)")
    return Example(row["prompt"], row["answer"], row.get("solution"), row.get("feedback"))


def load_jsonl(path: str, flag: str = "--data") -> list[Example]:
    out = []
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot read ({e.strerror}); expected a JSONL file") from None
    for n, raw in enumerate(raw_lines, start=1):
        where = f"{flag} {path}:{n}"
        try:  # a UTF-8 byte-order mark at the start of the file is allowed
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if line.strip():
            out.append(_parse_line(line, where))
    if not out:
        raise InputError(f"{flag} {path}: no examples (expected one JSON object per line, e.g. "
                         f"{json.dumps(EXAMPLE_ROW)})")
    return out


class JsonlTask(Task):
    """Training rows sampled uniformly (with replacement); held-out rows from --eval-data or the tail;
    rewards and feedback from ``verifier`` (`opd_train.verifiers`)."""

    def __init__(self, path: str, eval_path: str | None = None, eval_size: int = 256, verifier=exact):
        self.verifier = verifier
        rows = load_jsonl(path, "--data")
        if eval_path:
            self.train, self.eval = rows, load_jsonl(eval_path, "--eval-data")
        else:
            if len(rows) < 2:
                raise InputError(f"--data {path}: {len(rows)} row, need at least 2 to hold some out "
                                 "(or pass --eval-data)")
            k = min(eval_size, len(rows) // 2)
            self.train, self.eval = rows[:-k], rows[-k:]
        self.max_answer_chars = max(len(ex.answer) for ex in rows)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [rng.choice(self.train) for _ in range(n)]

    def eval_examples(self) -> list[Example]:
        return self.eval

    def reward(self, ex: Example, completion: str) -> float:
        return self.verifier(ex.prompt, completion, ex.answer)[0]

    def feedback(self, ex: Example, completion: str) -> str:
        """The row's fixed feedback, else the verifier's text, else whether the attempt was right."""
        if ex.feedback is not None:
            return ex.feedback
        reward, text = self.verifier(ex.prompt, completion, ex.answer)
        if text is not None:
            return text
        if reward >= 1:
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
        if kind == "hint":  # feedback without the attempt
            return (f"{ex.prompt}\n\nFeedback on a previous attempt:\n{self.feedback(ex, attempt or '')}"
                    "\n\nNow answer the question above correctly.")
        if kind == "feedback":
            return (f"{ex.prompt}\n\nA previous attempt:\n{attempt or ''}\n\nFeedback on it:\n"
                    f"{self.feedback(ex, attempt or '')}\n\nNow answer the question above correctly.")
        raise ValueError(f"unknown context kind {kind!r}")
