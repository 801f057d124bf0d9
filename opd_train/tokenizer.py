"""A character-level tokenizer for the bundled task, saved as a real Hugging Face tokenizer.

Built with `tokenizers` (one token per character, a few special tokens) and wrapped in a
`PreTrainedTokenizerFast` with a chat template, so the trainer treats it like the tokenizer of
any downloaded model: `load_tokenizer(dir)` loads it back (as `AutoTokenizer` does, with one
guard, see there), and prompts go through `apply_chat_template` for the bundled models and for
BYO models alike.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
CHARS = string.digits + string.ascii_lowercase + " \n+-*=:;,.|?!()"

# One user turn, then the assistant turn; generation starts right after "<|assistant|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character tokenizer: ids 0..5 are the special tokens, then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char alone
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# Spaces, newlines, digits, letters, punctuation: what prompts with privileged context contain.
_PROBE = "Feedback: 12 + 34 = 46, right.\nsol 2+7+0=09 demo 9520\n\tok?"


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained(path)``, or the directory's ``tokenizer.json`` as saved
    where the class AutoTokenizer picks would split text differently from that file.

    transformers 5 maps some model types (qwen2, phi3, ...) to their own tokenizer class, whose
    constructor rebuilds the pre-tokenizer from the family's rules and ignores the saved one.
    Next to a Qwen2 model, the bundled character tokenizer then lost every space and newline
    (``"sol 3+6\n42="`` encoded as ``sol3+642=``), so every prompt with privileged context
    (OPSD, SDFT, SDPO teachers) differed from what the model was trained on. A downloaded
    model whose ``tokenizer.json`` agrees with its class loads exactly as AutoTokenizer loads it.
    """
    tok = AutoTokenizer.from_pretrained(path)
    file = Path(path) / "tokenizer.json"
    if file.exists():
        saved = Tokenizer.from_file(str(file)).encode(_PROBE, add_special_tokens=False).ids
        if saved != tok(_PROBE, add_special_tokens=False).input_ids:
            tok = PreTrainedTokenizerFast.from_pretrained(path)
    return tok
