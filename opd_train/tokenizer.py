"""A character-level tokenizer for the bundled task, saved as a real Hugging Face tokenizer.

Built with `tokenizers` (one token per character, a few special tokens) and wrapped in a
`PreTrainedTokenizerFast` with a chat template, so the trainer treats it exactly like the
tokenizer of any downloaded model: `AutoTokenizer.from_pretrained(dir)` loads it back, and
prompts go through `apply_chat_template` for the bundled models and for BYO models alike.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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
