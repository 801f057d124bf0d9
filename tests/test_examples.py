"""Runs the code blocks of docs/examples.md exactly as written, in order, in one namespace."""
import importlib.util
import math
import os
import re

import pytest
import torch

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "examples.md")


def blocks():
    with open(DOC) as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.S | re.M)


def run(code_blocks, tmp_path, monkeypatch, ns=None):
    monkeypatch.chdir(tmp_path)  # the TRL example writes its output_dir here
    ns = {"__name__": "docs_examples"} if ns is None else ns
    for code in code_blocks:
        exec(compile(code, f"{DOC}:block{blocks().index(code)}", "exec"), ns)
    return ns


def test_doc_has_the_blocks():
    b = blocks()
    assert len(b) == 4
    assert "ok.hf.hidden_states" in b[1] and "for step in range" in b[2] and "FusedGKDTrainer" in b[3]


def test_hf_and_custom_loop_examples_run(tmp_path, monkeypatch):
    b = blocks()
    ns = run(b[:2], tmp_path, monkeypatch)
    assert ns["s_head"].vocab_size == len(ns["tokenizer"]) == 17
    assert ns["logp"].shape == ns["targets"].shape and bool((ns["logp"][ns["mask"]] < 0).all())
    assert math.isfinite(ns["loss"].item()) and ns["loss"].item() > 0
    grad = ns["student"].lm_head.weight.grad
    assert grad[:17].abs().sum() > 0 and grad[17:].abs().sum() == 0  # padded rows: no gradient
    before = {n: p.detach().clone() for n, p in ns["student"].named_parameters()}
    run([b[2]], tmp_path, monkeypatch, ns)  # the training loop
    moved = [n for n, p in ns["student"].named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and len(moved) > 5


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the 'trl' extra: pip install -e '.[trl]'")
def test_trl_example_runs(tmp_path, monkeypatch):
    b = blocks()
    ns = run([b[0], b[3]], tmp_path, monkeypatch)
    assert ns["trainer"].state.global_step == 2
    assert math.isfinite(float(ns["trainer"].state.log_history[-1]["train_loss"]))
