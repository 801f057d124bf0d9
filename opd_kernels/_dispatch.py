"""Backend modules: ``impl=`` -> a module (``resolve``, public as ``opd_kernels.backends.get``) and
a resolved name -> its module (``backend``).

``impl`` is "auto" | "torch" | "triton" | "cuda"; "auto" (or the ``OPD_KERNELS_IMPL`` env var
when ``impl="auto"``) picks: the CUDA extension if built and the tensors are on CUDA, else
Triton on CUDA, else torch. Asking for an unavailable backend raises a ``ValueError`` that
names the reason ("CUDA extension not built", "no CUDA device", ...).

This is step 1 of the ops' one decision (``ops/_decide.py: decide``, which adds the float64 rule,
the path and compiled-vs-eager); the ops pass the decided backend's *name* across the custom-op
boundary, and ``backend(name)`` turns it back into the module inside.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

IMPLS = ("auto", "torch", "triton", "cuda")


@lru_cache(maxsize=None)
def _load(name: str):
    """Import ``opd_kernels.backends.<name>_backend``; returns (module or None, reason)."""
    try:
        mod = importlib.import_module(f"opd_kernels.backends.{name}_backend")
    except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break torch
        return None, f"{name} backend failed to import: {exc}"
    ok, reason = mod.available()
    return (mod, "") if ok else (None, reason)


def resolve(impl: str, device: torch.device):
    """Backend module for ``impl`` and tensors on ``device``."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("OPD_KERNELS_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"OPD_KERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            for name in ("cuda", "triton"):
                mod, _ = _load(name)
                if mod is not None:
                    return mod
        return _load("torch")[0]
    if impl != "torch" and device.type != "cuda" and not _interpreting(impl):
        raise ValueError(f"impl={impl!r} is not available here: no CUDA device "
                         f"(tensors are on {device})")
    return backend(impl)


def backend(name: str):
    """The module of an already decided backend ``name`` (``ops/_decide.py``)."""
    mod, reason = _load(name)
    if mod is None:
        raise ValueError(f"impl={name!r} is not available here: {reason}")
    return mod


def _interpreting(impl: str) -> bool:
    """Triton kernels may run on CPU tensors under ``TRITON_INTERPRET=1`` (tests only)."""
    return impl == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"
