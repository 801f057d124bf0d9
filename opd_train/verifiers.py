"""Verifiers for your own data (``--verifier exact|number|MODULE:FUNCTION``).

A verifier scores one completion: ``verify(prompt, completion, answer) -> (reward, feedback)``
with ``reward`` in [0, 1] and ``feedback`` a text for SDPO's teacher (or ``None``: the task's
generic feedback). It decides every reward the trainer sees: GRPO's and SDPO's rewards, the
rewards logged during training and the held-out accuracy.

* ``exact``: the completion equals the answer after stripping surrounding whitespace.
* ``number``: GSM8K style. The answer's number is what follows its last ``####`` (the GSM8K
  format: worked solution, then ``#### 42``), else its last number; the completion's is its last
  number. They match when equal as decimals (``1,000`` = ``1000``, ``42.0`` = ``42``, ``$5`` = ``5``).
* ``MODULE:FUNCTION``: your function, imported from an importable module (``pkg.mod:fn``) or a
  file (``path/to/file.py:fn``); it is called as ``fn(prompt, completion, answer)`` and returns a
  reward, or ``(reward, feedback)``.

`resolve` runs before training: a bad name fails there, in one line (`opd_train.inputs.InputError`).
A user function that returns something other than a reward in [0, 1] stops the run the same way.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Optional

from .inputs import InputError

Verdict = tuple[float, Optional[str]]
BUILTIN = ("exact", "number")
# an optional sign, digits with optional thousands commas, an optional fraction
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def exact(prompt: str, completion: str, answer: str) -> Verdict:
    return float(completion.strip() == answer.strip()), None


def last_number(text: str) -> Optional[Decimal]:
    """The last number in ``text`` (commas dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def answer_number(answer: str) -> Optional[Decimal]:
    """The reference number: after the last ``####`` (GSM8K), else the answer's last number."""
    head, sep, tail = answer.rpartition("####")
    return last_number(tail if sep else answer)


def number(prompt: str, completion: str, answer: str) -> Verdict:
    want, got = answer_number(answer), last_number(completion)
    return float(want is not None and got is not None and want == got), None


def _load_module(spec: str, module: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise InputError(f"--verifier {spec}: no such file {module}")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def resolve(spec: str) -> Callable[[str, str, str], Verdict]:
    """The verifier named by ``spec``, checked (importable, callable with three arguments)."""
    if spec in BUILTIN:
        return {"exact": exact, "number": number}[spec]
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise InputError(f"--verifier {spec}: expected exact, number or MODULE:FUNCTION")
    try:
        mod = _load_module(spec, module)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is this input's problem
        text = str(e).strip().splitlines()
        raise InputError(f"--verifier {spec}: cannot import {module} ({type(e).__name__}"
                         f"{': ' + text[0] if text else ''})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise InputError(f"--verifier {spec}: {module} has no attribute {name!r}")
    if not callable(fn):
        raise InputError(f"--verifier {spec}: {module}.{name} is not callable ({type(fn).__name__})")
    try:
        inspect.signature(fn).bind("prompt", "completion", "answer")
    except TypeError:
        raise InputError(f"--verifier {spec}: {module}.{name} cannot be called as "
                         "fn(prompt, completion, answer)") from None
    except ValueError:  # no signature to inspect (some builtins): checked on the first call
        pass
    return _checked(spec, fn)


def _checked(spec: str, fn) -> Callable[[str, str, str], Verdict]:
    def verify(prompt: str, completion: str, answer: str) -> Verdict:
        out = fn(prompt, completion, answer)
        reward, feedback = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not 0 <= reward <= 1 \
                or math.isnan(reward):
            raise InputError(f"--verifier {spec}: returned {out!r}; expected a reward in [0, 1] or "
                             "(reward, feedback text or None)")
        if feedback is not None and not isinstance(feedback, str):
            raise InputError(f"--verifier {spec}: returned feedback {feedback!r}; expected a str or None")
        return float(reward), feedback
    return verify
