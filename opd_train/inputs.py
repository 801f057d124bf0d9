"""Checks of what a user brings (``--data`` files, ``--student/--teacher/--ref`` directories).

Each check runs before anything is trained and fails with `InputError`: one line that names the
flag, the path (and line) and what was expected. `opd_train.cli` turns the static checks (files
exist, a model directory holds the files a model needs) into argparse errors; `load_tokenizer` and
`load_model` and `view` (used by the setup, `opd_train.trainer`) raise it for what only loading finds (a
tokenizer without a chat template, a config that is not a causal LM, a head `opd_kernels.hf` cannot see
through), as `opd_train.data` does
for a malformed JSONL line; `opd_train.train.main` prints those the same way,
``python -m opd_train: error: ...``, exit status 2.
"""
from __future__ import annotations

from pathlib import Path

from . import models, tokenizer
from .lm import LM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
MODEL_DIR_FILES = ("config.json, the weights (model.safetensors or pytorch_model.bin, or a sharded "
                   "*.index.json) and a tokenizer (tokenizer.json, or vocab.json + merges.txt, or "
                   "tokenizer.model)")


class InputError(ValueError):
    """A bad input a user passed; its message is the whole one-line report."""


def check_file(flag: str, path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag} {path}: no such file (expected a JSONL file; see --help for the row format)")
    if not p.is_file():
        raise InputError(f"{flag} {path}: not a file (expected a JSONL file; see --help for the row format)")


def has_weights(path) -> bool:
    return any((Path(path) / f).is_file() for f in WEIGHT_FILES)


def check_model_dir(flag: str, path: str | None, *, needs_tokenizer: bool = True) -> None:
    """``path`` holds what ``from_pretrained`` needs: config.json, weights and (if asked) a tokenizer."""
    if path is None:
        return
    p = Path(path)
    if not p.is_dir():
        what = "not a directory" if p.exists() else "no such directory"
        raise InputError(f"{flag} {path}: {what} (expected a Hugging Face causal LM directory with "
                         f"{MODEL_DIR_FILES})")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES) + ")")
    if needs_tokenizer and not any(all((p / f).is_file() for f in files) for files in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model)")
    if missing:
        listed = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        raise InputError(f"{flag} {path}: not a model directory, it lacks {listed} "
                         "(save_pretrained() of a causal LM and of its tokenizer writes them)")


def check_tokenizer(flag: str, path, tok) -> None:
    """What the trainer needs of a loaded tokenizer: a chat template and an EOS token."""
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{flag} {path}: the tokenizer has no chat template (expected chat_template.jinja or "
                         "a 'chat_template' entry in tokenizer_config.json; prompts are rendered as one user turn)")
    if tok.eos_token_id is None:
        raise InputError(f"{flag} {path}: the tokenizer has no EOS token (expected 'eos_token' in "
                         "tokenizer_config.json; completions end with it)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_tokenizer(flag: str, path, log):
    """The directory's tokenizer, checked (`inputs.check_tokenizer`); pads with EOS if it has no pad token."""
    try:
        tok = tokenizer.load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any loader failure is this input's problem
        raise InputError(f"{flag} {path}: cannot load its tokenizer ({_first_line(e)})") from None
    check_tokenizer(flag, path, tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log(f"note: {flag} {path}: the tokenizer has no pad token; padding with EOS ({tok.eos_token!r})")
    return tok


def load_model(flag: str, path, device):
    """The directory's causal LM (`opd_train.models.load`), or an `InputError` naming ``flag``."""
    try:
        return models.load(path, device)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{flag} {path}: cannot load it as a causal LM ({_first_line(e)})") from None


def view(flag: str, path, model, vocab_size: int | None = None, compute_dtype=None) -> LM:
    """``model`` seen through `opd_kernels.hf` (`opd_train.lm.LM`), or an `InputError` when its head
    cannot be seen through (the message names the model class)."""
    try:
        return LM(model, vocab_size, compute_dtype)
    except ValueError as e:
        raise InputError(f"{flag} {path}: {e}") from None
