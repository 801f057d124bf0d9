"""Argument types for the command line: each parses a string or says what was expected."""
from __future__ import annotations

import argparse


def _typed(cast, ok, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


pos_int = _typed(int, lambda v: v > 0, "a positive integer")
nonneg_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
nonneg_float = _typed(float, lambda v: 0.0 <= v < float("inf"), "a non-negative finite number")
pos_float = _typed(float, lambda v: v > 0 and v < float("inf"), "a positive finite number")
unit = _typed(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
rate = _typed(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def domain_dir(text):
    """``DOMAIN=DIR`` (``--domain-teacher``) as a (domain, dir) pair."""
    domain, sep, path = text.partition("=")
    if not sep or not domain or not path:
        raise argparse.ArgumentTypeError(f"expected DOMAIN=DIR, got {text!r}")
    return domain, path
