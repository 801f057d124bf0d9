"""Smoke test of the teacher-scoring benchmark against the stdlib stand-in for vLLM's server
(``tests/fake_teacher_server.py``): both sides run and report, for each K."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import teacher_scoring  # noqa: E402
from fake_teacher_server import FakeTeacherServer  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_both_sides_report(tmp_path, capsys):
    import transformers as T
    from opd_train.tokenizer import build_char_tokenizer, load_tokenizer
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    model = T.Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path), tok.save_pretrained(tmp_path)
    with FakeTeacherServer(model, load_tokenizer(tmp_path)) as server:
        teacher_scoring.main(["--model", str(tmp_path), "--url", server.url, "--batch", "4", "--repeat", "1",
                              "--k", "0", "3"])
    out = capsys.readouterr().out
    for k in (0, 3):
        for side in ("in-process", "server"):
            assert any(line.startswith(f"K={k:<3d} {side}") and "tokens/s" in line for line in out.splitlines()), out
