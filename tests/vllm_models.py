"""Tiny HF models that vLLM's CPU attention can run (head_dim 32; it has no 8, 12 or 24), with the
bundled character tokenizer, so they pair with the bundled smoke models. Built locally, no download."""
from __future__ import annotations

import torch
import transformers as T

from opd_train.tokenizer import build_char_tokenizer


def build_qwen2_hd32(path, seed: int = 0, tie: bool = False) -> None:
    """A 2-layer Qwen2 (hidden 64, two heads of 32, one KV head) saved with its tokenizer at ``path``."""
    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = T.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=tie, initializer_range=0.2)
    T.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
