"""vLLM test and benchmark helpers: tiny HF models that vLLM's CPU attention can run (head_dim 32
or 64; it has no 8, 12 or 24) with the bundled character tokenizer, so they pair with the bundled
smoke models (built locally, no download), and vLLM's OpenAI server on 127.0.0.1, started and
stopped by its PID."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import transformers as T

from opd_train.tokenizer import build_char_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32)


def build_qwen2(path, seed: int = 0, tie: bool = False, **fields) -> None:
    """A Qwen2 (default: `TINY`, 2 layers, hidden 64 in two heads of 32) saved with its tokenizer at ``path``."""
    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = T.Qwen2Config(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=tie,
                        initializer_range=0.2, **{**TINY, **fields})
    T.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def serve(model_dir, log_path: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str, float]:
    """Start vLLM's OpenAI server for ``model_dir`` on a free 127.0.0.1 port; wait for ``/health``.
    Returns ``(process, url, seconds to healthy)``; raises RuntimeError (with the log's tail) if
    it exits or is not healthy in ``timeout_s``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                 "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            pass
        if time.perf_counter() - t0 > timeout_s:
            stop(proc)
            raise RuntimeError(f"vLLM server not healthy after {timeout_s} s: {Path(log_path).read_text()[-2000:]}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
