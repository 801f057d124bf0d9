"""Bring-your-own inputs as a user meets them: every bad input is refused before training with one
``python -m opd_train: error: ...`` line (exit status 2) naming the flag, the path (and line) and
what was expected. Fast: no training runs here (the smoke student is only needed where a valid
directory must come first)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from opd_train import cli, inputs
from opd_train.data import EXAMPLE_ROW, load_jsonl
from opd_train.inputs import InputError
from opd_train.tokenizer import build_char_tokenizer
from opd_train.train import main
from test_train import one_line_error  # tests/ is on sys.path (conftest)

ROOT = Path(__file__).resolve().parents[1]


def refused(argv, capsys) -> str:
    """Run main(); it must stop with exit status 2 (argparse) or return 2, printing one error line."""
    capsys.readouterr()  # drop what building the test's inputs printed
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    return one_line_error(capsys)


def tiny_model_dir(path: Path, *, tokenizer: bool = True, chat_template: bool = True) -> Path:
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        if not chat_template:
            tok.chat_template = None
        tok.save_pretrained(path)
    return path


def test_missing_data_file_from_the_command_line():
    """The real entry point: one line on stderr, exit status 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "opd_train", "--data", "/nonexistent.jsonl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("python -m opd_train: error: --data /nonexistent.jsonl: no such file "
                                "(expected a JSONL file; see --help for the row format)")


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_data_path_is_not_a_file(flag, tmp_path, capsys):
    argv = ["--data", str(tmp_path)] if flag == "--data" else ["--data", str(tmp_path / "x.jsonl"), flag, str(tmp_path)]
    if flag == "--eval-data":
        (tmp_path / "x.jsonl").write_text(json.dumps(EXAMPLE_ROW) + "\n")
    assert f"{flag} {tmp_path}: not a file (expected a JSONL file" in refused(argv, capsys)


def test_student_that_is_not_a_model_says_which_files(tmp_path, capsys):
    err = refused(["--student", str(tmp_path)], capsys)
    assert f"--student {tmp_path}: not a model directory, it lacks config.json, weights (model.safetensors" in err
    assert "a tokenizer (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model)" in err
    assert "sentencepiece" not in err


def test_model_dir_without_tokenizer(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m", tokenizer=False)
    err = refused(["--method", "sft", "--student", str(d)], capsys)
    assert err.endswith(f"--student {d}: not a model directory, it lacks a tokenizer (tokenizer.json, or "
                        "vocab.json + merges.txt, or tokenizer.model) (save_pretrained() of a causal LM and of "
                        "its tokenizer writes them)")


def test_missing_teacher_and_ref_dirs(tmp_path, capsys):
    err = refused(["--teacher", str(tmp_path / "nope")], capsys)
    assert f"--teacher {tmp_path / 'nope'}: no such directory (expected a Hugging Face causal LM directory with config.json" in err
    err = refused(["--method", "gopd", "--ref", str(tmp_path / "nope")], capsys)
    assert f"--ref {tmp_path / 'nope'}: no such directory" in err


def test_data_needs_the_models_that_know_it(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(EXAMPLE_ROW) + "\n")
    assert "--data needs --student DIR" in refused(["--data", str(data)], capsys)
    s = tiny_model_dir(tmp_path / "s")
    assert "--data with --method opd needs --teacher DIR" in refused(["--data", str(data), "--student", str(s)], capsys)


def test_tokenizer_without_chat_template(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m", chat_template=False)
    with pytest.raises(InputError, match=r"--student .*: the tokenizer has no chat template \(expected chat_template.jinja"):
        inputs.load_tokenizer("--student", d, print)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "1+1=", "answer": "2"\n', ":2: not valid JSON (Expecting ',' delimiter at the end of the line)"),
    ('{"prompt": "1+1=", "answer": "2"}\r\n{"prompt": "é" "answer": "2"}\n', ":3: not valid JSON (Expecting ',' delimiter at column 16)"),
    (b'{"prompt": "\xff", "answer": "2"}\n', ":2: not UTF-8 text (byte 13 of the line)"),
    ("\n\n", ": no examples (expected one JSON object per line"),
])
def test_jsonl_errors_name_line_and_column(text, message, tmp_path):
    path = tmp_path / "d.jsonl"
    first = json.dumps(EXAMPLE_ROW) + "\n" if text != "\n\n" else ""
    path.write_bytes((first.encode() + text) if isinstance(text, bytes) else (first + text).encode())
    with pytest.raises(InputError) as e:
        load_jsonl(str(path), "--data")
    assert str(e.value).startswith(f"--data {path}") and message in str(e.value), str(e.value)


def test_example_row_is_valid_and_in_help(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXAMPLE_ROW).encode() + b"\r\n")  # BOM and CRLF are fine
    (ex,) = load_jsonl(str(path))
    assert (ex.prompt, ex.answer, ex.solution) == (EXAMPLE_ROW["prompt"], EXAMPLE_ROW["answer"], EXAMPLE_ROW["solution"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert json.dumps(EXAMPLE_ROW) in help_text
    assert " ".join(inputs.MODEL_DIR_FILES.split()) in help_text
    for name, cls in cli.METHODS.items():  # the method list and option groups come from the registry
        assert f"{name} {cls.summary}" in help_text
        if cls.paper:
            assert f"({cls.paper})" in help_text


def test_gopd_ref_with_another_vocabulary(tmp_path, capsys):
    s = tiny_model_dir(tmp_path / "s")
    t = tiny_model_dir(tmp_path / "t")
    ref = tmp_path / "ref"
    m = LlamaForCausalLM.from_pretrained(s)
    m.resize_token_embeddings(m.config.vocab_size + 5)
    m.save_pretrained(ref)
    err = refused(["--method", "gopd", "--preset", "smoke", "--steps", "1", "--eval-size", "4", "--student", str(s),
                   "--teacher", str(t), "--ref", str(ref), "--out", str(tmp_path / "run")], capsys)
    assert f"--ref {ref}: its lm_head has {m.config.vocab_size} rows, the student's {m.config.vocab_size - 5}" in err


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    d = tiny_model_dir(tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    notes = []
    tok = inputs.load_tokenizer("--student", d, notes.append)
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert notes == [f"note: --student {d}: the tokenizer has no pad token; padding with EOS ('<eos>')"]


def test_config_that_is_not_a_causal_lm(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"--student {d}: cannot load it as a causal LM \(\w+Error: "):
        inputs.load_model("--student", d, "cpu")
