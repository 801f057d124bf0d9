"""The bundled verifiable task: multi-digit arithmetic with worked solutions and feedback.

Numbers are written **least-significant digit first** and zero-padded to a fixed width, in the
question and in the answer: ``347 + 85`` is asked as ``"743+580="`` and answered ``"2340"``
(432 reversed, padded to ``digits+1``). Then every answer digit depends on operand digits at a
fixed distance and on the carry just computed, which a tiny causal model learns in a few
hundred steps; written most-significant digit first, a 2-layer model did not learn 3-digit
addition in 1000 SFT steps (measured while building this).

Everything a method may condition a teacher on is generated here:

* the **worked solution** (OPSD's privileged context): one ``x+y+c=cd`` column per digit,
  least significant first, where ``c`` is the incoming carry and ``cd`` the carry-out and digit;
* a **demonstration** (SDFT; SDPO's successful sibling): a correct answer;
* **feedback** (SDPO) on an attempt: ``"2311 wrong ==xx"`` marks right ``=`` and wrong ``x`` digits.
  It repeats the attempt, so a teacher can keep the right digits by copying it;
* a **hint** (SDPO ``--sdpo-feedback hint``): actionable feedback that does not repeat the attempt,
  ``"col 2 carry 1"`` (the first wrong answer column, least significant = 1, and the carry that
  goes into it), ``"need 4 digits"`` for a malformed attempt, ``"right"``. Not one of
  `CONTEXT_KINDS` (the kinds the bundled models are pre-trained on, unchanged so the cached
  models stay what they were); a model pre-trained with ``ModelSpec.context_kinds`` including it
  can use it.

The verifier is exact match. ``Task`` is the interface that `opd_train.data.JsonlTask` (bring
your own data) implements too.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

CONTEXT_KINDS = ("solution", "demo", "feedback")  # what the bundled models' pre-training mixes in
ALL_CONTEXT_KINDS = CONTEXT_KINDS + ("hint",)


@dataclass(frozen=True)
class Example:
    prompt: str                   # what the student sees (user message content)
    answer: str                   # reference answer; the verifier is exact match against it
    solution: str | None = None   # worked solution (privileged context)
    feedback: str | None = None   # fixed feedback text from a data file (BYO), if any


class Task:
    """Interface: training sampler, fixed held-out set, verifier, feedback, teacher contexts."""

    max_answer_chars: int = 256

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        raise NotImplementedError

    def eval_examples(self) -> list[Example]:
        raise NotImplementedError

    def reward(self, ex: Example, completion: str) -> float:
        """Exact match after stripping surrounding whitespace: 1.0 or 0.0."""
        return float(completion.strip() == ex.answer.strip())

    def partial_reward(self, ex: Example, completion: str) -> float:
        """Partial credit in [0, 1] (GRPO ``--grpo-reward digits``); here the exact-match reward."""
        return self.reward(ex, completion)

    def feedback(self, ex: Example, completion: str) -> str:
        raise NotImplementedError

    def domain(self, ex: Example) -> str:
        """The example's domain, for routing to domain teachers (``--domain-teacher``); one by default."""
        return ""

    def domains(self) -> tuple[str, ...]:
        """Every domain `domain` can return."""
        return ("",)

    def hint(self, ex: Example, completion: str) -> str:
        """Feedback that does not repeat the attempt (here: the generic feedback)."""
        return self.feedback(ex, completion)

    def with_context(self, ex: Example, kind: str, *, attempt: str | None = None,
                     demo: str | None = None) -> str:
        """The teacher's user message: the prompt plus privileged context of ``kind``."""
        raise NotImplementedError


class ArithmeticTask(Task):
    """``digits``-digit addition/subtraction (``ops`` in "+-"), answers least-significant digit first."""

    def __init__(self, digits: int = 3, ops: str = "+", eval_size: int = 256, eval_seed: int = 1234,
                 split: str = "test"):
        if digits < 1 or not ops or set(ops) - set("+-"):
            raise ValueError(f"ArithmeticTask: need digits >= 1 and ops from '+-', got {digits}, {ops!r}")
        if split not in ("test", "validation"):
            raise ValueError(f"ArithmeticTask: split must be 'test' or 'validation', got {split!r}")
        self.digits, self.ops = digits, ops
        self.max_answer_chars = digits + 1
        # Held-out problems are a fixed hash-defined 10% slice of all problems; training never sees them.
        # The test set is drawn from it with eval_seed; the validation set (lr selection, --tune) is
        # drawn from the rest of the slice, disjoint from the test set. eval_examples() is ``split``'s.
        rng = random.Random(eval_seed)
        self._eval = []
        while len(self._eval) < eval_size:
            a, b, op = self._draw(rng)
            if self._is_heldout(a, b, op):
                self._eval.append(self.make(a, b, op))
        self.split = split
        if split == "validation":
            test, rng, self._eval = {ex.prompt for ex in self._eval}, random.Random(eval_seed + 1), []
            for _ in range(1_000_000):
                if len(self._eval) == eval_size:
                    break
                a, b, op = self._draw(rng)
                if self._is_heldout(a, b, op) and self.make(a, b, op).prompt not in test:
                    self._eval.append(self.make(a, b, op))
            else:
                raise ValueError(f"ArithmeticTask: no room for a validation set of {eval_size} beside the "
                                 f"test set among the held-out {digits}-digit problems")

    # -- problems -------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> tuple[int, int, str]:
        hi = 10 ** self.digits - 1
        a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a  # keep results non-negative
        return a, b, op

    def _is_heldout(self, a: int, b: int, op: str) -> bool:
        # The same operand pairs are held out for both operations. (The key used to add 1 for "-":
        # an odd key times an odd multiplier stays odd, so no "-" problem was ever held out and
        # ``ops="-"`` looped forever building its held-out set.)
        key = (a * 10 ** self.digits + b) * 2
        return (key * 2654435761) % 4294967296 % 10 == 0

    def make(self, a: int, b: int, op: str) -> Example:
        n = self.digits
        xs, ys = f"{a:0{n}d}"[::-1], f"{b:0{n}d}"[::-1]  # least significant first
        cols, digits, c = [], [], 0
        for x, y in zip(map(int, xs), map(int, ys)):
            v = x + y + c if op == "+" else x - y - c
            c_out, d = (v // 10, v % 10) if op == "+" else (int(v < 0), v % 10)
            cols.append(f"{x}{op}{y}{op}{c}={c_out}{d}")
            digits.append(str(d))
            c = c_out
        answer = "".join(digits) + (str(c) if op == "+" else "")
        return Example(prompt=f"{xs}{op}{ys}=", answer=answer, solution=" ".join(cols))

    def sample(self, rng: random.Random, n: int, *, carry: bool | None = None,
               chain: bool | None = None) -> list[Example]:
        """``n`` training problems; ``carry=False`` (``True``) keeps only those without (with) a
        carry or borrow in some column, ``chain=False`` (``True``) those without (with) a carry
        chain (`has_chain`); ``None`` takes them as drawn."""
        out = []
        while len(out) < n:
            a, b, op = self._draw(rng)
            if not self._is_heldout(a, b, op):
                ex = self.make(a, b, op)
                if (carry is None or self.has_carry(ex) == carry) and (chain is None or self.has_chain(ex) == chain):
                    out.append(ex)
        return out

    @staticmethod
    def has_carry(ex: Example) -> bool:
        return any(col[-2] != "0" for col in ex.solution.split())

    @staticmethod
    def has_chain(ex: Example) -> bool:
        """A column that takes a carry (borrow) in and passes one on: ``x+y+1=1d``."""
        return any(col.split("=")[0][-1] == "1" and col[-2] == "1" for col in ex.solution.split())

    def domain(self, ex: Example) -> str:
        return "-" if "-" in ex.prompt else "+"

    def domains(self) -> tuple[str, ...]:
        return tuple(self.ops)

    def eval_examples(self) -> list[Example]:
        return self._eval

    # -- privileged context ---------------------------------------------------------------
    def feedback(self, ex: Example, completion: str) -> str:
        got = completion.strip()[: self.max_answer_chars + 2]
        if got == ex.answer:
            return f"{got} right"
        if len(got) != len(ex.answer) or not got.isdigit():
            return f"{got} wrong format"
        return f"{got} wrong " + "".join("=" if g == a else "x" for g, a in zip(got, ex.answer))

    def partial_reward(self, ex: Example, completion: str) -> float:
        """Share of answer characters in place (0 unless the attempt has the answer's length)."""
        got = completion.strip()
        if len(got) != len(ex.answer):
            return 0.0
        return sum(g == a for g, a in zip(got, ex.answer)) / len(ex.answer)

    def hint(self, ex: Example, completion: str) -> str:
        got = completion.strip()[: self.max_answer_chars + 2]
        if got == ex.answer:
            return "right"
        if len(got) != len(ex.answer) or not got.isdigit():
            return f"need {len(ex.answer)} digits"
        i = next(k for k, (g, a) in enumerate(zip(got, ex.answer)) if g != a)
        cols = ex.solution.split()  # "x+y+c=cd": c is the carry in, the first digit of cd the carry out
        carry_in = cols[i].split("=")[0][-1] if i < len(cols) else cols[-1][-2]
        return f"col {i + 1} carry {carry_in}"

    def with_context(self, ex: Example, kind: str, *, attempt: str | None = None,
                     demo: str | None = None) -> str:
        if kind == "hint":
            return f"hint {self.hint(ex, ex.answer if attempt is None else attempt)}\n{ex.prompt}"
        if kind == "solution":
            return f"sol {ex.solution}\n{ex.prompt}"
        if kind == "demo":
            return f"demo {ex.answer if demo is None else demo}\n{ex.prompt}"
        if kind == "feedback":
            return f"fb {self.feedback(ex, ex.answer if attempt is None else attempt)}\n{ex.prompt}"
        raise ValueError(f"unknown context kind {kind!r}; expected one of {ALL_CONTEXT_KINDS}")

    def corrupt(self, rng: random.Random, ex: Example) -> str:
        """A plausible wrong (or, 1 time in 4, right) attempt, for pre-training on feedback."""
        digits = list(ex.answer)
        for i in rng.sample(range(len(digits)), rng.choice([0, 1, 1, 2])):
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        return "".join(digits)
